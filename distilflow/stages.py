"""Stage mechanics shared by every list of stages (distilflow/pipeline.py, distilflow/reasoning.py).

A stage (teacher, baseline, student, a reasoning method) lives in ``<run_dir>/<stage>/``: its
checkpoint while it trains, then ``model.safetensors``, what the workload saves beside it and
``result.json``. :func:`load_finished` reuses a finished stage, :func:`train_stage` runs the loop
(which resumes an unfinished one from its checkpoint) with the stage's metrics log, and
:func:`finish_stage` writes the finished stage. :func:`stage_loss_impl` decides ``distill.loss_impl``
once per stage; :func:`supervised_objective` and :func:`distill_objective` build the objectives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from distilflow.config import Config, DistillConfig, TrainConfig, config_from_dict, read_yaml, to_dict
from distilflow.errors import UserError
from distilflow.losses.aligned_kd import AlignedKD
from distilflow.losses.objective import Objective, choose_loss_impl
from distilflow.models.build import load_weights
from distilflow.models.layers import LayerPair
from distilflow.models.taps import Taps
from distilflow.schedules import Phase, phase_boundaries
from distilflow.teachers.base import TeacherSignals
from distilflow.train import dist
from distilflow.train.checkpoint import HEADS, WEIGHTS, write_json, write_text, write_weights
from distilflow.train.diagnostics import StepWatch, pair_name
from distilflow.train.kd_position import PositionWeights
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import FitResult, Task, fit
from distilflow.workload import Workload

RESULT = "result.json"
CONFIG = "config.yaml"
# Keys a run folder's saved config may differ in (besides deploy.* and dist.*): see check_output_dir.
NOT_COMPARED = ("output_dir", "teacher.server.url", "teacher.server.timeout_s", "teacher.server.max_retries")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix]


def check_output_dir(cfg: Config) -> None:
    """The output folder is new, or holds a run of this same config (so its stages may be reused or
    resumed); else one line, before anything is written. Keys that do not change what is trained are
    not compared: ``deploy.*`` (a finished run may be re-exported and re-quantized with other
    settings; the saved config then records the latest), ``dist.*`` (any world size and strategy
    resumes a run), ``diagnostics.*`` and ``report.*`` (they judge the training, not change it), ``output_dir`` (where
    the folder is: a run folder given to eval, or moved) and where a served teacher answers and how
    patiently (``teacher.server.url`` / ``timeout_s`` / ``max_retries``: the same served model may move
    to another host between a stopped run and its resumption)."""
    run_dir = cfg.run_dir
    # A symbolic link is followed (the run writes where it points); one that points nowhere is refused.
    dangling = next((p for p in (run_dir, *run_dir.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:
        raise UserError(
            f"output_dir '{run_dir}': '{dangling}' is a symbolic link to '{dangling.readlink()}', which does not "
            "exist; create that folder or choose another output_dir"
        )
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"output_dir '{run_dir}': '{blocking}' is a file, not a folder; choose another output_dir")
    saved = run_dir / CONFIG
    if not saved.is_file():
        return
    # The saved config as this release reads it (a 0.1 folder's flat layout in sections, quietly).
    saved_tree = to_dict(config_from_dict(read_yaml(saved), where=f"config '{saved}'", quiet=True))
    diff = [
        key
        for key in _differences(saved_tree, to_dict(cfg))
        if not key.startswith(("deploy.", "dist.", "diagnostics.", "report.")) and key not in NOT_COMPARED
    ]
    if diff:
        raise UserError(
            f"output_dir '{run_dir}' holds a run with a different config (keys: {', '.join(diff[:6])}); "
            "choose another output_dir, or 'distilflow resume' it with its own config"
        )


def save_config(cfg: Config) -> None:
    """The resolved config as ``<run_dir>/config.yaml`` (rank 0 writes under torchrun)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    tree = to_dict(cfg)
    saved = cfg.run_dir / CONFIG
    # The same config is not written again (output_dir aside: where the folder is, not what it holds),
    # so a resumed run that then stops on bad input changes nothing.
    if dist.current().is_main and not (saved.is_file() and _same_run(read_yaml(saved), tree)):
        write_text(saved, yaml.safe_dump(tree, sort_keys=False))


def _same_run(saved: Any, tree: dict[str, Any]) -> bool:
    return isinstance(saved, dict) and {**saved, "output_dir": None} == {**tree, "output_dir": None}


@dataclass
class Run:
    """What the stages of one run share: the config, the workload (data, models, device) and the folder."""

    cfg: Config
    work: Workload
    views: list = field(default_factory=list)  # its teachers seen one by one (distilflow/teacher_views.py), made once

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage


