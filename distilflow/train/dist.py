"""Scale-out under ``torchrun``: process group, batch sharding, DDP / FSDP2 wrapping, rank-0 I/O.

A plain ``distilflow ...`` is one process and nothing here changes it: :func:`current` is a world of
size 1, :meth:`World.shard` returns the batch, :meth:`World.wrap` the modules as they are. Under
``torchrun --nproc_per_node N`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set)
:func:`setup` joins the process group (gloo on CPU, nccl on GPU) and:

- each rank takes its contiguous slice of every micro-batch of the GLOBAL batch, whose order stays
  a pure function of the step (data/batches.py): a run resumes exactly, on any world size;
- the loss keeps its normalisation over the real rows of the whole global step: the row counts are
  summed over ranks, each rank's loss is its rows' share, and the loss is multiplied by the world
  size before backward because DDP and FSDP2 average gradients over ranks; the gradient then
  equals the 1-process gradient (up to float summation order);
- ``dist.strategy: ddp`` wraps the student and the projection heads in
  ``torch.nn.parallel.DistributedDataParallel``; ``fsdp2`` shards them with
  ``torch.distributed.fsdp.fully_shard`` (per decoder layer, then the whole);
  ``dist.shard_teacher`` shards the frozen teacher the same way (inference only);
- only rank 0 writes: progress, metrics.jsonl, TensorBoard, checkpoints, final weights, report,
  config.yaml;
- a collective that fails (a rank died) or waits longer than ``dist.timeout_s`` stops this rank
  with one line instead of hanging.

Checkpoints hold the full (gathered) state, in the same format as a 1-process run, so any world
size (and strategy) resumes them; the wrapped modules and their state live in train/replica.py.
"""

from __future__ import annotations

import copy
import datetime
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distilflow.errors import UserError
from distilflow.models.layers import decoder_layer_modules
from distilflow.storage import WriteFailed
from distilflow.train.replica import Replica, TrainedModules, fully_shard_modules, leaves_parameters_unused
from distilflow.train.sync_batchnorm import sync_batchnorm

Batch = dict[str, torch.Tensor]
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistError(UserError):
    """A collective failed: another rank died, or did not answer within ``dist.timeout_s``."""


