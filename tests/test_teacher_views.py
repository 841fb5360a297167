"""teacher_views.stand_in: what stands in for a teacher's model in distill, eval and cache-teacher."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

import distilflow.data.cache as cache_mod
import distilflow.teacher_views as teacher_views
from distilflow.errors import UserError
from distilflow.teacher_views import check_teacher_weights, known_by_cache, stand_in

COMMANDS = ("distill", "eval", "cache-teacher")


def teacher_cfg(run_dir: Path, *, use=False, server=False, given=False, init_from_teacher=False):
    """The fields of a (view's) config that the rule reads, and nothing else."""
    return types.SimpleNamespace(
        cache=types.SimpleNamespace(use=use),
        student=types.SimpleNamespace(model=types.SimpleNamespace(init_from_teacher=init_from_teacher)),
        teacher=types.SimpleNamespace(
            server=object() if server else None, model=types.SimpleNamespace(pretrained="ckpt" if given else None)
        ),
        run_dir=run_dir,
    )


@pytest.fixture
def complete(monkeypatch):
    """Whether the teacher's cache is finished, set by the test (no cache folder written)."""
    state = {"complete": False}

    def cache_complete(_cfg):
        return state["complete"]

    monkeypatch.setattr(cache_mod, "cache_complete", cache_complete)  # what reads_cache reads
    monkeypatch.setattr(teacher_views, "cache_complete", cache_complete)
    return state


def kinds(cfg, own_cache=False):
    return [stand_in(cfg, command, own_cache=own_cache) for command in COMMANDS]


def test_a_model_here_or_a_server(tmp_path, complete):
    assert kinds(teacher_cfg(tmp_path)) == [None, None, None]
    assert kinds(teacher_cfg(tmp_path, server=True)) == ["server"] * 3
    # Writing the cache (not complete yet): distill loads the model, or asks the server.
    assert kinds(teacher_cfg(tmp_path, use=True)) == [None, None, None]
    assert kinds(teacher_cfg(tmp_path, use=True, server=True)) == ["server"] * 3


def test_a_complete_cache_stands_in_for_distill_only(tmp_path, complete):
    complete["complete"] = True
    assert kinds(teacher_cfg(tmp_path, use=True)) == ["cache", None, None]
    assert kinds(teacher_cfg(tmp_path, use=True, server=True)) == ["cache", "server", "server"]
    # student init_from_teacher copies teacher layers: the model is loaded whatever the cache holds.
    assert kinds(teacher_cfg(tmp_path, use=True, init_from_teacher=True)) == [None, None, None]


def test_a_named_teacher_known_by_its_own_cache_alone(tmp_path, complete):
    complete["complete"] = True
    cfg = teacher_cfg(tmp_path, use=True, init_from_teacher=True)  # init_from_teacher: not read by distill
    assert known_by_cache(cfg, own_cache=True) and kinds(cfg, own_cache=True) == ["cache"] * 3
    assert kinds(cfg, own_cache=False) == [None] * 3  # the run's cache folder: a model must be here
    assert kinds(teacher_cfg(tmp_path, use=True, given=True, init_from_teacher=True), own_cache=True) == [None] * 3
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"")  # trained in its folder: it has a model
    assert not known_by_cache(cfg, own_cache=True) and kinds(cfg, own_cache=True) == [None] * 3
    complete["complete"] = False
    (tmp_path / "teacher" / "model.safetensors").unlink()
    assert kinds(cfg, own_cache=True) == [None] * 3


def test_a_teacher_to_load_is_given_or_trained_already(tmp_path):
    check_teacher_weights(teacher_cfg(tmp_path, given=True), None)
    with pytest.raises(UserError) as info:
        check_teacher_weights(teacher_cfg(tmp_path), "big")
    assert str(info.value) == (
        f"no teacher 'big' in '{tmp_path / 'teacher'}'; run 'distilflow train-teacher' with this config first, or "
        "set teachers.big.model.checkpoint=PATH (or teachers.big.model.hf.path for a Hugging Face folder)"
    )
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"")
    check_teacher_weights(teacher_cfg(tmp_path), None)
