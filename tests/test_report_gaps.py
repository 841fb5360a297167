"""How close a label-free student gets (results.json ``gaps``, report.md): tiny MNIST-1D and LM runs,
the gaps against numbers read back from each run's own results.json by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilflow.cli import main

KD_ONLY = "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]"


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def labelled(tiny_overrides, tmp_path_factory) -> Path:
    """A tiny MNIST-1D run trained longer than the label-free ones (so that their accuracies differ)."""
    out = tmp_path_factory.mktemp("gaps") / "labelled"
    longer = ["teacher.train.steps=40", "student.train.steps=40", "student.train.lr=0.01"]
    assert main(["run", *tiny_overrides(out), *longer, "--no-tensorboard"]) == 0
    return out


def test_a_labelled_run_without_compare_to_has_no_gaps(labelled):
    assert "gaps" not in results_of(labelled)
    assert "How close the student gets" not in (labelled / "report.md").read_text()


def test_a_label_free_classifier_is_measured_against_its_teacher_baseline_and_the_labelled_run(
    tiny_overrides, labelled, tmp_path
):
    out = tmp_path / "label_free"
    extra = ["distill.label_free=true", KD_ONLY, f"report.compare_to={labelled}"]
    assert main(["run", *tiny_overrides(out), *extra, "--no-tensorboard"]) == 0
    results, other = results_of(out), results_of(labelled)
    student = results["student"]["accuracy"]
    want = {
        "teacher": results["teacher"]["accuracy"],
        "baseline": results["baseline"]["accuracy"],  # MNIST-1D has labels: the baseline trains on them
        "compared run": other["student"]["accuracy"],
    }
    assert len(set(want.values()) | {student}) > 1  # some gap is not 0: a wrong sign or reference would show
    gaps = results["gaps"]
    assert gaps["metric"] == "accuracy" and gaps["label_free"] is True and gaps["student"] == student
    assert [r["name"] for r in gaps["references"]] == list(want)
    for reference in gaps["references"]:
        value = want[reference["name"]]
        assert reference["accuracy"] == value
        assert reference["behind_points"] == pytest.approx(100.0 * (value - student), abs=1e-9)
    assert gaps["references"][-1]["run"] == str(labelled)
    report = (out / "report.md").read_text()
    assert "## How close the student gets" in report and "Label-free run" in report
    row = f"| compared run (`{labelled}`) | {want['compared run']:.4f} | {student:.4f} | "
    assert row + f"{100.0 * (want['compared run'] - student):+.2f} |" in report


def test_a_label_free_lm_is_measured_against_its_ce_baseline_in_perplexity(tiny_lm_args, tmp_path):
    args = tiny_lm_args(tmp_path)
    assert main(["run", *args, "distill.label_free=true", KD_ONLY, "deploy.enabled=false", "--no-tensorboard"]) == 0
    results = results_of(tmp_path / "run")
    student = results["student"]["perplexity"]
    by_name = {r["name"]: r for r in results["gaps"]["references"]}
    assert set(by_name) == {"teacher", "baseline"}
    for name, reference in by_name.items():
        value = results[name]["perplexity"]
        assert reference["perplexity"] == value
        assert reference["behind"] == pytest.approx(student - value, rel=1e-12)
        assert reference["ratio"] == pytest.approx(student / value, rel=1e-12)
    baseline = results["baseline"]["perplexity"]
    row = f"| baseline | {baseline:.4f} | {student:.4f} | {student - baseline:+.4f} (x{student / baseline:.3f}) |"
    assert row in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("what", ["no folder", "another metric"])
def test_a_compare_to_that_is_no_finished_run_of_this_metric_is_one_line(
    what, tiny_lm_args, labelled, tmp_path, capsys
):
    target = tmp_path / "missing" if what == "no folder" else labelled  # labelled: an accuracy run
    args = [*tiny_lm_args(tmp_path), f"report.compare_to={target}", "deploy.enabled=false"]
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"distilflow: error: report.compare_to '{target}'")
    assert ("no results.json" if what == "no folder" else "no student perplexity") in err
    assert not (tmp_path / "run").exists()
