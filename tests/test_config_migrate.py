"""Configs and run folders of distilflow 0.1 (the flat layout, main at 1481b0a) in the sectioned layout.

The fixtures are config.yaml files as the 0.1 release wrote them for the tiny runs of conftest.py
(every model kind's and data source's keys side by side): they are read with one stderr line, mean
what they meant, and a 0.1 run folder resumes with its finished stages reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distilflow import stages
from distilflow.cli import main
from distilflow.config import load_config, to_dict
from distilflow.config_migrate import migrate
from distilflow.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
STAGES = ("teacher", "baseline", "student")


def old_config(name: str, output_dir: Path, cache_dir: Path) -> str:
    text = (FIXTURES / f"config-0.1-tiny-{name}.yaml").read_text()
    return text.replace("@OUTPUT_DIR@", str(output_dir)).replace("@CACHE_DIR@", str(cache_dir))


def _sections(tree: dict) -> set[str]:
    return {f"{role}.model.{k}" for role in ("teacher", "student") for k in tree[role]["model"]} | {
        f"data.{k}" for k in tree["data"]
    }


def test_a_0_1_classifier_config_means_the_same_in_the_new_layout(tmp_path, mnist_cache, tiny_overrides, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(old_config("mnist1d", tmp_path / "run", mnist_cache))
    migrated = load_config(path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uses the flat 0.1 config layout" in err
    assert "teacher.model.channels -> teacher.model.cnn.channels" in err
    assert to_dict(migrated) == to_dict(load_config(None, tiny_overrides(tmp_path / "run")))
    assert capsys.readouterr().err == ""  # a config of the new layout says nothing
    tree = to_dict(migrated)
    assert _sections(tree) >= {"teacher.model.cnn", "student.model.mlp", "data.mnist1d"}
    assert not _sections(tree) & {"teacher.model.hf", "student.model.hf", "data.text", "data.stdlib", "data.files"}


def test_a_0_1_lm_config_keeps_lm_keys_only(tmp_path, tiny_lm_args, capsys):
    path = tmp_path / "old.yaml"
    path.write_text(old_config("stdlib", tmp_path / "run", tmp_path / "cache"))
    migrated = load_config(path)
    assert "uses the flat 0.1 config layout" in capsys.readouterr().err
    args = tiny_lm_args(tmp_path)
    assert to_dict(migrated) == to_dict(load_config(args[0], [*args[1:], "deploy.enabled=false"]))
    saved = yaml.safe_dump(to_dict(migrated))
    for other_kind in ("hidden:", "channels:", "kernel_size:", "num_samples:", "label_column:", "hf_config:"):
        assert other_kind not in saved, other_kind
    assert to_dict(migrated)["student"]["model"]["hf"]["config"]["hidden_size"] == 16


def test_an_old_key_keeps_its_meaning_and_old_and_new_together_are_refused(capsys):
    # 0.1's default feature pair is written out for an old config that relied on it: with three hidden
    # layers the new default would pair the last one (layers.5), 0.1 paired layers.3.
    cfg = load_config(None, ["student.model.hidden=[16, 16, 16]", "teacher.model.channels=[8]"])
    assert cfg.student.model.mlp.hidden == [16, 16, 16] and cfg.teacher.model.cnn.channels == [8]
    assert [(p.student, p.teacher) for p in cfg.distill.feature_layers] == [("layers.3", "pool")]
    assert "0.1's default [layers.3 -> pool]" in capsys.readouterr().err
    new = load_config(None, ["student.model.mlp.hidden=[16, 16, 16]"])
    assert [(p.student, p.teacher) for p in new.distill.feature_layers] == [("layers.5", "pool")]
    with pytest.raises(UserError, match=r"'student.model.hidden' \(the 0.1 layout\) and 'student.model.mlp.hidden'"):
        load_config(None, ["student.model.hidden=[8]", "student.model.mlp.hidden=[16]"])


def test_keys_of_kinds_not_in_use_are_dropped_not_moved():
    old = {
        "data": {"source": "text"},
        "student": {"model": {"arch": "hf", "hidden": [3], "path": "m", "dtype": "float32"}},
    }
    tree, notes = migrate(old)
    assert tree == {"data": {"source": "text"}, "student": {"model": {"arch": "hf", "hf": {"path": "m"}}}}
    assert notes["moved"] == ["student.model.path -> student.model.hf.path"]
    assert sorted(notes["dropped"]) == ["student.model.dtype", "student.model.hidden"]
    assert migrate({"student": {"model": {"arch": "mlp", "mlp": {"hidden": [3]}}}})[1] == {"moved": [], "dropped": []}


def test_a_0_1_run_folder_resumes_with_its_finished_stages_reused(
    tmp_path, mnist_cache, tiny_overrides, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    assert main(["run", *tiny_overrides(run_dir), "--no-tensorboard"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    weights = {stage: (run_dir / stage / "model.safetensors").read_bytes() for stage in STAGES}
    (run_dir / "config.yaml").write_text(old_config("mnist1d", run_dir, mnist_cache))  # as 0.1 wrote it
    capsys.readouterr()

    def no_training(**kwargs):
        raise AssertionError(f"stage {kwargs['stage']} trained again")

    monkeypatch.setattr(stages, "fit", no_training)
    assert main(["resume", str(run_dir), "--no-tensorboard"]) == 0
    err = capsys.readouterr().err
    assert err.count("flat 0.1 config layout") == 1 and "error" not in err
    again = json.loads((run_dir / "results.json").read_text())
    assert {s: again[s]["accuracy"] for s in STAGES} == {s: results[s]["accuracy"] for s in STAGES}
    assert {stage: (run_dir / stage / "model.safetensors").read_bytes() for stage in STAGES} == weights
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # rewritten in the new layout
    assert saved["student"]["model"]["mlp"]["hidden"] == [32, 32] and "hidden" not in saved["student"]["model"]
    # The same folder given another config is refused with one line (before anything is written).
    assert main(["run", *tiny_overrides(run_dir), "student.train.steps=11", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with a different config (keys: student.train.steps)" in err
