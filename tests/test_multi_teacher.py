"""Several teachers, the adaptive KD weight and label-free students end to end through the CLI (tiny
MNIST-1D and npz classifiers, in-process): live equals cached, routing by a data column against the
routed teacher's own distribution, a teacher known by its cache alone, label-free runs that never read
a label, and the bad inputs that only the data or the models show (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distilflow.cli import main
from distilflow.teachers import multi

TEMPERATURE = 2.0
TEACHER_TRAIN = "train: {steps: 6, batch_size: 32, warmup_steps: 1, log_every: 2}"
TWO = (
    f"teachers=[{{name: cnn, model: {{arch: cnn1d, cnn: {{channels: [8, 8]}}}}, {TEACHER_TRAIN}}}, "
    f"{{name: wide, model: {{arch: mlp, mlp: {{hidden: [64]}}}}, {TEACHER_TRAIN}}}]"
)


@pytest.fixture(scope="module")
def tiny(tiny_overrides):
    """``tiny(out, *extra)``: the tiny MNIST-1D run with two teachers (a CNN and a wide MLP) instead of one."""

    def make(out: Path, *extra: str) -> list[str]:
        base = [o for o in tiny_overrides(out) if not o.startswith("teacher.")]
        return [*base, TWO, "distill.feature_teacher=cnn", "student.model.mlp.dropout=0.0", *extra, "--no-tensorboard"]

    return make


def no_tensorboard_flag(args: list[str]) -> list[str]:
    """``args`` for a command without ``--no-tensorboard`` (cache-teacher writes no training log)."""
    return [a for a in args if a != "--no-tensorboard"]


def metrics(run_dir: Path, stage: str = "student") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "loss" in r]


def same_losses(got: list[dict], want: list[dict], tol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key in ("loss", "kd", "ce", "feature", "kd_position_weight_p50"):
            if key in w:
                assert abs(g[key] - w[key]) <= tol * max(1.0, abs(w[key])), (w["step"], key, g[key], w[key])


@pytest.fixture(scope="module")
def live_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "run"
    assert main(["run", *tiny(out, "distill.combine.rule=entropy", "distill.adaptive.tau=1.0")]) == 0
    return out


def test_a_run_trains_each_teacher_in_its_folder_and_reports_them(live_run):
    results = json.loads((live_run / "results.json").read_text())
    assert set(results["teachers"]) == {"cnn", "wide"} and "teacher" not in results
    for name in ("cnn", "wide"):
        assert (live_run / "teachers" / name / "teacher" / "model.safetensors").is_file()
        assert 0.0 <= results["teachers"][name]["accuracy"] <= 1.0
    assert "teacher:wide" in (live_run / "report.md").read_text()
    rows = metrics(live_run)
    kd_rows = [r for r in rows if "kd" in r]
    assert kd_rows and all(r["kd_position_weight_mean"] == pytest.approx(1.0, rel=1e-6) for r in kd_rows)


def test_eval_scores_each_teacher_and_the_students_as_the_run_did(live_run, capsys):
    results = json.loads((live_run / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(live_run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["teacher:cnn", "teacher:wide", "baseline", "student"]
    scored = json.loads(lines[-1])
    for name in ("cnn", "wide"):
        assert scored["teachers"][name]["accuracy"] == pytest.approx(results["teachers"][name]["accuracy"], abs=1e-6)
    for stage in ("baseline", "student"):
        assert scored[stage]["accuracy"] == pytest.approx(results[stage]["accuracy"], abs=1e-6)


def test_two_cached_teachers_give_the_losses_of_two_live_ones(live_run, tiny, tmp_path):
    """The same two teachers (their checkpoints), read from full caches: every logged loss equal."""
    out = tmp_path / "cached"
    given = [f"teachers.{n}.model.checkpoint={live_run / 'teachers' / n / 'teacher'}" for n in ("cnn", "wide")]
    extra = ["distill.combine.rule=entropy", "distill.adaptive.tau=1.0", *given]
    caching = ["cache.use=true", "cache.format=full", "cache.features=true"]
    assert main(["cache-teacher", *no_tensorboard_flag(tiny(out, *extra, *caching))]) == 0
    assert (out / "teachers" / "cnn" / "teacher_cache" / "manifest.json").is_file()
    assert main(["distill", *tiny(out, *extra, *caching)]) == 0
    same_losses(metrics(out), metrics(live_run))


@pytest.fixture(scope="module")
def routed_files(tmp_path_factory):
    """A 4-class npz set of 40 features whose 'teacher' column names a teacher per row ('' = none)."""
    folder = tmp_path_factory.mktemp("routed")
    g = np.random.default_rng(0)
    centers = g.normal(size=(4, 40)) * 2

    def sample(n):
        y = g.integers(0, 4, n)
        return (centers[y] + g.normal(size=(n, 40))).astype(np.float32), y

    x, y = sample(96)
    names = np.array(["cnn", "wide", ""] * 32)
    np.savez(folder / "train.npz", x=x, y=y, teacher=names)
    tx, ty = sample(32)
    np.savez(folder / "test.npz", x=tx, y=ty)
    np.savez(folder / "unlabelled.npz", x=x, teacher=names)  # the same inputs, no labels
    np.savez(folder / "bad-route.npz", x=x, y=y, teacher=np.array(["cnn", "big"] * 48))
    return folder


def npz_args(tiny, out: Path, files: Path, *extra: str, train: str = "train.npz") -> list[str]:
    data = [
        "data.source=npz",
        "data.mnist1d=null",
        f"data.files.path={files / train}",
        f"data.files.test_path={files / 'test.npz'}",
        "data.teacher_column=teacher",
        "distill.phases=[{name: kd, fraction: 0.5, terms: [kd]}, {name: joint, fraction: 0.5, terms: [kd, ce]}]",
    ]
    return [a for a in tiny(out, *data, *extra) if not a.startswith("data.mnist1d.")]


def test_routing_sends_each_row_to_its_teacher_and_the_rest_to_the_rule(tiny, routed_files, tmp_path, monkeypatch):
    seen = []
    real = multi.MultiTeacher.__call__

    def spy(self, batch, *, features):
        out = real(self, batch, features=features)
        if len(seen) < 3:
            members = [o.logits for o in self.member_outputs(batch, features=False)]
            seen.append((batch["row"].clone(), [m.detach().double() for m in members], out.logits.log_probs_at()))
        return out

    monkeypatch.setattr(multi.MultiTeacher, "__call__", spy)
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                *npz_args(tiny, out, routed_files, "distill.combine.rule=weights", "distill.combine.weights=[1, 3]"),
            ]
        )
        == 0
    )
    names = np.load(routed_files / "train.npz")["teacher"]
    checked = {0: 0, 1: 0, -1: 0}
    for rows, members, mixed in seen:
        tempered = [torch.softmax(m / TEMPERATURE, -1) for m in members]
        for i, row in enumerate(rows.tolist()):
            route = {"cnn": 0, "wide": 1, "": -1}[str(names[row])]
            want = tempered[route][i] if route >= 0 else 0.25 * tempered[0][i] + 0.75 * tempered[1][i]
            torch.testing.assert_close(mixed[i].exp().double(), want, rtol=1e-5, atol=1e-7)
            checked[route] += 1
    assert min(checked.values()) > 0  # each case was seen


def test_a_route_naming_no_teacher_is_one_line_and_nothing_is_written(tiny, routed_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *npz_args(tiny, out, routed_files, train="bad-route.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "teacher column value 'big' names no teacher (teachers: cnn, wide)" in err
    assert not out.exists()


def test_teachers_of_different_label_spaces_are_refused_before_anything_is_written(tiny, tmp_path, capsys):
    other = (
        f"teachers=[{{name: cnn, model: {{arch: cnn1d, cnn: {{channels: [8, 8]}}}}, {TEACHER_TRAIN}}}, "
        f"{{name: odd, model: {{arch: 'torch.nn:Linear', factory: {{kwargs: {{in_features: 40, out_features: 12}}}}}}, "
        f"{TEACHER_TRAIN}}}]"
    )
    out = tmp_path / "run"
    assert main(["run", *tiny(out), other]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "teachers score different label spaces (cnn 10, odd 12; the student 10 classes)" in err
    assert not out.exists()


def test_a_teacher_known_by_its_cache_alone_is_neither_trained_nor_loaded(live_run, tiny, tiny_overrides, tmp_path):
    """Teacher 'wide' is only a cache folder written by a one-teacher config; the run reads it there."""
    cache = tmp_path / "wide-cache"
    one = [
        *tiny_overrides(tmp_path / "one"),
        "teacher.model.arch=mlp",
        "teacher.model.cnn=null",
        "teacher.model.mlp.hidden=[64]",
        f"teacher.model.checkpoint={live_run / 'teachers' / 'wide' / 'teacher'}",
        "cache.use=true",
        "cache.format=full",
        f"cache.path={cache}",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",  # wide is not the feature teacher
    ]
    assert main(["cache-teacher", *one]) == 0
    out = tmp_path / "run"
    own = [f"teachers.wide.cache={cache}", "cache.format=full"]
    args = tiny(out, *own, "distill.combine.rule=entropy", "distill.adaptive.tau=1.0")
    assert main(["run", *args]) == 0
    assert not (out / "teachers" / "wide" / "teacher").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["teachers"]["wide"]["from_cache"] == str(cache) and "accuracy" not in results["teachers"]["wide"]
    # The same signals as the live run (cnn trained again here from the same seed): the same losses.
    same_losses(metrics(out), metrics(live_run))


def test_a_label_free_student_of_unlabelled_inputs_never_reads_a_label(tiny, routed_files, tmp_path, labels_read):
    """The training file has no 'y' at all; the teachers are given; the run has no baseline and no CE."""
    # The npz teachers must fit the npz features (40) and classes (4): train them on the labelled file first.
    labelled = tmp_path / "labelled"
    assert main(["train-teacher", *npz_args(tiny, labelled, routed_files)]) == 0
    labels_seen = labels_read()  # from here on: the label-free run alone
    out = tmp_path / "run"
    given = [f"teachers.{n}.model.checkpoint={labelled / 'teachers' / n / 'teacher'}" for n in ("cnn", "wide")]
    extra = [*given, "distill.label_free=true", "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]"]
    assert main(["run", *npz_args(tiny, out, routed_files, *extra, train="unlabelled.npz")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "baseline" not in results and 0.0 <= results["student"]["accuracy"] <= 1.0
    assert labels_seen and not any(labels_seen)
    assert all("ce" not in r for r in metrics(out))


def test_a_teacher_trained_on_unlabelled_data_is_refused(tiny, routed_files, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["distill.label_free=true", "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]"]
    assert main(["run", *npz_args(tiny, out, routed_files, *extra, train="unlabelled.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "teacher 'cnn' would be trained here, but the training data holds no labels" in err
    assert not out.exists()


def test_a_label_free_mnist1d_student_sees_no_label_and_trains(tiny, tmp_path, labels_read):
    labels_seen = labels_read()
    out = tmp_path / "run"
    extra = [
        "distill.label_free=true",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]",
        "distill.adaptive.tau=1",
    ]
    assert main(["run", *tiny(out, *extra)]) == 0
    student_calls = labels_seen[-10:]  # the last stage trained is the student's (10 steps, 1 micro-batch)
    assert not any(student_calls) and any(labels_seen[:-10])  # the teachers and the baseline read labels
    assert all("ce" not in r and "kd" in r for r in metrics(out))
