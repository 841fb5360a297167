"""torchrun on CPU (gloo): 2 processes give the losses of 1, checkpoints resume across world sizes,
bad input and dead ranks stop every rank with one line.

The reference is the same command in one process (in this pytest process: no torchrun variables).
Two-process runs are started either by ``torch.distributed.run`` itself or by :func:`launch`, which
sets the variables torchrun sets (RANK, WORLD_SIZE, ...) for each process, so that the test sees
each rank's own exit code and stderr (torchrun reports only its own).

Tolerance: the 2-process gradient is the sum of two partial sums instead of one sum, so float32
results differ by rounding only (~1e-7 relative per step); 1e-5 absolute on losses of order 1 and
on gradient norms leaves two orders of magnitude for ten AdamW steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distilflow.cli import main
from distilflow.train import dist
from distilflow.train.checkpoint import CHECKPOINT, read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
FEATURES = "distill.feature_layers=[{student: layers.3, teacher: layers.1}]"
RUN_MAIN = "import sys\nfrom distilflow.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# Stands in for a kill: every process of the job stops at the start of student step 6 (after the
# checkpoint of step 4), as the user's Ctrl-C would stop them (exit 130).
STOP_AT_6 = """
import sys
from distilflow.tasks import classify
original = classify.ClassifierTask.micro_batches
def micro_batches(self, step):
    if step >= 6:
        raise KeyboardInterrupt
    return original(self, step)
classify.ClassifierTask.micro_batches = micro_batches
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(stderr: str) -> bool:
    """The job's MASTER_PORT was taken between :func:`free_port` and rank 0's bind (another job on the
    machine, e.g. a second test suite, got it): the launch is retried on a new port."""
    return "EADDRINUSE" in stderr or "address already in use" in stderr.lower()


def on_a_free_port(start, lost_the_port, tries: int = 3):
    """``start(port)`` on a fresh :func:`free_port`, again (up to ``tries`` times) while ``lost_the_port``."""
    for _ in range(tries - 1):
        result = start(free_port())
        if not lost_the_port(result):
            return result
    return start(free_port())