@dataclass
class World:
    """This process's place in the job; the defaults are a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    shard_teacher: bool = False
    timeout_s: float = 600.0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # --- collectives -------------------------------------------------------------------------

    def collective(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, a collective: a failure or a timeout becomes one line (:class:`DistError`)."""
        try:
            return fn()
        except (RuntimeError, torch.distributed.DistError) as exc:
            raise self.failure(what, exc) from None

    def failure(self, what: str, exc: BaseException) -> DistError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:160]  # gloo prefixes its source file and line
        return DistError(
            f"{what} failed: another process stopped or did not answer within "
            f"dist.timeout_s={self.timeout_s:g} s ({first}); the last checkpoint is kept, restart the job to resume"
        )

    def comm_failure(self, exc: BaseException) -> DistError | None:
        """A failed collective raised outside this module (DDP's gradient all-reduce in backward, FSDP2's
        reduce-scatter) as one line, or None when ``exc`` is something else."""
        text = str(exc)
        markers = ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "ProcessGroup")
        if self.distributed and (isinstance(exc, torch.distributed.DistError) or any(m in text for m in markers)):
            return self.failure("a collective", exc)
        return None

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            if torch.distributed.get_backend() == "gloo":  # names the rank that did not arrive
                self.collective(what, lambda: torch.distributed.monitored_barrier(timeout=self._timeout()))
            else:
                self.collective(what, torch.distributed.barrier)

    def _timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def all_reduce_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Row counts summed over ranks (same keys on every rank)."""
        if not self.distributed:
            return counts
        keys = sorted(counts)
        summed = self._sum(torch.tensor([counts[k] for k in keys], dtype=torch.float64))
        return {k: int(v) for k, v in zip(keys, summed.tolist())}

    def all_reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Float values summed over ranks, in float64 (losses of the rows' shares, unit counts)."""
        if not self.distributed:
            return values
        keys = sorted(values)
        summed = self._sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, summed.tolist()))

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        device = _collective_device(self)
        tensor = tensor.to(device)
        self.collective("all_reduce", lambda: torch.distributed.all_reduce(tensor))
        return tensor.cpu()

    def all_gather_objects(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        self.collective("all_gather_object", lambda: torch.distributed.all_gather_object(out, value))
        return out

    @contextmanager
    def main_first(self, what: str = "rank 0 first") -> Iterator[None]:
        """Rank 0 runs the block first (e.g. builds a dataset or tokenizer cache), then the others. When
        it fails on rank 0 (bad data), the others are let go too and meet the same error themselves, so
        that rank 0 alone reports it (:func:`input_checks`) instead of the others waiting for a dead rank."""
        if self.distributed and not self.is_main:
            self.barrier(what)
        try:
            yield
        except Exception:
            if self.distributed and self.is_main:
                try:
                    self.barrier(what)
                except DistError:
                    pass  # the others stopped too; this rank's own error is the one to report
            raise
        if self.distributed and self.is_main:
            self.barrier(what)

    # --- data --------------------------------------------------------------------------------

    def check_batch(self, batch_size: int, grad_accum: int, key: str) -> None:
        """Every rank gets the same number of rows of every micro-batch."""
        micro = batch_size // max(grad_accum, 1)
        if self.distributed and (micro % self.size or batch_size % max(grad_accum, 1)):
            raise UserError(
                f"config key '{key}.batch_size': {batch_size} (grad_accum {grad_accum}) does not split over "
                f"{self.size} processes; batch_size must be a multiple of grad_accum x world size "
                f"({max(grad_accum, 1) * self.size})"
            )

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous slice of the rows of one micro-batch of the global batch."""
        if not self.distributed:
            return batch
        out = {}
        for key, value in batch.items():
            rows = len(value) // self.size
            out[key] = value[self.rank * rows : (self.rank + 1) * rows]
        return out

    def seed_ranks(self) -> None:
        """Give each rank its own random stream (dropout), derived from the shared one.

        Every rank holds the same RNG state (same seed, same restored checkpoint); without this,
        row i of every rank's shard would get the same dropout mask.
        """
        if self.distributed:
            base = int(torch.randint(0, 2**62, (1,)))
            torch.manual_seed(base + self.rank)

    # --- models ------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, objective: Any) -> Replica:
        """The trained modules (student and the objective's projection heads) as this world trains them."""
        heads = objective.heads
        step = TrainedModules(model, heads)
        if not self.distributed:
            return Replica(step, step, self)
        if self.strategy == "fsdp2":
            # fully_shard turns the modules' parameters into shards in place; an unsharded copy (on the
            # CPU) receives the trained weights at the end, for the stages that follow (save, eval, export).
            device = next(model.parameters()).device
            plain = (copy.deepcopy(model).cpu(), copy.deepcopy(heads).cpu(), device)
            sync_batchnorm(model)  # batch statistics over every rank's rows (train/sync_batchnorm.py)
            fully_shard_modules(step, model)
            return Replica(step, step, self, plain)
        from torch.nn.parallel import DistributedDataParallel

        sync_batchnorm(model)  # batch statistics over every rank's rows (train/sync_batchnorm.py)
        device = next(model.parameters()).device
        ddp = DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A phase may leave parameters without a gradient (the output layer in a feature-only
            # phase, the heads outside feature phases); DDP must then find them each step (a graph
            # traversal), and keeps their .grad None exactly as a single process does.
            find_unused_parameters=leaves_parameters_unused(objective),
        )
        return Replica(ddp, step, self)

    def shard_teacher_signals(self, signals: Any, teacher: nn.Module) -> Any:
        """With ``dist.shard_teacher``: the frozen teacher's decoder layers sharded with FSDP2 (each rank
        holds 1/N of them, gathered layer by layer in the forward); embeddings, final norm and lm_head stay
        whole after the first forward (``reshard_after_forward=False``), so the fused loss can read the
        lm_head and the teacher still runs as a plain module afterwards (evaluation, facts)."""
        if not (self.distributed and self.shard_teacher):
            return signals
        from torch.distributed.fsdp import fully_shard

        root = TrainedModules(teacher, nn.ModuleList())
        for layer in decoder_layer_modules(teacher):
            fully_shard(layer)
        fully_shard(root, reshard_after_forward=False)
        from distilflow.teachers.sharded import ShardedTeacher

        return ShardedTeacher(root, signals)

    def place(self, device: torch.device) -> torch.device:
        """Under torchrun each rank uses its own GPU: cuda -> cuda:LOCAL_RANK."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device


def _collective_device(world: World) -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", world.local_rank) if backend == "nccl" else torch.device("cpu")


# --- the process's world ---------------------------------------------------------------------

_WORLD = World()


def current() -> World:
    """The world set up by :func:`setup` (a single process until then)."""
    return _WORLD


@contextmanager
def input_checks() -> Iterator[None]:
    """Errors raised inside come from what every rank reads alike (the config, the data, the models, the
    output folder), so under torchrun rank 0 alone prints them (cli.main), not one line per rank. A write
    that failed or a peer that died stays each rank's own."""
    try:
        yield
    except UserError as exc:
        if not isinstance(exc, (DistError, WriteFailed)):
            exc.rank_0_reports = True
        raise


def env_world() -> World:
    """Rank and size from the torchrun environment, without joining the group (for early checks)."""
    size = _env_int("WORLD_SIZE", os.environ.get("WORLD_SIZE", "1") or "1")
    if size <= 1:
        return World()
    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with torchrun (it sets them all)")
    rank, local_rank = _env_int("RANK", os.environ["RANK"]), _env_int("LOCAL_RANK", os.environ["LOCAL_RANK"])
    if not (0 <= rank < size and 0 <= local_rank < size):
        # A rank outside the world would wait for its peers until dist.timeout_s.
        raise UserError(f"RANK={rank}, LOCAL_RANK={local_rank} with WORLD_SIZE={size}: ranks are 0..{size - 1}")
    return World(rank=rank, size=size, local_rank=local_rank)


def _env_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def setup(cfg: Any, device: torch.device | None = None) -> World:
    """Join the process group of a torchrun job (once per process); a single process stays one."""
    global _WORLD
    world = env_world()
    d = cfg.dist
    world.strategy, world.shard_teacher, world.timeout_s = d.strategy, d.shard_teacher, d.timeout_s
    if not world.distributed:
        _WORLD = world
        return world
    if not torch.distributed.is_initialized():
        backend = d.backend
        if backend == "auto":
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            if device is None or device.type != "cuda" or not torch.cuda.is_available():
                raise UserError(
                    f"config key 'dist.backend': 'nccl' is not allowed on device {device}; nccl needs CUDA GPUs: "
                    "use auto or gloo"
                )
            torch.cuda.set_device(world.local_rank)
        try:
            torch.distributed.init_process_group(
                backend=backend, timeout=datetime.timedelta(seconds=d.timeout_s), rank=world.rank, world_size=world.size
            )
        except (RuntimeError, ValueError, torch.distributed.DistError) as exc:
            raise world.failure("joining the process group", exc) from None
    _WORLD = world
    return world


def shutdown() -> None:
    """Leave the process group (end of the command)."""
    global _WORLD
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = World()


class NullLog:
    """The metrics log of a rank other than 0: writes nothing."""

    def drop_after(self, step: int) -> None:
        pass

    def write(self, row: dict[str, Any]) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """The progress display of a rank other than 0: shows nothing."""

    def update(self, step: int, info: dict[str, Any], force: bool = False) -> None:
        pass
