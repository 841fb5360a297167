"""The report's loss plot: a log axis only where every plotted value can be drawn on one."""

import warnings

from distilflow import report
from distilflow.config import load_config


def loss_axis_scales(monkeypatch, tmp_path, rows: list[dict]) -> list[str]:
    scales: list[str] = []
    monkeypatch.setattr(report, "_save", lambda fig, path: scales.extend(ax.get_yscale() for ax in fig.axes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a log axis has no positive value
        report.plot_losses(rows, load_config(None, []), tmp_path / "losses.png")
    return scales


def test_loss_plot_is_log_scaled_only_when_every_value_is_positive(monkeypatch, tmp_path):
    positive = [{"stage": "teacher", "step": step, "loss": 1.0 / step} for step in (1, 2, 3)]
    assert loss_axis_scales(monkeypatch, tmp_path, positive) == ["log"]
    reached_zero = positive + [{"stage": "teacher", "step": 4, "loss": 0.0}]
    assert loss_axis_scales(monkeypatch, tmp_path, reached_zero) == ["linear"]
    all_zero = [{"stage": "student", "step": step, "loss": 0.0} for step in (1, 2)]
    assert loss_axis_scales(monkeypatch, tmp_path, all_zero) == ["linear"]
