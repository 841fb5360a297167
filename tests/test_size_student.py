"""distilflow size-student: candidates and their cost, the choice, the written config, bad input."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
import yaml

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.deploy.speed import SLOW, probe_ms
from distilflow.errors import UserError
from distilflow.models.sizing import candidates, cnn_shapes, mlp_shapes
from distilflow.size_student import ClassifierSizing
from distilflow.size_student_choice import Timing, choose, confirm_choice, speed_summary
from distilflow.size_student_report import report_lines


def test_mlp_candidates_cost_what_a_hand_count_says():
    found = candidates({"arch": "mlp", "mlp": {"hidden": [8, 8], "dropout": 0.0}}, (40,), 10, widths=[16, 32])
    assert sorted(tuple(c.model["mlp"]["hidden"]) for c in found) == [(16,), (16, 16), (32,), (32, 32)]
    for c in found:
        widths = [40, *c.model["mlp"]["hidden"], 10]
        pairs = list(zip(widths, widths[1:]))
        assert c.params == sum((a + 1) * b for a, b in pairs)  # weights and biases
        assert c.macs == sum(a * b for a, b in pairs)  # one multiply-accumulate per weight per sample
    assert [c.macs for c in found] == sorted(c.macs for c in found)


def test_grids_keep_the_depth_and_one_less():
    assert mlp_shapes([64, 64, 64], [16, 32]) == [[16, 16], [32, 32], [16, 16, 16], [32, 32, 32]]
    assert mlp_shapes([64], [16]) == [[16]]
    # channels scaled to multiples of 4 (at least 4), duplicates dropped
    assert cnn_shapes([32, 32], [0.05, 0.1, 0.5]) == [[4], [16], [4, 4], [16, 16]]


def _row(name: str, macs: int, p50: float, p90: float) -> dict:
    return {"name": name, "macs": macs, "params": macs, "p50_ms": p50, "p90_ms": p90}


def _budget(**limits) -> dict:
    return {"latency_ms": None, "max_params": None, "max_macs": None, "batch": 1, "backend": "torch", **limits}


def test_the_choice_is_the_most_macs_that_meets_every_limit():
    rows = [_row("small", 10, 0.1, 0.2), _row("mid", 100, 0.5, 0.9), _row("big", 1000, 0.8, 1.5)]
    assert choose(rows, _budget(latency_ms=1.0))["name"] == "mid"  # big's p50 meets, its p90 does not
    assert choose(rows, _budget(latency_ms=2.0))["name"] == "big"
    assert choose(rows, _budget(max_params=999))["name"] == "mid"
    assert choose(rows, _budget(latency_ms=2.0, max_macs=99))["name"] == "small"
    with pytest.raises(UserError, match=r"p90 <= 0.15 ms at batch 1 with torch: the fastest, small, takes 0.1 ms"):
        choose(rows, _budget(latency_ms=0.15))
    with pytest.raises(UserError, match=r"<= 5 params: the smallest, small, has 10 params and 10 MACs"):
        choose(rows, _budget(max_params=5))


def test_a_margin_keeps_that_share_of_the_latency_budget_free():
    rows = [_row("small", 10, 0.1, 0.2), _row("mid", 100, 0.5, 0.79), _row("big", 1000, 0.8, 0.95)]
    # budget 1 ms less 20 %: p90 <= 0.8 ms. big (0.95) meets the budget but not the margin; mid (0.79) both.
    assert choose(rows, _budget(latency_ms=1.0, margin=0.2))["name"] == "mid"
    assert choose(rows, _budget(latency_ms=1.0, margin=0.0))["name"] == "big"
    assert choose(rows, _budget(latency_ms=1.0, margin=0.75))["name"] == "small"  # p90 <= 0.25
    with pytest.raises(
        UserError,
        match=r"p90 <= 0.2 ms at batch 1 with torch \(chosen at p90 <= 0.1 ms: a 50 % "
        r"margin\): the fastest, small, takes 0.1 ms \(p90 0.2\); raise the budget, lower --margin",
    ):
        choose(rows, _budget(latency_ms=0.2, margin=0.5))
    # Confirmed alone against the same limit: mid re-timed at 0.85 meets the budget, not the budget less 20 %.
    retime, calls = _scripted({"mid": [(0.7, 2.0), (0.85, 2.0)], "small": [(0.2, 2.0)] * 2})
    chosen, tried = confirm_choice(rows, _budget(latency_ms=1.0, margin=0.2), retime, 2, 2.0, sleep=lambda s: None)
    assert chosen["name"] == "small" and calls == ["mid", "mid", "small", "small"]
    assert [t["held"] for t in tried] == [False, True]
    # A slow window is judged against the same limit: 0.85 at 2 x SLOW the sweep's probe is taken again.
    retime, calls = _scripted({"mid": [(0.85, 4.0 * SLOW), (0.7, 2.0), (0.75, 2.0)]})
    chosen, tried = confirm_choice(rows, _budget(latency_ms=1.0, margin=0.2), retime, 2, 2.0, sleep=lambda s: None)
    assert chosen["name"] == "mid" and len(tried[0]["slow"]) == 1
    with pytest.raises(UserError, match=r"took p90 0.9 ms alone; raise the budget, lower --margin, give smaller"):
        confirm_choice(rows, _budget(latency_ms=1.0, margin=0.2), lambda row: Timing(0.5, 0.9, 2.0), 1, 2.0)


def test_confirm_choice_retimes_alone_and_moves_to_the_next_smaller_after_a_miss():
    rows = [_row("small", 10, 0.1, 0.2), _row("mid", 100, 0.5, 0.9), _row("big", 1000, 0.8, 0.95)]
    alone = {"big": [0.9, 1.2, 0.9], "mid": [0.8, 0.85, 0.99], "small": [0.2, 0.2, 0.2]}  # p90 per re-timing
    calls: list[str] = []

    def retime(row):
        calls.append(row["name"])
        return Timing(0.0, alone[row["name"]][calls.count(row["name"]) - 1], 2.0)

    sleeps: list[float] = []
    chosen, tried = confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, 2.0, sleep=sleeps.append)
    # big met the budget in the sweep (0.95), missed it on its second re-timing alone (1.2) at the sweep's
    # machine speed (probe 2.0 ms both times): mid, three times; nothing was waited for.
    assert chosen["name"] == "mid" and calls == ["big", "big", "mid", "mid", "mid"] and sleeps == []
    assert tried == [
        {"name": "big", "p90_ms": [0.9, 1.2], "speed": [1.0, 1.0], "slow": [], "held": False},
        {"name": "mid", "p90_ms": [0.8, 0.85, 0.99], "speed": [1.0, 1.0, 1.0], "slow": [], "held": True},
    ]
    # only the candidates that met every limit in the sweep are tried (max_macs 99: small alone)
    calls.clear()
    assert confirm_choice(rows, _budget(latency_ms=1.0, max_macs=99), retime, 2)[0]["name"] == "small"
    assert calls == ["small", "small"]


def test_confirm_choice_with_no_candidate_holding_alone_is_one_line():
    rows = [_row("small", 10, 0.1, 0.2), _row("mid", 100, 0.5, 0.9)]
    with pytest.raises(
        UserError,
        match=r"when re-timed alone \(2 times each.*smallest that met it in the sweep, small, "
        r"took p90 0.5 ms alone",
    ):
        confirm_choice(rows, _budget(latency_ms=0.3), lambda row: Timing(0.4, 0.5, 1.0), 2, 1.0)


def _scripted(timings: dict[str, list[tuple[float, float]]]):
    """A retimer that plays back (p90 ms, probe ms) per candidate, in order, and records the calls."""
    calls: list[str] = []

    def retime(row):
        calls.append(row["name"])
        p90, probe = timings[row["name"]][calls.count(row["name"]) - 1]
        return Timing(p90 / 2, p90, probe)

    return retime, calls


def test_a_miss_in_a_slow_window_is_taken_again_not_blamed_on_the_shape():
    rows = [_row("small", 10, 0.1, 0.2), _row("big", 1000, 0.8, 0.95)]
    # The sweep's probe took 2.0 ms. big misses twice while the probe takes 2 x SLOW and 3.0 ms (1.5x): both
    # are the machine's; then it meets the budget three times at the sweep's speed.
    slow = 2.0 * SLOW
    retime, calls = _scripted({"big": [(1.9, slow), (1.4, 3.0), (0.9, 2.1), (0.92, 1.9), (0.91, 2.0)]})
    sleeps: list[float] = []
    chosen, tried = confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, 2.0, pause_s=7, sleep=sleeps.append)
    assert chosen["name"] == "big" and calls == ["big"] * 5 and sleeps == [7, 7]
    (record,) = tried
    assert record["held"] and record["p90_ms"] == [0.9, 0.92, 0.91]
    assert record["speed"] == pytest.approx([1.05, 0.95, 1.0])
    assert record["slow"] == [{"p90_ms": 1.9, "speed": pytest.approx(SLOW)}, {"p90_ms": 1.4, "speed": 1.5}]
    # A miss with the probe just under SLOW x the sweep's is the shape's: no wait, the next smaller one.
    retime, calls = _scripted({"big": [(1.4, 2.0 * SLOW * 0.99)], "small": [(0.2, 2.0)] * 3})
    sleeps.clear()
    chosen, tried = confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, 2.0, sleep=sleeps.append)
    assert chosen["name"] == "small" and sleeps == [] and tried[0]["slow"] == [] and not tried[0]["held"]
    # A slow probe with the budget met is simply counted (a slow window only matters to a miss).
    retime, calls = _scripted({"big": [(0.9, 10.0)] * 3})
    assert confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, 2.0, sleep=sleeps.append)[0]["name"] == "big"
    # Without a sweep probe to compare with (reference None), a miss is the shape's, as before.
    retime, calls = _scripted({"big": [(1.4, 10.0)], "small": [(0.2, 2.0)] * 3})
    assert confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, None, sleep=sleeps.append)[0]["name"] == "small"


def test_a_machine_slow_through_every_retry_is_one_line():
    rows = [_row("small", 10, 0.1, 0.2), _row("big", 1000, 0.8, 0.95)]
    retime, calls = _scripted({"big": [(2.0, 4.0)] * 3})
    sleeps: list[float] = []
    with pytest.raises(
        UserError, match=r"^big missed p90 <= 1 ms .* in 3 re-timings in a row while this machine ran 2.0x slower"
    ):
        confirm_choice(rows, _budget(latency_ms=1.0), retime, 3, 2.0, slow_retries=2, pause_s=5, sleep=sleeps.append)
    assert calls == ["big"] * 3 and sleeps == [5, 5]  # the smaller candidate is not tried: the machine is the cause


def test_the_speed_summary_names_a_sweep_that_ran_slow():
    # The sweep's probe p50 2.0 ms; every re-timing ran at half of that: the sweep was the slow window.
    fast = [{"name": "big", "p90_ms": [0.5, 0.5], "speed": [0.5, 0.52], "slow": [], "held": True}]
    summary = speed_summary([2.0, 2.0, 1.9, 2.1, 4.0], fast)
    assert summary["sweep_p50_ms"] == 2.0 and summary["sweep_p90_ms"] == pytest.approx(
        2.1 + 0.6 * (4.0 - 2.1)
    )  # sorted, index 3.6
    assert summary["sweep_slow"] and summary["slow_windows"] == 0
    steady = [
        {"name": "big", "p90_ms": [0.5], "speed": [1 / SLOW * 1.01], "slow": [{"p90_ms": 2, "speed": 2}], "held": True}
    ]
    assert not speed_summary([2.0], steady)["sweep_slow"] and speed_summary([2.0], steady)["slow_windows"] == 1
    assert not speed_summary([2.0], [])["sweep_slow"]  # nothing re-timed: nothing to compare

    row = {**_row("big", 1000, 0.4, 0.5), "size_bytes": 1024, "model": {"arch": "mlp", "mlp": {"hidden": [8]}}}
    budget = {**_budget(latency_ms=1.0), "threads": 1}
    result = {"budget": budget, "candidates": [row], "chosen": "big", "repeats": 5, "load_average": 1.0}
    report = "\n".join(report_lines({**result, "confirmed": fast, "speed_probe": summary}))
    assert (
        "**The sweep ran in a slow window**" in report and "| big | 0.500, 0.500 | 0.50, 0.52 | none | yes |" in report
    )
    report = "\n".join(report_lines({**result, "confirmed": steady, "speed_probe": speed_summary([2.0], steady)}))
    assert "slow window**" not in report and "2.000 at 2.00x" in report and "(1 such slow windows here)" in report


def test_the_probe_does_the_same_work_each_call():
    # Wall time varies with the machine; the work does not: the same products (the matrix is fixed) every call.
    from distilflow.deploy import speed

    before = speed.REFERENCE_MATRIX.clone()
    samples = [probe_ms() for _ in range(5)]
    assert all(0 < s < 10_000 for s in samples) and torch.equal(speed.REFERENCE_MATRIX, before)


def test_no_timed_call_follows_a_speed_probe_or_another_candidate(monkeypatch):
    # A model of what a call finds when something else ran just before it (the probe's products, or another
    # candidate, evicted its weights): it pays 100 ms. No timed call may pay it, so every timing stays far
    # under that (a loaded machine's preemption included); the interleaved rounds are kept (each variant
    # timed once per round).
    import time

    import distilflow.size_student as sizing

    state = {"last": None}

    def probe():
        state["last"] = "probe"
        return 1.0

    class Variant:
        def logits(self, feeds):
            if state["last"] is not self:
                time.sleep(0.1)
            state["last"] = self

    monkeypatch.setattr(sizing, "probe_ms", probe)
    samples: list[float] = []
    times = sizing.measure([Variant(), Variant()], {}, repeats=4, probe=samples)
    assert samples == [1.0] * (2 * sizing.PROBES) and [len(t) for t in times] == [4, 4]
    assert max(max(t) for t in times) < 50, times


@pytest.fixture
def tiny_config(tmp_path, tiny_overrides):
    """A YAML config of the tiny MNIST-1D run (the user's config that size-student reads)."""
    from distilflow.config import parse_override, set_path

    tree: dict = {}
    for text in tiny_overrides(tmp_path / "run"):
        keys, value = parse_override(text)
        set_path(tree, keys, value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_size_student_writes_the_largest_candidate_as_a_config_that_runs(tmp_path, tiny_config, capsys):
    out = tmp_path / "sizing"
    args = [str(tiny_config), "--latency-ms", "1000", "--backend", "torch", "--widths", "16,24", "--repeats", "5"]
    assert main(["size-student", *args, "--out", str(out), "--batch", "4"]) == 0
    result = json.loads((out / "sizing.json").read_text())
    # A budget everything meets: the chosen one is the largest candidate, [24, 24] (the tiny student is 2 deep).
    assert result["chosen"] == "mlp [24, 24]" and len(result["candidates"]) == 4
    assert all(r["p50_ms"] <= r["p90_ms"] and r["size_bytes"] > 0 for r in result["candidates"])
    assert result["budget"]["margin"] == 0.2  # the default margin, said in the summary line below
    report = (out / "report.md").read_text()
    assert "| mlp [24, 24] |" in report and "**chosen**" in report and (out / "latency.png").is_file()
    # The choice was built again and timed alone three times (the default --confirm), and held.
    ((tried),) = result["confirmed"]
    assert tried["name"] == "mlp [24, 24]" and tried["held"] and len(tried["p90_ms"]) == 3
    assert all(0 < p <= 1000 for p in tried["p90_ms"]) and "## Confirmed alone" in report
    said = capsys.readouterr().out
    assert "distilflow run" in said and "(chosen at p90 <= 800 ms: a 20 % margin)" in said

    # The written config is the user's with student.model replaced; 'run' trains that student.
    cfg = load_config(out / "student.yaml", [f"output_dir={tmp_path / 'sized-run'}"])
    assert cfg.student.model.mlp.hidden == [24, 24] and cfg.teacher.model.cnn.channels == [8, 8]
    assert main(["run", str(out / "student.yaml"), f"output_dir={tmp_path / 'sized-run'}", "--no-tensorboard"]) == 0
    results = json.loads((tmp_path / "sized-run" / "results.json").read_text())
    chosen = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    assert results["student"]["params"] == chosen["params"] and results["student"]["macs"] == chosen["macs"]


def test_a_miss_alone_writes_the_next_smaller_candidate(tmp_path, tiny_config, monkeypatch, capsys):
    rebuilt: list[tuple[str, int]] = []
    real = ClassifierSizing.retime

    def retime(self, row):
        timing = real(self, row)  # the real rebuild and timing; then [24, 24] is made to miss
        rebuilt.append((row["name"], row["params"]))
        assert timing.probe_ms > 0  # the speed probe ran beside it
        return timing._replace(p90_ms=2000.0, probe_ms=0.0) if row["name"] == "mlp [24, 24]" else timing

    monkeypatch.setattr(ClassifierSizing, "retime", retime)
    out = tmp_path / "sizing"
    args = [str(tiny_config), "--latency-ms", "1000", "--backend", "torch", "--widths", "16,24", "--repeats", "5"]
    assert main(["size-student", *args, "--confirm", "2", "--margin", "0", "--out", str(out)]) == 0
    result = json.loads((out / "sizing.json").read_text())
    assert result["budget"]["margin"] == 0.0
    # MACs per sample (40 inputs, 10 classes): [16] 800 < [16, 16] 1,056 < [24] 1,200 < [24, 24] 1,776;
    # [24, 24] missed once, [24] held twice
    assert result["chosen"] == "mlp [24]" and [n for n, _ in rebuilt] == ["mlp [24, 24]", *["mlp [24]"] * 2]
    assert [t["held"] for t in result["confirmed"]] == [False, True]
    assert load_config(out / "student.yaml").student.model.mlp.hidden == [24]
    assert "chosen mlp [24] (1 larger missed it alone)" in capsys.readouterr().out


def test_the_onnx_backends_export_and_quantize_each_candidate(tmp_path, tiny_config):
    sizes = {}
    for backend in ("ort-fp32", "ort-int8"):
        out = tmp_path / backend
        args = [str(tiny_config), "--latency-ms", "1000", "--backend", backend, "--widths", "256", "--repeats", "5"]
        assert main(["size-student", *args, "--out", str(out)]) == 0
        result = json.loads((out / "sizing.json").read_text())
        sizes[backend] = {r["name"]: r["size_bytes"] for r in result["candidates"]}
    assert set(sizes["ort-fp32"]) == {"mlp [256]", "mlp [256, 256]"}
    for name, fp32 in sizes["ort-fp32"].items():
        params = {"mlp [256]": 40 * 256 + 256 + 256 * 10 + 10, "mlp [256, 256]": 40 * 256 + 256 * 257 + 257 * 10}[name]
        assert fp32 >= 4 * params  # float32 weights in the file
        assert sizes["ort-int8"][name] < 0.5 * fp32  # int8 weights: about a quarter, plus scales and graph


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--latency-ms", "0.000001"],
            "no candidate meets p90 <= 1e-06 ms at batch 1 with torch (chosen at p90 <= 8e-07 ms: a 20 % margin): "
            "the fastest, mlp",
        ),
        (["--latency-ms", "1", "--margin", "1"], "0 <= --margin < 1 (a share of the latency budget"),
        (["--latency-ms", "1", "--margin", "-0.1"], "0 <= --margin < 1"),
        ([], "give a budget: --latency-ms, --max-params, --max-macs or --max-memory-mb"),
        (["--max-params", "-3"], "--max-macs and --max-memory-mb must be > 0"),
        (["--latency-ms", "1", "--backend", "tensorrt"], "--backend 'tensorrt' is not one of"),
        (["--latency-ms", "1", "--widths", "16,x"], "--widths '16,x'"),
        (["--max-memory-mb", "-1"], "--max-memory-mb must be > 0"),
        (["--latency-ms", "0"], "--latency-ms, --max-params, --max-macs and --max-memory-mb must be > 0"),
        (["--latency-ms", "1", "--confirm", "-1"], "--confirm >= 0"),
        (["--latency-ms", "1", "--slow-retries", "-1"], "--slow-retries >= 0"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_config, capsys, extra, expected):
    out = tmp_path / "sizing"
    args = [str(tiny_config), "--backend", "torch", "--widths", "16", "--repeats", "5", "--out", str(out)]
    assert main(["size-student", *args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize(("backend", "module"), [("ort-int8", "onnxruntime"), ("genai-int4", "onnxruntime_genai")])
def test_a_backend_whose_package_is_missing_is_one_line(tmp_path, tiny_config, capsys, monkeypatch, backend, module):
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    out = tmp_path / "sizing"
    assert main(["size-student", str(tiny_config), "--latency-ms", "1", "--backend", backend, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and "install" in err, err
    assert not out.exists()


def test_genai_int4_on_a_classifier_and_depths_on_an_mlp_are_one_line(tmp_path, tiny_config, capsys):
    for extra, expected in [
        (["--backend", "genai-int4"], "--backend genai-int4 builds causal LMs; for a classifier student use"),
        (["--backend", "torch", "--depths", "2"], "--depths applies to causal-LM students"),
    ]:
        out = tmp_path / "sizing"
        assert main(["size-student", str(tiny_config), "--latency-ms", "1", *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and expected in err, err
        assert not out.exists()


def test_a_memory_budget_on_a_classifier_is_the_measured_peak_rss(tmp_path, tiny_config):
    out = tmp_path / "sizing"
    args = [str(tiny_config), "--max-memory-mb", "100000", "--backend", "ort-int8", "--widths", "16", "--repeats", "5"]
    assert main(["size-student", *args, "--out", str(out)]) == 0
    result = json.loads((out / "sizing.json").read_text())
    assert result["chosen"] == "mlp [16, 16]"  # the largest: every one meets 100 GB
    assert all(r["peak_rss_mb"] > r["runtime_rss_mb"] > 10 for r in result["candidates"])
    budget = min(r["peak_rss_mb"] for r in result["candidates"]) - 0.05
    with pytest.raises(UserError, match=r"the least memory, mlp \[16(, 16)?\], peaks at"):
        choose(result["candidates"], {**result["budget"], "max_memory_mb": budget})