def rank_env(rank: int, n: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one rank of an ``n``-process job on this machine."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


def launch(args: list[str], *, n: int = 2, code: str = RUN_MAIN, timeout: float = 240) -> list[tuple[int, str, str]]:
    """Run ``distilflow ARGS`` as ``n`` ranks of one job (torchrun's variables); (rc, stdout, stderr) each."""

    def start(port: int) -> list[tuple[int, str, str]]:
        cmd = [sys.executable, "-c", code, *args]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        procs = [subprocess.Popen(cmd, env=rank_env(r, n, port), cwd=ROOT, text=True, **pipes) for r in range(n)]
        try:
            outs = [p.communicate(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                p.kill()
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]

    return on_a_free_port(start, lambda ranks: any(rc != 0 and port_taken(err) for rc, _, err in ranks))


def torchrun(args: list[str], *, n: int = 2) -> subprocess.CompletedProcess:
    def start(port: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}"]
        return subprocess.run([*cmd, "-m", "distilflow", *args], cwd=ROOT, capture_output=True, text=True, timeout=240)

    return on_a_free_port(start, lambda done: done.returncode != 0 and port_taken(done.stderr))


def metrics(run_dir: Path, stage: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if stage is None or r["stage"] == stage]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Same logged rows (stage, step, keys), every number within TOL; throughput is not compared."""
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), (g["stage"], g["step"])
        for key, value in w.items():
            if key.endswith("_per_s") or not isinstance(value, float):
                assert key.endswith("_per_s") or g[key] == value, (key, g[key], value)
                continue
            assert abs(g[key] - value) <= TOL, (w["stage"], w["step"], key, g[key], value)


@pytest.fixture(scope="module")
def args(mnist_cache):
    """A tiny MNIST-1D job without BatchNorm and dropout (an MLP teacher), so that the global batch,
    not its split over processes, decides every number: 10 student steps in 3 phases
    (feature / kd / kd + ce), 2 micro-batches of 16 per step, checkpoints every 4 steps."""

    def make(output_dir: Path, *extra: str) -> list[str]:
        return [
            f"output_dir={output_dir}",
            f"data.cache_dir={mnist_cache}",
            "data.mnist1d.num_samples=200",
            "data.mnist1d.transfer_size=64",
            "threads=1",
            "teacher.model.arch=mlp",
            "teacher.model.mlp.hidden=[16, 16]",
            "teacher.model.mlp.dropout=0.0",
            "teacher.train.steps=6",
            "teacher.train.batch_size=32",
            "teacher.train.warmup_steps=1",
            "teacher.train.log_every=1",
            "student.model.mlp.hidden=[32, 32]",
            "student.model.mlp.dropout=0.0",
            "student.train.steps=10",
            "student.train.batch_size=32",
            "student.train.grad_accum=2",
            "student.train.warmup_steps=1",
            "student.train.log_every=1",
            "student.train.eval_every=5",
            "student.train.checkpoint_every=4",
            "deploy.enabled=false",
            FEATURES,
            *extra,
            "--no-tensorboard",
        ]

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args) -> Path:
    """The whole job (teacher, baseline, student) in one process."""
    out = tmp_path_factory.mktemp("one-process")
    assert main(["run", *args(out)]) == 0
    return out


def test_a_taken_master_port_is_one_line_that_launch_retries_on(args, tmp_path):
    """The premise of :func:`launch`'s retry: rank 0 whose MASTER_PORT another process holds stops with
    one line (exit 2, no traceback) that names EADDRINUSE."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        cmd = [sys.executable, "-c", RUN_MAIN, "run", *args(tmp_path / "out")]
        env = rank_env(0, 2, held.getsockname()[1])
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and port_taken(done.stderr), done.stderr[-2000:]
    assert not port_taken("rank 1 stopped: a collective failed")


def distill_args(args, reference: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", *args(out, f"teacher.model.checkpoint={reference / 'teacher'}", *extra)]


def test_torchrun_two_processes_log_the_losses_of_one(reference, args, tmp_path):
    out = tmp_path / "two"
    done = torchrun(["run", *args(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    # Teacher, baseline and student: every logged loss, part, gradient norm and eval value.
    assert_same_metrics(metrics(out), metrics(reference))
    # Rank 0 alone wrote: one results table on stdout, one copy of each metrics row.
    assert done.stdout.count("wall ") == 1
    for stage in ("teacher", "baseline", "student"):
        want = read_checkpoint(reference / stage / CHECKPOINT)["model"]
        got = read_checkpoint(out / stage / CHECKPOINT)["model"]
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=TOL)


def test_fsdp2_two_processes_log_the_losses_of_one(reference, args, tmp_path):
    out = tmp_path / "fsdp2"
    ranks = launch(distill_args(args, reference, out, "dist.strategy=fsdp2"))
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert_same_metrics(metrics(out, "student"), metrics(reference, "student"))
    # The checkpoint holds the full (gathered) state in the 1-process format: same keys, same values.
    want, got = read_checkpoint(reference / "student" / CHECKPOINT), read_checkpoint(out / "student" / CHECKPOINT)
    assert got["optimizer"]["param_groups"][0]["params"] == want["optimizer"]["param_groups"][0]["params"]
    for key in want["model"]:
        torch.testing.assert_close(got["model"][key], want["model"][key], rtol=0, atol=TOL)
    for index, state in want["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=0, atol=TOL)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2), (2, "fsdp2")])
def test_a_checkpoint_resumes_on_another_world_size(reference, args, tmp_path, monkeypatch, first, then):
    """Stopped at student step 6 (checkpoint of step 4), resumed with another number of processes (or
    strategy): the finished run logs the steps of an uninterrupted 1-process run."""
    out = tmp_path / "resumed"
    job = distill_args(args, reference, out)
    if first == 2:
        assert [r[0] for r in launch(job, code=STOP_AT_6)] == [130, 130]
    else:
        from distilflow.tasks import classify

        original = classify.ClassifierTask.micro_batches

        def stop_at_6(self, step):
            if step >= 6:
                raise KeyboardInterrupt
            return original(self, step)

        monkeypatch.setattr(classify.ClassifierTask, "micro_batches", stop_at_6)
        assert main(job) == 130
        monkeypatch.undo()
    assert read_checkpoint(out / "student" / CHECKPOINT)["step"] == 4
    if then == 1:
        assert main(job) == 0
    else:
        extra = ["dist.strategy=fsdp2"] if then == "fsdp2" else []
        ranks = launch(distill_args(args, reference, out, *extra))
        assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    assert_same_metrics(metrics(out, "student"), metrics(reference, "student"))


# The built-in CNN teacher (Conv, BatchNorm, ReLU blocks) in place of the fixture's MLP.
BATCHNORM = [
    "teacher.model.arch=cnn1d",
    "teacher.model.mlp=null",
    "teacher.model.cnn.channels=[8, 8]",
    "distill.feature_layers=[{student: layers.3, teacher: features.4}]",
]


UNSYNCED = RUN_MAIN.replace(
    "from distilflow.cli", "from distilflow.train import dist\ndist.sync_batchnorm = id\nfrom distilflow.cli"
)


def _training_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def test_a_batchnorm_teacher_on_two_processes_logs_the_losses_of_one(args, tmp_path):
    """Each rank holds half of every micro-batch; BatchNorm's statistics are over both halves
    (train/sync_batchnorm.py), so every logged number (losses, gradient norms, evaluation through the
    running statistics) is the 1-process one (and without the synchronisation it is not: the control
    run)."""
    one, two, control = tmp_path / "one", tmp_path / "two", tmp_path / "unsynced"
    assert main(["train-teacher", *args(one, *BATCHNORM)]) == 0
    ranks = launch(["train-teacher", *args(two, *BATCHNORM)])
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    want = metrics(one, "teacher")
    assert_same_metrics(metrics(two, "teacher"), want)
    ranks = launch(["train-teacher", *args(control, *BATCHNORM)], code=UNSYNCED)
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    drift = max(
        abs(g["loss"] - w["loss"]) for g, w in zip(_training_rows(metrics(control, "teacher")), _training_rows(want))
    )
    assert drift > 100 * TOL  # each rank normalising over its own half is another computation


# Student step 3 gets inf inputs in the second half of its rows only: under torchrun rank 1's rows,
# so rank 0's own loss stays finite and only the global verdict makes it skip the step too.
POISON_HALF_AT_3 = """
import math, sys
from distilflow.tasks import classify
original = classify.ClassifierTask.micro_batches
def micro_batches(self, step):
    batches = original(self, step)
    if step != 2:
        return batches
    out = []
    for b in batches:
        x = b["x"].clone()
        x[len(x) // 2 :] *= math.inf
        out.append({**b, "x": x})
    return out
classify.ClassifierTask.micro_batches = micro_batches
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bad_step_on_one_rank_is_skipped_by_every_rank_as_one_process_skips_it(reference, args, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    job = distill_args(args, reference, one)
    exec_one = subprocess.run([sys.executable, "-c", POISON_HALF_AT_3, *job], cwd=ROOT, capture_output=True, text=True)
    assert exec_one.returncode == 0, exec_one.stderr[-3000:]
    ranks = launch(distill_args(args, reference, two), code=POISON_HALF_AT_3)
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    want, got = metrics(one, "student"), metrics(two, "student")
    bad = [r for r in want if "bad_step" in r]
    assert [(r["step"], r["bad_step"], r["bad_steps"]) for r in bad] == [(3, "loss", 1)]
    assert [(r["step"], r["bad_step"], r["bad_steps"]) for r in got if "bad_step" in r] == [(3, "loss", 1)]
    assert_same_metrics([r for r in got if "bad_step" not in r], [r for r in want if "bad_step" not in r])
    assert ranks[1][2].count("step 3") == 0  # rank 0 alone says that the step is skipped


# BatchNorm1d / 2d with and without affine and momentum=None: the rank-synced module on each rank's half
# against a plain BatchNorm on the whole batch (the reference, computed by rank 0 itself).
SYNCED_BN = """
import sys, torch
from torch import nn
from distilflow.config import DistConfig
from distilflow.train import dist
from distilflow.train.sync_batchnorm import sync_batchnorm, unsync_batchnorm

class Cfg:
    dist = DistConfig(timeout_s=60.0)

world = dist.setup(Cfg())
worst = 0.0
for make, shape in [(lambda: nn.BatchNorm1d(3), (8, 3, 5)), (lambda: nn.BatchNorm2d(4, momentum=None), (6, 4, 3, 3)),
                    (lambda: nn.BatchNorm1d(3, affine=False), (4, 3))]:
    torch.manual_seed(0)
    reference, synced = make(), make()
    if reference.affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5); reference.bias.uniform_(-1, 1)
        synced.load_state_dict(reference.state_dict())
    assert sync_batchnorm(synced) == 1
    x = torch.randn(*shape) * 3 + 1
    up = torch.randn(*shape)
    half = shape[0] // 2
    mine = slice(world.rank * half, (world.rank + 1) * half)
    for _ in range(2):  # twice: the running statistics move on from the first call
        xr = x.clone().requires_grad_(True)
        whole = reference(xr)
        (whole * up).sum().backward()
        xs = x[mine].clone().requires_grad_(True)
        out = synced(xs)
        (out * up[mine]).sum().backward()
        worst = max(worst, (out - whole[mine]).abs().max().item(), (xs.grad - xr.grad[mine]).abs().max().item())
    if reference.affine:  # parameter gradients: each rank holds its rows' share; the sum is the whole batch's
        for p, q in zip(synced.parameters(), reference.parameters()):
            g = p.grad.clone(); torch.distributed.all_reduce(g)
            worst = max(worst, (g - q.grad).abs().max().item())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        worst = max(worst, (getattr(synced, name).float() - getattr(reference, name).float()).abs().max().item())
    unsync_batchnorm(synced)
    assert type(synced) is type(reference)
print(f"worst {worst:.3g}")
# Leave the process group as the CLI does: a gloo group torn down by the interpreter's exit instead
# sometimes aborts the process ("terminate called without an active exception", rc -6).
dist.shutdown()
"""


def test_the_rank_synced_batchnorm_equals_one_batchnorm_on_the_whole_batch():
    ranks = launch([], code=SYNCED_BN, timeout=120)
    for rc, out, err in ranks:
        assert rc == 0, err[-3000:]
        assert float(out.split()[-1]) <= TOL, out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["student.train.batch_size=30"], ["student.train.batch_size", "30", "multiple of"]),  # 2 micro-batches of 15
        (["student.train.stepz=3"], ["unknown config key 'student.train.stepz'"]),  # refused while loading
    ],
    ids=["batch-does-not-split", "unknown-key"],
)
def test_a_refused_config_is_one_line_from_rank_0_only(args, tmp_path, extra, expected):
    """Every rank refuses the same config and exits 2; rank 0 alone says why (not once per rank)."""
    out = tmp_path / "odd"
    ranks = launch(["run", *args(out, *extra)])
    assert [rc for rc, _, _ in ranks] == [2, 2], ranks
    lines = ranks[0][2].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distilflow: error: "), ranks[0][2]
    assert all(word in lines[0] for word in expected), lines[0]
    assert ranks[1][2].strip() == "", ranks[1][2]
    assert not out.exists()  # refused before anything was written


# Rank 1 dies at the start of student step 3.
DIE_AT_3 = """
import os, sys
from distilflow.tasks import classify
original = classify.ClassifierTask.micro_batches
def micro_batches(self, step):
    if step >= 3 and os.environ["RANK"] == "1":
        os._exit(1)
    return original(self, step)
classify.ClassifierTask.micro_batches = micro_batches
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Rank 1 dies in its backward pass of student step 3: rank 0 is then inside DDP's gradient all-reduce.
DIE_IN_BACKWARD_3 = """
import os, sys
from distilflow.train import precision
original, calls = precision.Precision.backward, []
def backward(self, loss):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) > 2 * 3:  # steps 0-2 done (2 micro-batches each)
        os._exit(1)
    return original(self, loss)
precision.Precision.backward = backward
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""

# A rank that dies (exit) or hangs (sleep) while the other waits in a collective.
DEAD_RANK = """
import os, sys, time
from distilflow.config import DistConfig
from distilflow.train import dist

class Cfg:
    dist = DistConfig(timeout_s=60.0)  # joining may take long on a loaded machine

world = dist.setup(Cfg())
world.all_reduce_counts({"kd": 1})  # both alive here
world.timeout_s = 3.0  # barriers take the timeout of the moment
if world.rank == 1:
    if sys.argv[1] == "exit":
        os._exit(1)
    time.sleep(8)  # past the 3 s timeout of rank 0
    os._exit(0)
began = time.monotonic()
try:
    world.barrier("the test barrier")
except dist.DistError as exc:
    print(f"{time.monotonic() - began:.2f}", file=sys.stderr)
    print(exc, file=sys.stderr)
    sys.stderr.flush()
    os._exit(2)
"""


@pytest.mark.parametrize("fault", ["exit", "sleep"])
def test_a_dead_or_stuck_rank_stops_the_others_within_the_timeout(fault):
    rc, _, err = launch([fault], code=DEAD_RANK, timeout=60)[0]
    assert rc == 2, err
    seconds, message = err.strip().splitlines()[-2:]
    assert float(seconds) < 3.0 + 5.0  # the 3 s collective timeout, plus slack for a loaded machine
    assert "the test barrier failed: another process stopped or did not answer within dist.timeout_s=3 s" in message


@pytest.mark.parametrize("code", [DIE_AT_3, DIE_IN_BACKWARD_3], ids=["between-steps", "in-ddp-backward"])
def test_cli_names_the_rank_and_exits_2_when_a_peer_dies(reference, args, tmp_path, code):
    """Through the CLI: rank 1 dies at student step 3 (before the step's first collective, or inside
    DDP's gradient all-reduce); rank 0 stops with one line, exit 2."""
    began = time.monotonic()
    ranks = launch(distill_args(args, reference, tmp_path / "dead", "dist.timeout_s=20"), code=code, timeout=120)
    rc, _, err = ranks[0]
    assert ranks[1][0] == 1
    assert rc == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("distilflow: error (rank 0 of 2): ") and "another process stopped" in line
    assert time.monotonic() - began < 120


def test_a_single_process_is_untouched():
    world = dist.current()
    assert not world.distributed and world.is_main
    batch = {"x": torch.arange(6)}
    assert world.shard(batch) is batch
    assert world.all_reduce_counts({"kd": 3}) == {"kd": 3}


def test_shard_takes_each_ranks_contiguous_rows():
    batch = {"x": torch.arange(8), "y": torch.arange(8) * 10}
    parts = [dist.World(rank=r, size=4).shard(batch) for r in range(4)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"])
    assert torch.equal(parts[2]["y"], torch.tensor([40, 50]))


# --- teacher cache -------------------------------------------------------------------------------

CACHE = ["cache.use=true", "cache.features=true", "cache.format=topk", "cache.k=4", "cache.shard_rows=16"]  # 14 shards
# Rank 1 dies right after writing its second shard (rank 0 then waits at the barrier until the timeout).
DIE_AFTER_2_SHARDS = """
import os, sys
from distilflow.data import cache_writer
original, written = cache_writer.write_weights, []
def write_weights(*args, **kwargs):
    original(*args, **kwargs)
    written.append(args[0])
    if os.environ["RANK"] == "1" and len(written) == 2:
        os._exit(1)
cache_writer.write_weights = write_weights
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cache_args(args, reference: Path, out: Path, *extra: str) -> list[str]:
    return args(out, f"teacher.model.checkpoint={reference / 'teacher'}", *CACHE, *extra)


def cache_teacher(args, reference: Path, out: Path, *extra: str) -> list[str]:
    return ["cache-teacher", *(a for a in cache_args(args, reference, out, *extra) if a != "--no-tensorboard")]


@pytest.fixture(scope="module")
def one_process_cache(reference, args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache-1")
    assert main(cache_teacher(args, reference, out)) == 0
    assert main(["distill", *cache_args(args, reference, out)]) == 0
    return out


def test_two_ranks_write_the_cache_of_one(reference, args, one_process_cache, tmp_path):
    """Each rank writes every other shard; rank 0's manifest lists all 14 in row order: the same files
    (sha256) as one process writes. A 1-process distill reads it and logs the same losses."""
    out = tmp_path / "cache-2"
    ranks = launch(cache_teacher(args, reference, out))
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    want = json.loads((one_process_cache / "teacher_cache" / "manifest.json").read_text())
    got = json.loads((out / "teacher_cache" / "manifest.json").read_text())
    assert got["shards"] == want["shards"] and got["complete"]
    assert sorted(p.name for p in (out / "teacher_cache").iterdir()) == sorted(
        p.name for p in (one_process_cache / "teacher_cache").iterdir()
    )  # no rank part left behind
    assert main(["distill", *cache_args(args, reference, out)]) == 0
    assert_same_metrics(metrics(out, "student"), metrics(one_process_cache, "student"))


def test_two_ranks_distill_from_a_one_process_cache(reference, args, one_process_cache, tmp_path):
    out = tmp_path / "cached-2"
    path = one_process_cache / "teacher_cache"
    ranks = launch(["distill", *cache_args(args, reference, out, f"cache.path={path}")])
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:]
    assert_same_metrics(metrics(out, "student"), metrics(one_process_cache, "student"))


def test_a_cache_cut_short_by_a_dead_rank_is_finished_by_one_process(reference, args, one_process_cache, tmp_path):
    out = tmp_path / "cut"
    job = cache_teacher(args, reference, out, "dist.timeout_s=15")
    rc0, _, err0 = launch(job, code=DIE_AFTER_2_SHARDS)[0]
    assert rc0 == 2 and "another process stopped" in err0.strip().splitlines()[-1], err0[-3000:]
    folder = out / "teacher_cache"
    manifest = folder / "manifest.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text())["complete"]
    assert (folder / "manifest.rank-1.json").is_file()  # rank 1 listed the 2 shards it finished
    assert main(job) == 0  # one process reuses the listed shards of both ranks and writes the rest
    want = json.loads((one_process_cache / "teacher_cache" / "manifest.json").read_text())
    assert json.loads((folder / "manifest.json").read_text())["shards"] == want["shards"]
    assert not list(folder.glob("manifest.rank-*.json"))


# --- generation ------------------------------------------------------------------------------------

# Rank 1 dies after finishing its first prompt (rank 0 then waits at the barrier until the timeout).
DIE_AFTER_1_PROMPT = """
import os, sys
from distilflow.generate import writer
original = writer.SampleWriter.write_prompt
def write_prompt(self, *args, **kwargs):
    original(self, *args, **kwargs)
    if os.environ["RANK"] == "1":
        os._exit(1)
writer.SampleWriter.write_prompt = write_prompt
from distilflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def generation(tmp_path_factory, arith_llama_dir) -> dict:
    """A tiny random Llama with the arithmetic tokenizer, 7 prompts, and the 1-process output."""
    root = tmp_path_factory.mktemp("generate")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{2 * i}=", "answer": str(3 * i)}) + "\n" for i in range(7)))

    def job(out: Path, *extra: str) -> list[str]:
        # Greedy, one prompt per generate call: the rows cannot depend on how prompts are batched.
        return [
            "generate",
            f"output_dir={out}",
            f"generate.prompts={prompts}",
            f"generate.model={arith_llama_dir}",
            "generate.temperature=0",
            "generate.n=1",
            "generate.batch_size=1",
            "generate.max_new_tokens=6",
            "generate.keep_truncated=true",
            "generate.verifier=none",
            "threads=1",
            *extra,
        ]

    assert main(job(root / "one")) == 0
    return {"job": job, "one": root / "one" / "generated.jsonl"}


def rows(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: (r["id"], r["sample"]))


def test_two_ranks_generate_the_rows_of_one(generation, tmp_path):
    ranks = launch(generation["job"](tmp_path))
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert "7 prompts generated, 0 already done" in ranks[0][1]
    output = tmp_path / "generated.jsonl"
    assert rows(output) == rows(generation["one"])  # same rows, each once
    assert sorted(p.name for p in tmp_path.glob("generated.jsonl*")) == [
        "generated.jsonl",
        "generated.jsonl.progress",
        "generated.jsonl.summary.json",
    ]  # the rank parts are merged and gone
    # The text data path (what distill reads for sequence-level KD) reads the merged file as the 1-process one.
    from distilflow.data.text import read_records

    assert read_records(output).records == read_records(generation["one"]).records


def test_generation_cut_by_a_dead_rank_is_finished_by_one_process(generation, tmp_path):
    ranks = launch(generation["job"](tmp_path, "dist.timeout_s=15"), code=DIE_AFTER_1_PROMPT, timeout=120)
    assert ranks[0][0] == 2 and ranks[1][0] == 1, ranks[0][2][-3000:]
    assert (tmp_path / "generated.jsonl.rank-1").is_file()  # rank 1's finished prompt is kept in its part
    assert main(generation["job"](tmp_path, "dist.timeout_s=15")) == 0  # merges the parts, generates the rest
    assert rows(tmp_path / "generated.jsonl") == rows(generation["one"])
    assert not list(tmp_path.glob("generated.jsonl.rank-*"))


# --- causal LM: token-level normalisation over ranks that hold different token counts -------------


@pytest.fixture(scope="module")
def lm_job(tmp_path_factory):
    """A tiny Llama teacher (2 layers) and student (1 layer) on sums ``a+b=`` -> ``c`` repeated 1-4 times,
    unpacked: each row scores a different number of completion tokens, so the two ranks of a step hold
    different counts and only the all-reduced count gives the 1-process normalisation."""
    from distilflow.data.arith import arith_tokenizer
    from distilflow.data.stdlib_corpus import tiny_llama_config

    root = tmp_path_factory.mktemp("lm")
    tokenizer = arith_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(120):
        a, b, times = (int(torch.randint(0, high, (1,), generator=g)) for high in (999, 99, 5))
        times = max(times, 1)
        lines.append(json.dumps({"prompt": f"{a}+{b}=", "completion": " ".join([str(a + b)] * times)}))
    (root / "sums.jsonl").write_text("\n".join(lines) + "\n")
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    def llama(hidden: int, layers: int) -> str:
        config = tiny_llama_config(len(tokenizer), hidden=hidden, layers=layers, heads=2, max_positions=64, **special)
        return json.dumps(config)

    def make(out: Path, *extra: str) -> list[str]:
        return [
            "run",
            "configs/lm_stdlib.yaml",
            f"output_dir={out}",
            "data.source=text",
            "data.stdlib=null",  # the file's source section: this job reads a text file
            f"data.text.path={root / 'sums.jsonl'}",
            f"data.text.tokenizer={root / 'tokenizer'}",
            "data.text.seq_len=24",
            "data.text.pack=false",
            "threads=1",
            f"teacher.model.hf.config={llama(32, 2)}",
            f"student.model.hf.config={llama(16, 1)}",
            "teacher.train.steps=4",
            "teacher.train.batch_size=8",
            "teacher.train.warmup_steps=1",
            "teacher.train.log_every=1",
            "student.train.steps=10",
            "student.train.batch_size=8",
            "student.train.grad_accum=2",
            "student.train.warmup_steps=1",
            "student.train.eval_every=5",
            "student.train.log_every=1",
            "distill.kd_weight.warmup_steps=2",
            "deploy.enabled=false",
            *extra,
            "--no-tensorboard",
        ]

    return make


@pytest.mark.parametrize(
    "extra",
    [[], ["dist.strategy=fsdp2", "dist.shard_teacher=true", "distill.loss_impl=fused"]],
    ids=["ddp", "fsdp2-sharded-teacher-fused"],
)
def test_lm_two_processes_log_the_losses_of_one(lm_job, tmp_path, extra):
    impl = [e for e in extra if e.startswith("distill.")]
    one = tmp_path / "one"
    assert main(lm_job(one, *impl)) == 0
    # The premise: a micro-batch's two halves (the two ranks' shares) score different token counts.
    from distilflow.config import load_config
    from distilflow.workload import make_workload

    config, *overrides = [a for a in lm_job(one, *impl)[1:] if a != "--no-tensorboard"]
    cfg = load_config(config, overrides)
    task = make_workload(cfg, torch.device("cpu")).task("student", cfg.student.train, cfg.seed + 1)
    counts = [
        [int((b["labels"][half, 1:] != -100).sum()) for half in (slice(0, 2), slice(2, 4))]
        for step in range(10)
        for b in task.micro_batches(step)
    ]
    assert any(first != second for first, second in counts)

    two = tmp_path / "two"
    ranks = launch(lm_job(two, *extra))
    assert [r[0] for r in ranks] == [0, 0], ranks[0][2][-3000:] + ranks[1][2][-3000:]
    assert_same_metrics(metrics(two), metrics(one))


# ---------------------------------------------------------------- two teachers and the adaptive KD weight
# The adaptive weight's step totals are all-reduced and its summary gathered over the ranks, so the
# global step, not its split, decides every number (losses and the logged weight distribution).

MLP_TEACHER = (
    "model: {{arch: mlp, mlp: {{hidden: {hidden}, dropout: 0.0}}}}, "
    "train: {{steps: 6, batch_size: 32, warmup_steps: 1, log_every: 1}}"
)
TWO = (
    f"teachers=[{{name: narrow, {MLP_TEACHER.format(hidden='[16]')}}}, "
    f"{{name: wide, {MLP_TEACHER.format(hidden='[64, 64]')}}}]"
)


@pytest.fixture(scope="module")
def two(args):
    """test_dist's tiny MNIST-1D job (2 micro-batches of 16 per student step) with two MLP teachers (no
    dropout, no BatchNorm) instead of its one, entropy-weighted, with the adaptive KD weight; its feature
    phase aligns with teacher wide."""

    def make(output_dir: Path, *extra: str) -> list[str]:
        mine = [TWO, "distill.feature_teacher=wide", "distill.combine.rule=entropy", "distill.adaptive.tau=0.5", *extra]
        return [a for a in args(output_dir, *mine) if not a.startswith(("teacher.", "distill.feature_layers"))]

    return make


def test_two_ranks_distill_from_two_teachers_with_the_adaptive_weight_as_one(two, tmp_path):
    reference = tmp_path / "one"
    assert main(["run", *two(reference)]) == 0
    given = [f"teachers.{n}.model.checkpoint={reference / 'teachers' / n / 'teacher'}" for n in ("narrow", "wide")]
    out = tmp_path / "two"
    ranks = launch(["distill", *two(out, *given)])
    assert all(rc == 0 for rc, _, _ in ranks), [err[-2000:] for _, _, err in ranks]
    want = metrics(reference, "student")
    assert any("kd_position_weight_p90" in r for r in want)
    assert_same_metrics(metrics(out, "student"), want)