def stage_loss_impl(
    cfg: Config, work: Workload, train: TrainConfig, models: list[nn.Module], vocab_size: int | None = None
) -> str:
    """``distill.loss_impl`` resolved once for a stage; its task and its objective get this one value.

    ``auto`` decides by the logit entries of one micro-batch of the global batch (``train``), so the
    choice does not depend on the number of processes. ``fused`` needs every model that runs
    through the stage's task (the student, and a live teacher) to compute its logits as
    ``lm_head(hidden)``; under ``auto`` a model that does not falls back to ``chunked``, an explicit
    ``fused`` is refused with one line.
    """
    positions, columns = work.logit_shape(models[0], vocab_size)
    micro = max(train.batch_size // max(train.grad_accum, 1), 1)
    setting = cfg.distill.loss_impl
    impl = choose_loss_impl(setting, rows=micro * positions, vocab_size=columns, hidden_states=work.per_token)
    if impl == "fused":
        problem = next((p for p in map(work.fused_problem, models) if p), None)
        if problem and setting == "fused":
            raise UserError(f"distill.loss_impl fused: {problem}; use distill.loss_impl=chunked or plain")
        if problem:
            impl = "chunked"
    return impl


def supervised_objective(total_steps: int, loss_impl: str, chunk_rows: int) -> Objective:
    """The teacher's and the baseline's objective: cross-entropy on the labels alone."""
    return Objective(
        [Phase("supervised", 0, total_steps, ("ce",))],
        total_steps=total_steps,
        ce_weight=1.0,
        loss_impl=loss_impl,
        chunk_rows=chunk_rows,
    )


def distill_objective(
    distill: DistillConfig,
    total_steps: int,
    *,
    loss_impl: str,
    per_token: bool,
    divergence: str | None = None,
    layer_weights: list[float] | None = None,
    heads: nn.ModuleList | None = None,
    aligned: AlignedKD | None = None,
) -> Objective:
    """The ``distill:`` section as the student's objective: its phases, terms, weights and schedule.

    ``divergence`` overrides ``distill.divergence`` (the reasoning demo's on-policy student uses
    ``jsd``); ``layer_weights`` and ``heads``: one per feature layer pair; ``aligned``: the KD term
    across tokenizers (the workload's ``aligned_kd``)."""
    return Objective(
        phase_boundaries(distill.phases, total_steps),
        total_steps=total_steps,
        kd_schedule=distill.kd_weight,
        temperature=distill.temperature,
        divergence=divergence or distill.divergence,
        jsd_beta=distill.jsd_beta,
        ce_weight=distill.ce_weight,
        feature_weight=distill.feature_weight,
        feature_loss=distill.feature_loss,
        layer_weights=layer_weights,
        heads=heads,
        per_token=per_token,
        loss_impl=loss_impl,
        chunk_rows=distill.loss_chunk_rows,
        aligned=aligned,
    )


def has_weights(folder: Path) -> bool:
    """Whether a stage folder holds the final weights of its stage (a trained teacher, baseline or student)."""
    return (folder / WEIGHTS).is_file()


def load_finished(run: Run, stage: str, model: nn.Module) -> dict | None:
    """The result of ``stage`` with its final weights loaded into ``model``, or None when it has not finished."""
    stage_dir = run.stage_dir(stage)
    if not (stage_dir / RESULT).is_file() or not (stage_dir / WEIGHTS).is_file():
        return None
    load_weights(model, stage_dir / WEIGHTS, stage)
    return json.loads((stage_dir / RESULT).read_text())


def train_stage(
    run: Run,
    stage: str,
    model: nn.Module,
    objective: Objective,
    task: Task,
    *,
    log_tensorboard: bool,
    teacher: TeacherSignals | None = None,
    student_taps: Taps | None = None,
    pairs: list[LayerPair] = (),
    kd_position: PositionWeights | None = None,
) -> FitResult:
    """Train ``model`` as ``stage`` (resuming its checkpoint) with the stage's metrics log (rank 0 writes)
    and its diagnostics (``diagnostics.*``; ``pairs``: the feature layer pairs, whose similarity is logged).

    The teacher stage trains by ``teacher.train``, every other stage by ``student.train``;
    ``kd_position``: the input-adaptive KD weight (``distill.adaptive``), None for the plain schedule."""
    train = run.cfg.teacher.train if stage == "teacher" else run.cfg.student.train
    watch = StepWatch(
        pair_names=[pair_name(p.student, p.teacher) for p in pairs],
        heads=objective.heads,
        per_token=task.per_token,
        spike_factor=run.cfg.diagnostics.spike_factor,
        spike_window=run.cfg.diagnostics.spike_window,
    )
    if dist.current().is_main:
        run.dir.mkdir(parents=True, exist_ok=True)  # a named teacher's view has its own folder
    log = MetricsLog(run.dir, stage, tensorboard=log_tensorboard) if dist.current().is_main else dist.NullLog()
    try:
        return fit(
            stage=stage,
            model=model,
            objective=objective,
            task=task,
            train=train,
            stage_dir=run.stage_dir(stage),
            log=log,
            config=to_dict(run.cfg),
            teacher=teacher,
            student_taps=student_taps,
            watch=watch,
            kd_position=kd_position,
        )
    finally:
        log.close()


def finish_stage(
    run: Run,
    stage: str,
    model: nn.Module,
    result: FitResult,
    heads: nn.Module | None = None,
    facts: dict | None = None,
) -> dict:
    """Write the finished ``stage``: final weights, projection heads (if any), what the workload saves
    beside them, and ``result.json`` (the evaluation, ``facts``, steps, time, throughput, peak memory),
    which it returns. Under torchrun rank 0 writes and the others wait."""
    stage_dir = run.stage_dir(stage)
    summary = {
        **result.metrics,
        **(facts or {}),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        f"train_{result.unit}_per_s": round(result.units_per_s, 1),
        "bad_steps": result.bad_steps,
        **result.memory,
    }
    world = dist.current()
    if world.is_main:
        write_weights(stage_dir / WEIGHTS, model.state_dict(), {"stage": stage})
        if heads is not None and len(list(heads.parameters())):
            write_weights(stage_dir / HEADS, heads.state_dict(), {"stage": stage})
        run.work.save(stage_dir, model)
        write_json(stage_dir / RESULT, summary)
    world.barrier(f"saving the {stage}")
    return summary
