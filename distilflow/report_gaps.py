"""How close the student gets: its held-out metric against the other models of its run and, with
``report.compare_to``, against another run's student (results.json ``gaps``, a report.md section).

Written for a label-free run (``distill.label_free``: the question is what the labels were worth)
and for any run given ``report.compare_to``. A label-free run has no labelled student of its own: it
is measured against its teacher(s), its baseline where it has one (trained on the labels; for a
causal LM the next-token cross-entropy on the same text) and the student of the run folder
``compare_to`` names (e.g. the same config with labels). "Behind" is how much worse the student is:
accuracy points (``100 * (reference - student)``) or perplexity (``student - reference``, and the
ratio ``student / reference``); negative means the student is better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distilflow.config import Config
from distilflow.errors import UserError


def metric_of(cfg: Config) -> str:
    return "perplexity" if cfg.task == "causal_lm" else "accuracy"


def compared_run(cfg: Config) -> dict[str, Any] | None:
    """The student result of the run folder ``report.compare_to`` names, or None when it is not set.

    Checked before anything is written (preflight): a folder without a finished ``results.json``, or
    whose student has not this run's metric, is one line naming it."""
    folder = cfg.report.compare_to
    if folder is None:
        return None
    path = Path(folder).expanduser() / "results.json"
    key = "report.compare_to"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{key} '{folder}': no results.json there; name a finished run folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{key} '{folder}': results.json cannot be read ({error})") from None
    metric = metric_of(cfg)
    student = results.get("student") if isinstance(results, dict) else None
    if not isinstance(student, dict) or not isinstance(student.get(metric), (int, float)):
        raise UserError(
            f"{key} '{folder}': its results.json has no student {metric}; name a finished run of the same task"
        )
    return {"run": str(folder), "run_name": results.get("name"), metric: float(student[metric])}


def _gap(metric: str, student: float, reference: float) -> dict[str, float]:
    if metric == "accuracy":
        return {"behind_points": 100.0 * (reference - student)}
    return {"behind": student - reference, "ratio": student / reference}


def gaps(cfg: Config, results: dict[str, Any]) -> dict[str, Any] | None:
    """The ``gaps`` entry of results.json (None when the run is neither label-free nor compared).

    ``references``: each model of the run other than the student (``teacher`` or ``teacher:<name>``,
    ``baseline``), then the compared run's student (``compared run``), each with its metric and how
    far the student is behind it."""
    if not cfg.distill.label_free and cfg.report.compare_to is None:
        return None
    from distilflow.report import model_rows

    metric = metric_of(cfg)
    student = results["student"][metric]
    references = [
        {"name": name, metric: r[metric]}
        for name, r in model_rows(results)
        if name != "student" and isinstance(r.get(metric), (int, float))
    ]
    other = compared_run(cfg)
    if other is not None:
        references.append({"name": "compared run", **other})
    for reference in references:
        reference.update(_gap(metric, student, reference[metric]))
    return {"metric": metric, "label_free": cfg.distill.label_free, "student": student, "references": references}


def gap_lines(section: dict[str, Any]) -> list[str]:
    """The report.md section of :func:`gaps`."""
    metric = section["metric"]
    behind = "points behind" if metric == "accuracy" else "perplexity behind (x reference)"
    lines = ["## How close the student gets", ""]
    if section["label_free"]:
        lines += ["Label-free run: the student read no training label (KD and features only).", ""]
    lines += [f"| reference | its held-out {metric} | student | student {behind} |", "|---|---|---|---|"]
    for r in section["references"]:
        where = f" (`{r['run']}`)" if "run" in r else ""
        if metric == "accuracy":
            gap = f"{r['behind_points']:+.2f}"
        else:
            gap = f"{r['behind']:+.4f} (x{r['ratio']:.3f})"
        lines.append(f"| {r['name']}{where} | {r[metric]:.4f} | {section['student']:.4f} | {gap} |")
    return [*lines, ""]
