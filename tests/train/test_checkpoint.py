"""Checkpoints: atomic writes, safe reads, weights from safetensors or checkpoints."""

from __future__ import annotations

import errno
import io
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distilflow.errors import UserError
from distilflow.storage import WriteFailed
from distilflow.train import checkpoint
from distilflow.train.checkpoint import (
    CHECKPOINT,
    WEIGHTS,
    DamagedCheckpoint,
    digest,
    read_checkpoint,
    read_model_state,
    write_checkpoint,
    write_json,
    write_weights,
)


def _state(value: float) -> dict:
    return {
        "stage": "student",
        "step": int(value),
        "model": {"layer.weight": torch.full((3, 2), value), "layer.bias": torch.arange(3.0)},
        "rng": {"torch": torch.get_rng_state()},
    }


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "stage" / CHECKPOINT  # the folder is created
    written = _state(2.0)
    write_checkpoint(path, written)
    state = read_checkpoint(path)
    assert state["format"] == checkpoint.FORMAT
    assert state["step"] == 2 and state["stage"] == "student"
    assert torch.equal(state["model"]["layer.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(state["rng"]["torch"], written["rng"]["torch"])


def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    write_checkpoint(path, _state(1.0))
    before = path.read_bytes()
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(WriteFailed, match=f"writing '{path}' failed: no space left on device .ENOSPC., .* free there"):
        write_checkpoint(path, _state(5.0))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1


def test_interrupt_during_write_is_cleaned_up_too(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(path, _state(1.0))
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "results.json", {"a": 1})
    write_checkpoint(tmp_path / CHECKPOINT, _state(1.0))
    write_weights(tmp_path / WEIGHTS, {"w": torch.ones(2)})
    for name in ("results.json", CHECKPOINT, WEIGHTS):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_read_checkpoint_rejects_a_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="does not exist") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all\n", b"PK\x03\x04" + b"\x00" * 64],
    ids=["empty", "text", "broken-zip"],
)
def test_read_checkpoint_rejects_garbage(tmp_path, content):
    path = tmp_path / CHECKPOINT
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_read_checkpoint_rejects_a_truncated_checkpoint(tmp_path):
    path = tmp_path / CHECKPOINT
    write_checkpoint(path, _state(1.0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "obj",
    [
        {"model": {"w": torch.ones(2)}},  # no format
        {"format": 99, "model": {"w": torch.ones(2)}},  # a future format
        {"format": checkpoint.FORMAT, "step": 3},  # no model
        [torch.ones(2)],  # not a mapping
        torch.ones(2),
    ],
    ids=["no-format", "other-format", "no-model", "list", "tensor"],
)
def test_read_checkpoint_rejects_foreign_torch_files(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match="not a distilflow checkpoint") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_a_truncated_checkpoint_is_refused_at_every_length(tmp_path):
    path = tmp_path / CHECKPOINT
    write_checkpoint(path, _state(1.0))
    data = path.read_bytes()
    for length in sorted({0, 1, 22, len(data) - 1, *range(0, len(data), max(len(data) // 40, 1))}):
        path.write_bytes(data[:length])
        with pytest.raises(DamagedCheckpoint):
            read_checkpoint(path)


def test_an_altered_byte_is_refused_or_changes_nothing(tmp_path):
    """Any single flipped bit: either the read refuses the file, or what it returns is exactly what was
    written (a flip in zip padding or headers that torch ignores). Positions: every byte of the tensor
    data, and 300 random ones elsewhere (each read takes milliseconds; every position took 30 s)."""
    path = tmp_path / CHECKPOINT
    write_checkpoint(path, _state(7.0))
    written = read_checkpoint(path)
    data = path.read_bytes()
    weights = written["model"]["layer.weight"].numpy().tobytes()
    at = data.index(weights)  # torch stores the tensor's bytes as they are
    positions = set(range(at, at + len(weights))) | set(random.Random(0).sample(range(len(data)), 300))
    refused = 0
    for i in sorted(positions):
        altered = bytearray(data)
        altered[i] ^= 0x10
        path.write_bytes(bytes(altered))
        try:
            state = read_checkpoint(path)
        except DamagedCheckpoint:
            refused += 1
            continue
        assert digest(state) == digest(written), f"byte {i} changed a value unnoticed"
    assert refused >= len(weights)  # every flip inside the weights was caught (torch alone loads them)


def test_a_checkpoint_of_the_previous_release_without_a_digest_is_read(tmp_path):
    path = tmp_path / CHECKPOINT
    torch.save({"format": 1, **_state(3.0)}, path)  # exactly what the previous release wrote
    state = read_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["model"]["layer.weight"], torch.full((3, 2), 3.0))


def test_read_checkpoint_refuses_pickled_code(tmp_path):
    # weights_only loading: an arbitrary pickled object is refused, not executed.
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "payload": Path("/etc/passwd")}, path)
    with pytest.raises(UserError, match="not a readable distilflow checkpoint"):
        read_checkpoint(path)


def test_read_model_state_from_every_kind_of_source(tmp_path):
    weights = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3)}
    stage = tmp_path / "stage"
    write_weights(stage / WEIGHTS, weights, {"stage": "student"})
    write_checkpoint(stage / CHECKPOINT, {"step": 4, "model": {k: v * 2 for k, v in weights.items()}})

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same(read_model_state(stage / WEIGHTS, "student"), weights)
    assert same(read_model_state(stage / CHECKPOINT, "student"), {k: v * 2 for k, v in weights.items()})
    assert same(read_model_state(stage, "student"), weights)  # a stage folder: final weights first
    (stage / WEIGHTS).unlink()
    assert same(read_model_state(stage, "student"), {k: v * 2 for k, v in weights.items()})
    # A plain safetensors file written by someone else.
    other = tmp_path / "other.safetensors"
    save_file(weights, str(other))
    assert same(read_model_state(other, "teacher"), weights)


def test_read_model_state_errors_name_role_and_path(tmp_path):
    with pytest.raises(UserError, match="teacher weights") as info:
        read_model_state(tmp_path / "missing.safetensors", "teacher")
    assert "missing.safetensors" in str(info.value)
    with pytest.raises(UserError, match="teacher weights"):
        read_model_state(tmp_path, "teacher")  # a folder with neither file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors") as info:
        read_model_state(bad, "student")
    assert str(bad) in str(info.value)
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"junk")
    with pytest.raises(UserError) as info:
        read_model_state(garbage, "student")
    assert str(garbage) in str(info.value)
