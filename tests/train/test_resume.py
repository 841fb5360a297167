"""Which checkpoint a stage resumes from: keep_last older ones, a damaged latest one set aside for the
previous good one (truncated, a flipped byte, deleted), stale temporary files removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distilflow.config import TrainConfig
from distilflow.errors import UserError
from distilflow.losses.objective import Objective
from distilflow.models.zoo import MLP
from distilflow.schedules import Phase
from distilflow.tasks.classify import ClassifierTask
from distilflow.train.checkpoint import CHECKPOINT, read_checkpoint, write_checkpoint
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit
from distilflow.train.resume import StageCheckpoints, older_name

CPU = torch.device("cpu")
WIDTH, CLASSES, STEPS = 12, 3, 8


def _state(step: int) -> dict:
    return {"stage": "student", "step": step, "model": {"w": torch.full((2,), float(step))}, "rng": {}}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_keep_last_checkpoints_are_kept(tmp_path, keep_last):
    checkpoints = StageCheckpoints(tmp_path, keep_last=keep_last)
    for step in range(1, 6):
        checkpoints.save(step, _state(step))
    older = [older_name(step) for step in range(5 - keep_last + 1, 5)]
    assert _names(tmp_path) == sorted([CHECKPOINT, *older])
    assert read_checkpoint(tmp_path / CHECKPOINT)["step"] == 5
    for name in older:
        step = int(name.split("-")[1].split(".")[0])
        assert read_checkpoint(tmp_path / name)["step"] == step


def test_lowering_keep_last_removes_the_surplus_once_the_new_one_is_written(tmp_path):
    checkpoints = StageCheckpoints(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        checkpoints.save(step, _state(step))
    again = StageCheckpoints(tmp_path, keep_last=1)
    assert again.load()["step"] == 3
    again.save(4, _state(4))
    assert _names(tmp_path) == [CHECKPOINT]


def _flip_a_weight(path: Path) -> None:
    data = bytearray(path.read_bytes())
    weights = next(iter(read_checkpoint(path)["model"].values())).numpy().tobytes()
    data[data.index(weights) + 1] ^= 0x01  # an altered weight: torch alone would load it without a word
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "flipped-byte": _flip_a_weight,
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_one(tmp_path, capsys, damage):
    checkpoints = StageCheckpoints(tmp_path, keep_last=2)
    checkpoints.save(2, _state(2))
    checkpoints.save(4, _state(4))
    DAMAGE[damage](tmp_path / CHECKPOINT)
    again = StageCheckpoints(tmp_path, keep_last=2)
    state = again.load()
    assert state["step"] == 2 and again.good == tmp_path / older_name(2)
    lines = capsys.readouterr().err.strip().splitlines()
    if damage == "deleted":
        assert lines == []  # nothing damaged to report: the newest one left is used
    else:
        assert len(lines) == 1
        assert lines[0].startswith(f"distilflow: checkpoint '{tmp_path / CHECKPOINT}' ")
        assert f"resuming from '{tmp_path / older_name(2)}' (step 2) instead" in lines[0]
        assert (tmp_path / (CHECKPOINT + ".damaged")).is_file()  # set aside, not deleted
    # The next save rotates correctly from there.
    again.save(3, _state(3))
    assert read_checkpoint(tmp_path / CHECKPOINT)["step"] == 3
    assert read_checkpoint(tmp_path / older_name(2))["step"] == 2


def test_no_good_checkpoint_left_is_one_line(tmp_path):
    checkpoints = StageCheckpoints(tmp_path, keep_last=2)
    checkpoints.save(2, _state(2))
    checkpoints.save(4, _state(4))
    for path in (tmp_path / CHECKPOINT, tmp_path / older_name(2)):
        DAMAGE["truncated"](path)
    with pytest.raises(UserError, match=r"\(and 1 older checkpoints are damaged too\); no good checkpoint is left"):
        StageCheckpoints(tmp_path).load()


def test_temporary_files_of_a_killed_write_are_removed(tmp_path):
    write_checkpoint(tmp_path / CHECKPOINT, _state(1))
    stale = tmp_path / f".{CHECKPOINT}.abcd1234.tmp"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    mine = tmp_path / "notes.tmp"  # not a temporary file of ours
    mine.write_text("keep")
    assert StageCheckpoints(tmp_path).load()["step"] == 1
    assert not stale.exists() and mine.exists()


# ---------------------------------------------------------------- through the loop


def _task(kill_at: int | None = None) -> ClassifierTask:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, WIDTH, generator=g), torch.randint(0, CLASSES, (48,), generator=g)
    task = ClassifierTask(x, y, test_x=x[:8], test_y=y[:8], batch_size=8, grad_accum=1, seed=3, device=CPU)
    if kill_at is not None:
        original = task.micro_batches

        def micro_batches(step: int):
            if step >= kill_at:
                raise KeyboardInterrupt  # stands in for a kill at the start of this step
            return original(step)

        task.micro_batches = micro_batches
    return task


def _fit(run_dir: Path, task: ClassifierTask) -> MLP:
    torch.manual_seed(0)
    model = MLP((WIDTH,), CLASSES, [16], dropout=0.2)  # dropout: the restored RNG state matters
    train = TrainConfig(steps=STEPS, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, log_every=1,
                        checkpoint_every=2, keep_last=2)  # fmt: skip
    objective = Objective([Phase("supervised", 0, STEPS, ("ce",))], total_steps=STEPS, ce_weight=1.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, "student", tensorboard=False)
    try:
        fit(stage="student", model=model, objective=objective, task=task, train=train,
            stage_dir=run_dir / "student", log=log, config={})  # fmt: skip
    finally:
        log.close()
    return model


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resuming_from_the_previous_checkpoint_is_exact_too(tmp_path, damage):
    """Killed at step 7 (checkpoints of steps 4 and 6 on disk), the latest damaged: the stage resumes from
    step 4 and ends with the weights and metrics rows of an uninterrupted run."""
    straight = _fit(tmp_path / "straight", _task())
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", _task(kill_at=7))
    folder = tmp_path / "killed" / "student"
    assert _names(folder) == sorted([CHECKPOINT, older_name(4)])
    DAMAGE[damage](folder / CHECKPOINT)
    resumed = _fit(tmp_path / "killed", _task())
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight")


def _as_previous_release(path: Path) -> None:
    """The checkpoint as the previous release wrote it: format 1, no digest, no bad-step counts, and
    no older checkpoints beside it (keep_last did not exist)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    del state["digest"], state["bad_steps"]
    torch.save({**state, "format": 1}, path)
    for older in path.parent.glob("checkpoint-*.pt"):
        older.unlink()


def test_a_checkpoint_of_the_previous_release_resumes_exactly(tmp_path):
    straight = _fit(tmp_path / "straight", _task())
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", _task(kill_at=7))
    _as_previous_release(tmp_path / "killed" / "student" / CHECKPOINT)
    assert read_checkpoint(tmp_path / "killed" / "student" / CHECKPOINT)["format"] == 1
    resumed = _fit(tmp_path / "killed", _task())
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight")
    assert read_checkpoint(tmp_path / "killed" / "student" / CHECKPOINT)["format"] == 2  # rewritten as format 2
