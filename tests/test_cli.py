"""The CLI end to end on a tiny MNIST-1D run: results, reuse, resume, eval, and clean errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distilflow import stages
from distilflow.cli import main
from distilflow.config import Config

STAGES = ("teacher", "baseline", "student")
ERROR = "distilflow: error: "


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_overrides) -> tuple[Path, list[str]]:
    """A finished tiny run (in-process), shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    args = tiny_overrides(run_dir)
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return run_dir, args


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_results(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    for stage in STAGES:
        r = results[stage]
        assert 0.0 <= r["accuracy"] <= 1.0, stage
        assert isinstance(r["params"], int) and r["params"] > 0, stage
        assert isinstance(r["macs"], int) and r["macs"] > 0, stage
    assert results["baseline"]["params"] == results["student"]["params"]
    assert results["student"]["steps"] == 10 and results["teacher"]["steps"] == 6
    assert results["wall_seconds"] > 0
    rows = _rows(run_dir)
    assert {r["stage"] for r in rows} == set(STAGES)
    student_steps = [r["step"] for r in rows if r["stage"] == "student" and "loss" in r]
    assert student_steps == list(range(1, 11))  # log_every=1, each step once
    phases = [r["phase"] for r in rows if r["stage"] == "student" and "loss" in r]
    assert phases == ["feature_alignment"] * 2 + ["soft_label_pretrain"] * 5 + ["joint_optimization"] * 3
    report = (run_dir / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (run_dir / png).stat().st_size > 1000, png
    assert len(re.findall(r"\.png\)", report)) >= 3
    for stage in STAGES:
        assert (run_dir / stage / "model.safetensors").is_file()
    assert (run_dir / "student" / "heads.safetensors").is_file()
    return results


def test_run_writes_results_metrics_and_report(finished_run):
    run_dir, _ = finished_run
    results = _check_results(run_dir)
    # The saved final weights are the ones that were scored.
    assert results["student"]["accuracy"] == json.loads((run_dir / "student" / "result.json").read_text())["accuracy"]
    assert not (run_dir / "tensorboard").exists()  # --no-tensorboard


def test_subprocess_run(tmp_path, tiny_overrides, finished_run):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "distilflow", "run", *tiny_overrides(run_dir), "--no-tensorboard"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error" not in proc.stderr
    results = _check_results(run_dir)
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+{results[stage]['accuracy']:.4f}\s", proc.stdout, re.M), proc.stdout
    # Same config, another process: the same numbers (threads=1, CPU).
    reference = json.loads((finished_run[0] / "results.json").read_text())
    for stage in STAGES:
        assert results[stage]["accuracy"] == reference[stage]["accuracy"], stage


def test_second_run_reuses_finished_stages(finished_run, monkeypatch, capsys):
    run_dir, args = finished_run
    before = {stage: (run_dir / stage / "model.safetensors").read_bytes() for stage in STAGES}
    metrics = (run_dir / "metrics.jsonl").read_text()
    accuracy = {s: json.loads((run_dir / "results.json").read_text())[s]["accuracy"] for s in STAGES}

    def no_training(**kwargs):
        raise AssertionError(f"stage {kwargs['stage']} trained again")

    monkeypatch.setattr(stages, "fit", no_training)
    assert main(["run", *args, "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert (run_dir / stage / "model.safetensors").read_bytes() == before[stage]
        assert f"{accuracy[stage]:.4f}" in out
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    results = json.loads((run_dir / "results.json").read_text())
    assert {s: results[s]["accuracy"] for s in STAGES} == accuracy


def test_run_with_another_config_into_the_same_folder_is_refused(finished_run, capsys):
    run_dir, args = finished_run
    saved = (run_dir / "config.yaml").read_text()
    assert main(["run", *args, "student.train.lr=0.01", "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1
    assert "student.train.lr" in err and str(run_dir) in err
    assert (run_dir / "config.yaml").read_text() == saved


def test_eval_prints_the_accuracies_of_the_run(finished_run, capsys):
    run_dir, args = finished_run
    results = json.loads((run_dir / "results.json").read_text())
    assert main(["eval", *args]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])
    assert set(printed) == set(STAGES)
    for stage in STAGES:
        assert printed[stage]["accuracy"] == results[stage]["accuracy"], stage
        assert printed[stage]["params"] == results[stage]["params"]
        assert re.search(rf"^{stage}\s+{results[stage]['accuracy']:.4f}\s", out, re.M)
    assert main(["eval", *args, "--model", "student"]) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"student"}


def test_resume_continues_an_interrupted_run_bit_exactly(finished_run, tmp_path, tiny_overrides, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_fit = stages.fit

    def interrupted_fit(**kwargs):
        if kwargs["stage"] == "student":
            task = kwargs["task"]
            real_batches = task.micro_batches

            def micro_batches(step):
                if step == 6:  # Ctrl-C during step 7; the last checkpoint is at step 4
                    raise KeyboardInterrupt
                return real_batches(step)

            task.micro_batches = micro_batches
        return real_fit(**kwargs)

    monkeypatch.setattr(stages, "fit", interrupted_fit)
    assert main(["run", *tiny_overrides(run_dir), "--no-tensorboard"]) == 130
    assert "distilflow resume" in capsys.readouterr().err
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "student" / "model.safetensors").exists()
    assert torch.load(run_dir / "student" / "checkpoint.pt", weights_only=True)["step"] == 4

    monkeypatch.setattr(stages, "fit", real_fit)
    assert main(["resume", str(run_dir), "--no-tensorboard"]) == 0
    _check_results(run_dir)  # each student step logged once
    # The same weights as the run that was never interrupted.
    for stage in STAGES:
        resumed = load_file(str(run_dir / stage / "model.safetensors"))
        reference = load_file(str(finished_run[0] / stage / "model.safetensors"))
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), stage


def test_resume_of_a_copied_run_folder_writes_in_the_copy_only(finished_run, tmp_path):
    """The saved config names the original folder as output_dir; resume FOLDER resumes FOLDER."""
    import hashlib
    import shutil

    original = finished_run[0]

    def files(root: Path) -> dict[str, tuple[int, str]]:
        return {
            str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    before = files(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "student")
    (copy / "results.json").unlink()
    assert main(["resume", str(copy), "--no-tensorboard"]) == 0
    assert files(original) == before
    resumed, reference = (
        load_file(str(copy / "student" / "model.safetensors")),
        load_file(str(original / "student" / "model.safetensors")),
    )
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert (copy / "results.json").is_file()


def test_print_config_comments_every_top_level_key(capsys):
    assert main(["print-config"]) == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert re.search(rf"^{field.name}:.*#\s*\S", out, re.M), field.name
    # Not only the top level: every line of the output is a field with its description.
    assert all(" # " in line for line in out.splitlines() if line.strip())


def test_print_config_shows_overrides(capsys):
    assert main(["print-config", "student.train.steps=777", "student.model.mlp.hidden=[12, 34]"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+steps: 777\s+#", out, re.M)
    assert re.search(r"^\s+hidden: \[12, 34\]\s+#", out, re.M)


# ---------------------------------------------------------------- bad input: exit 2, one line


def _one_error(capsys, argv: list[str], *, only_line: bool = False) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    if only_line:
        assert len(lines) == 1, err
    errors = [line for line in lines if line.startswith("distilflow:")]
    assert len(errors) == 1 and errors[0].startswith(ERROR), err
    assert lines[-1] == errors[0]
    # Anything else on stderr is the progress display of stages that ran before the error.
    assert all(re.match(r"\[(teacher|baseline|student)\] ", line) for line in lines[:-1]), err
    return errors[0]


BEFORE_TRAINING = [
    (["student.train.stepz=3"], "unknown config key 'student.train.stepz'"),
    (["student.train.steps=abc"], "'student.train.steps': 'abc'"),
    (["distill.temperature=0"], "'distill.temperature': 0"),
    (
        ["distill.phases=[{name: a, fraction: 0.5, terms: [kd]}, {name: b, fraction: 0.4, terms: [ce]}]"],
        "sum to 0.9",
    ),
    (["data.source=npz", "data.mnist1d=null", "data.files.path=/nope.npz"], "/nope.npz"),
    (["data.source=npz", "data.files.path=/nope.npz"], "config key 'data.mnist1d': 'given' is not allowed"),
    (["--bogus"], "--bogus"),
]


@pytest.mark.parametrize(("extra", "expected"), BEFORE_TRAINING, ids=lambda v: str(v)[:40])
def test_bad_input_before_training(tmp_path, tiny_overrides, capsys, extra, expected):
    out = tmp_path / "run"
    line = _one_error(capsys, ["run", *tiny_overrides(out), *extra, "--no-tensorboard"], only_line=True)
    assert expected in line
    # Nothing was trained, and no half-made run folder blocks the corrected command.
    assert not (out / "config.yaml").exists()


def test_bad_input_is_one_line_even_without_any_output(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1 and "'bogus'" in err


DURING_RUN = [
    (["distill.feature_layers=[{student: nope, teacher: pool}]"], "student has no module 'nope'"),
    (
        ["student.model.arch=cnn1d", "student.model.mlp=null", "student.model.cnn.channels=[8, 8, 8]"]
        + ["distill.feature_layers=[{student: features.6, teacher: features.2}]"],
        "no projection head maps student shape (8, 20) onto teacher shape (8, 40)",
    ),
    # max_bad_steps 1: the first bad step stops (skipping and counting: tests/train/test_bad_steps.py).
    (["student.train.lr=1.0e+30", "student.train.max_bad_steps=1"], "baseline step 2: loss is nan"),
]


@pytest.mark.parametrize(("extra", "expected"), DURING_RUN, ids=["feature-path", "feature-shape", "nan-loss"])
def test_bad_input_found_during_the_run(tmp_path, tiny_overrides, capsys, extra, expected):
    line = _one_error(capsys, ["run", *tiny_overrides(tmp_path / "run"), *extra, "--no-tensorboard"])
    assert expected in line


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    line = _one_error(capsys, ["resume", str(tmp_path)], only_line=True)
    assert str(tmp_path) in line and "not a distilflow run folder" in line


def test_overrides_may_follow_options(tmp_path, tiny_overrides, capsys):
    # --no-tensorboard in the middle of the overrides: the rest still count as overrides.
    args = tiny_overrides(tmp_path / "run")
    line = _one_error(
        capsys, ["run", *args[:3], "--no-tensorboard", *args[3:], "distill.temperature=-1"], only_line=True
    )
    assert "'distill.temperature': -1" in line
    line = _one_error(capsys, ["eval", "--model", "student", *args, "--model", "nobody"], only_line=True)
    assert "'nobody'" in line


# ---------------------------------------------------------------- the new-user review (issue 7)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package on sys.path whose factories raise, or whose import raises."""
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "models.py").write_text(
        "def broken(input_shape, num_classes):\n    raise RuntimeError('CUDA kernel missing\\nsecond line')\n"
        "def data():\n    raise KeyError('x_test')\n"
    )
    (tmp_path / "userpkg" / "bad_import.py").write_text("raise ValueError('needs an env var')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userpkg"


PAIR = "[{student: layers.3, teacher: pool}]"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            # A model of your own has no default feature pair: name one.
            ["student.model.arch=userpkg.models:broken", "student.model.mlp=null", f"distill.feature_layers={PAIR}"],
            "student.model.arch 'userpkg.models:broken' failed when called with ['input_shape', 'num_classes']: "
            "RuntimeError: CUDA kernel missing",
        ),
        (
            ["data.source=userpkg.models:data", "data.mnist1d=null"],
            "data.source 'userpkg.models:data' failed when called: KeyError",
        ),
        (
            ["teacher.model.arch=userpkg.bad_import:f", "teacher.model.cnn=null", f"distill.feature_layers={PAIR}"],
            "importing 'userpkg.bad_import' raised ValueError: needs an",
        ),
    ],
    ids=["model-factory", "data-factory", "module-import"],
)
def test_a_user_factory_that_raises_is_one_line(tmp_path, tiny_overrides, capsys, user_module, extra, expected):
    out = tmp_path / "run"
    line = _one_error(capsys, ["run", *tiny_overrides(out), *extra, "--no-tensorboard"], only_line=True)
    assert expected in line
    assert not (out / "config.yaml").exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_overrides, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("my notes")
    for out in (blocker, blocker / "run"):
        line = _one_error(capsys, ["run", *tiny_overrides(out), "--no-tensorboard"], only_line=True)
        assert f"'{blocker}' is a file, not a folder" in line
    assert blocker.read_text() == "my notes"


def _pickle_that_writes(path: Path, marker: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 1, "model": Boom()}, path, _use_new_zipfile_serialization=True)


@pytest.mark.parametrize("kind", ["missing", "text", "pickle"])
def test_a_bad_teacher_checkpoint_is_refused_before_anything_is_written(tmp_path, tiny_overrides, capsys, kind):
    path, marker = tmp_path / "teacher.pt", tmp_path / "pwned"
    if kind == "text":
        path.write_text("not weights")
    elif kind == "pickle":
        _pickle_that_writes(path, marker)
    out = tmp_path / "run"
    line = _one_error(
        capsys, ["run", *tiny_overrides(out), f"teacher.model.checkpoint={path}", "--no-tensorboard"], only_line=True
    )
    assert str(path) in line
    assert not out.exists()  # not even config.yaml
    assert not marker.exists()  # the pickle did not run


def test_commands_accept_a_run_folder_even_moved(finished_run, tmp_path, capsys):
    import shutil

    run_dir, _ = finished_run
    results = json.loads((run_dir / "results.json").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert main(["eval", str(moved), "--model", "student"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["student"]["accuracy"] == results["student"]["accuracy"]
    assert main(["export", str(moved)]) == 0
    assert (moved / "deploy" / "student.onnx").is_file()
    assert not (run_dir / "deploy").exists()  # the copy was used, not the folder it came from
    line = _one_error(capsys, ["eval", str(tmp_path / "moved" / "student")], only_line=True)
    assert "is a folder without config.yaml" in line


def _subprocess(args: list[str], verbose: bool = False) -> subprocess.CompletedProcess:
    # No PYTHONWARNINGS: what the user sees on a plain terminal.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    extra = ["--verbose"] if verbose else []
    return subprocess.run(
        [sys.executable, "-m", "distilflow", *args, *extra], capture_output=True, text=True, timeout=300, env=env
    )


def test_an_lm_run_shows_only_our_lines(tmp_path, tiny_lm_args):
    args = ["run", *tiny_lm_args(tmp_path), "deploy.enabled=false", "--no-tensorboard"]
    proc = _subprocess(args)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.splitlines() if not re.match(r"\[(teacher|baseline|student)\] ", line)]
    assert noise == []
    # The plain progress lines of a log say how long it took and how long is left.
    assert re.search(r"^\[student\] 10/10 .* elapsed \d+:\d\d eta 0:00$", proc.stderr, re.M), proc.stderr
