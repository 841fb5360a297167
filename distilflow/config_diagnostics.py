"""The ``diagnostics:`` and ``report:`` sections: how a run judges its own training (train/diagnostics.py,
diagnose.py) and what its report compares it with (report_gaps.py)."""

from __future__ import annotations

from dataclasses import dataclass

from distilflow.typed_config import help_field

_f = help_field


@dataclass
class DiagnosticsConfig:
    spike_factor: float = _f(
        3.0,
        "A step is a loss spike when its objective (unweighted terms summed) exceeds this many times the median "
        "of the previous spike_window steps of its phase (> 1; the healthy runs measured show none at 3, "
        "a batch of flipped labels gives >10x; docs/DIAGNOSIS.md).",
    )
    spike_window: int = _f(50, "Steps of that running median (>= 6; it starts afresh at each phase).")


@dataclass
class ReportConfig:
    compare_to: str | None = _f(
        None,
        "A finished run folder (its results.json) whose student this run's student is measured against in "
        "report.md and results.json ('gaps'): e.g. the labelled run of a label-free one. Same task and metric.",
    )
