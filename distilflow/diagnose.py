"""The Diagnosis of a run: what its metrics show and what to try, rule by rule (the article's section 4).

Read from what a run writes, never from its models: ``metrics.jsonl`` (losses, gradient norm before
clipping, agreement with the teacher, per-pair feature similarity, loss spikes: train/diagnostics.py),
``results.json`` (or the stages' ``result.json`` of an interrupted run) and ``config.yaml``. So
``distilflow diagnose RUN_DIR`` prints for any run folder, finished or not, the same section that
``report.md`` holds. Each rule fires on a measured signal; its threshold is a constant below, with why.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distilflow.errors import UserError

STAGES = ("teacher", "baseline", "student")
METRICS = ("accuracy", "perplexity", "exact_match")
"""The primary metrics a stage evaluates (classifiers, causal LMs, the reasoning demo)."""
LOWER_IS_BETTER = ("perplexity",)
SPIKES_TO_FIRE = 1
"""Loss spikes that make the rule fire: one step at 3x its running median is already unusual (the
healthy runs of tests/test_diagnose.py and the MNIST-1D demo, docs/BENCHMARKS.md "Diagnosis of the
demo", show none; one batch of flipped labels gives more than 10x)."""
FLAT_GAIN = 0.05
"""A feature pair is flat when its cosine similarity rose by less than this over its feature phases..."""
FLAT_LOW = 0.8
"""...and ended below this (a pair that starts high and stays high is aligned, not flat). Runs measured
that learn: +0.2 or more in 12 steps (tests/test_diagnose.py), 0.17 -> 0.87 in a 150-step MNIST-1D run."""
KD_SHARE_LOW = 0.01
"""The KD term is near zero when it carries less than this share of the weighted objective (KD + CE) in the
second half of the joint phases. Runs measured that learn from their teacher: 97% (the MNIST-1D demo), 8%
(MNIST-1D, 150 steps, a teacher of 55%), 14% and 29% (the npz runs of tests/test_diagnose.py): a student that
follows its teacher can have a small T^2-scaled KL next to CE on hard labels, so the bar sits well below..."""
CE_STAYS = 0.5
"""...while CE stays high: its level at the end of those phases is above this share of its level at their start."""
EVAL_DROP_ACCURACY = 0.03
"""Held-out accuracy not converging: it ended this much (absolute) below its best evaluation: twice the
binomial standard error of an accuracy near 70% on a 1,000-sample test split (sqrt(0.7 x 0.3 / 1000) = 1.45
points), so evaluation noise alone rarely crosses it; the MNIST-1D demo's baseline ended 1.0 point below its best."""
EVAL_RISE_PERPLEXITY = 0.05
"""Held-out perplexity not converging: it ended this share above its best evaluation."""
SLOW_FACTOR = 2.0
"""The student is slower than its MAC ratio predicts when its measured latency ratio to the teacher (eager,
same threads, the largest batch measured, best of the interleaved repeats) exceeds this many times the MAC
ratio. Eager PyTorch pays a fixed cost per layer call (measured: a 16-layer MLP of width 4 takes 0.32 ms at
batch 256, ~10 us per layer, on 1 thread here), so a small student's time is never exactly its MAC share;
2x says the overhead, not the arithmetic, sets its speed, which ONNX Runtime (fused kernels, no Python per
layer) removes."""
RECENT = 5
"""Logged values a "final" figure is the median of (one training batch's agreement is noisy)."""


@dataclass
class Finding:
    """One fired rule: the stage, what was measured (``saw``) and what to try."""

    rule: str
    stage: str
    saw: str
    advice: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Diagnosis:
    signals: dict[str, dict[str, Any]]
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        return {"signals": self.signals, "findings": [asdict(f) for f in self.findings]}


def _setting(config: dict | None, dotted: str, default: Any) -> Any:
    node: Any = config or {}
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _train_key(stage: str) -> str:
    return "teacher.train" if stage == "teacher" else "student.train"


def _recent(values: list[float]) -> float:
    return statistics.median(values[-RECENT:])


def stage_signals(rows: list[dict], stage: str, config: dict | None) -> dict[str, Any]:
    """What the metrics of ``stage`` show: spikes, gradient norm, agreement, feature similarity, evaluations."""
    train = [r for r in rows if r.get("stage") == stage and "loss" in r]
    clip = float(_setting(config, f"{_train_key(stage)}.grad_clip", 0.0) or 0.0)
    out: dict[str, Any] = {"last_step": max((r["step"] for r in train), default=0), "grad_clip": clip}
    spikes = [r for r in rows if r.get("stage") == stage and "spike_loss" in r]
    out["spikes"] = [
        {"step": r["step"], "loss": r["spike_loss"], "median": r["spike_median"], "phase": r.get("phase")}
        for r in spikes
    ]
    norms = [r["grad_norm"] for r in train if "grad_norm" in r]
    if norms:
        out["grad_norm"] = {"median": statistics.median(norms), "max": max(norms)}
        if clip > 0:
            out["grad_norm"]["clipped_share"] = sum(n > clip for n in norms) / len(norms)
    agreement = [r["agreement"] for r in train if "agreement" in r]
    if agreement:
        out["agreement"] = {"first": agreement[0], "last": _recent(agreement)}
    pairs = sorted({k for r in train for k in r if k.startswith("feature_cos/")})
    for name in pairs:
        values = [r[name] for r in train if name in r]
        quarter = max(len(values) // 4, 1)
        out.setdefault("features", {})[name.removeprefix("feature_cos/")] = {
            "first": values[0],
            "last": _recent(values),
            "gain": statistics.median(values[-quarter:]) - statistics.median(values[:quarter]),
            "points": len(values),
        }
    joint = [r for r in train if "kd" in r and "ce" in r]
    if joint:
        ce_weight = float(_setting(config, "distill.ce_weight", 0.3))
        half = joint[len(joint) // 2 :]
        shares = [r["kd_weight"] * r["kd"] / max(r["kd_weight"] * r["kd"] + ce_weight * r["ce"], 1e-12) for r in half]
        out["kd_share"] = {
            "median": statistics.median(shares),
            "kd_weight": statistics.median(r["kd_weight"] for r in half),
            "kd": statistics.median(r["kd"] for r in half),
            "ce_start": joint[0]["ce"],
            "ce_end": statistics.median(r["ce"] for r in half),
        }
    metric = next((m for m in METRICS if any(f"eval_{m}" in r for r in rows if r.get("stage") == stage)), None)
    evals = [(r["step"], r[f"eval_{metric}"]) for r in rows if r.get("stage") == stage and f"eval_{metric}" in r]
    if evals:
        best = (min if metric in LOWER_IS_BETTER else max)(evals, key=lambda e: e[1])
        out["eval"] = {"metric": metric, "best_step": best[0], "best": best[1], "final": evals[-1][1]}
        out["eval"]["points"] = len(evals)
    return out


# --- rules -------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def spike_rule(stage: str, signals: dict, config: dict | None) -> list[Finding]:
    """Loss spikes: clipping off -> ``grad_clip: 1.0``; clipping on -> a lower lr and a longer warm-up."""
    spikes = signals["spikes"]
    if len(spikes) < SPIKES_TO_FIRE:
        return []
    key = _train_key(stage)
    steps = ", ".join(str(s["step"]) for s in spikes[:10]) + (" ..." if len(spikes) > 10 else "")
    worst = max(spikes, key=lambda s: s["loss"] / max(s["median"], 1e-12))
    factor = _setting(config, "diagnostics.spike_factor", 3.0)
    saw = (
        f"{len(spikes)} loss spike(s) (a step's objective above {factor:g}x its running median) at step(s) {steps}; "
        f"worst {_fmt(worst['loss'])} against a median of {_fmt(worst['median'])} at step {worst['step']}"
    )
    if signals["grad_clip"] <= 0:
        advice = f"gradient clipping is off: set {key}.grad_clip: 1.0 (article 4.1)"
    else:
        lr = _setting(config, f"{key}.lr", None)
        warmup = _setting(config, f"{key}.warmup_steps", None)
        now = f" (now {lr:g} and {warmup})" if lr is not None and warmup is not None else ""
        advice = (
            f"clipping is on ({key}.grad_clip: {signals['grad_clip']:g}): lower {key}.lr and lengthen "
            f"{key}.warmup_steps{now}, e.g. a third of the rate and twice the warm-up (article 4.1)"
        )
    return [Finding("loss_spikes", stage, saw, advice, {"spikes": len(spikes), "steps": [s["step"] for s in spikes]})]


def flat_feature_rule(stage: str, signals: dict, config: dict | None) -> list[Finding]:
    """A feature pair whose similarity stays flat and low: other layers, more feature-phase steps, the head."""
    found = []
    for name, f in signals.get("features", {}).items():
        if f["points"] < 3 or f["gain"] >= FLAT_GAIN or f["last"] >= FLAT_LOW:
            continue
        saw = (
            f"feature pair {name}: cosine similarity of the projected student feature and the teacher's stayed flat "
            f"({_fmt(f['first'])} -> {_fmt(f['last'])}, gain {f['gain']:+.3f} over {f['points']} logged steps)"
        )
        advice = (
            "pair other layers (distill.feature_layers or layer_map; deeper layers first, article 4.2), give the "
            "feature phase more steps (distill.phases), and check the projection head can map the shapes "
            "(a student layer whose output does not depend on the input cannot align)"
        )
        found.append(Finding("flat_feature_pair", stage, saw, advice, {"pair": name, **f}))
    return found


def kd_share_rule(stage: str, signals: dict, config: dict | None) -> list[Finding]:
    """KD term near zero while CE stays high: the temperature or the KD weight."""
    share = signals.get("kd_share")
    if not share or share["median"] >= KD_SHARE_LOW or share["ce_end"] < CE_STAYS * share["ce_start"]:
        return []
    temperature = _setting(config, "distill.temperature", None)
    weight = _setting(config, "distill.kd_weight.base_weight", None)
    saw = (
        f"the KD term carries {share['median']:.1%} of the weighted objective in the joint phases (KD weight "
        f"{_fmt(share['kd_weight'])}, KD {_fmt(share['kd'])}) while CE stays at {_fmt(share['ce_end'])} (it started "
        f"the phase at {_fmt(share['ce_start'])})"
    )
    advice = f"raise distill.kd_weight.base_weight (now {weight}) or change distill.temperature (now {temperature})"
    warmup = _setting(config, "distill.kd_weight.warmup_steps", None)
    if weight and share["kd_weight"] < 0.5 * weight and warmup:
        advice += (
            f"; the KD weight is still ramping: distill.kd_weight.warmup_steps ({warmup}) is too long for this run"
        )
    advice += "; a teacher whose outputs are nearly uniform at this temperature has nothing to give: check its accuracy"
    return [Finding("kd_near_zero", stage, saw, advice, share)]


def eval_rule(stage: str, signals: dict, config: dict | None) -> list[Finding]:
    """Held-out metric not converging (article 4.1): it ended clearly worse than its best evaluation."""
    ev = signals.get("eval")
    if not ev or ev["points"] < 3:
        return []
    if ev["metric"] in LOWER_IS_BETTER:
        worse = ev["final"] > ev["best"] * (1 + EVAL_RISE_PERPLEXITY)
    else:
        worse = ev["final"] < ev["best"] - EVAL_DROP_ACCURACY
    if not worse:
        return []
    key = _train_key(stage)
    saw = (
        f"held-out {ev['metric']} was best at step {ev['best_step']} ({_fmt(ev['best'])}) and ended at "
        f"{_fmt(ev['final'])}"
    )
    advice = f"lower {key}.lr or lengthen {key}.warmup_steps (article 4.1), or stop near step {ev['best_step']}"
    return [Finding("eval_not_converging", stage, saw, advice, ev)]


def baseline_rule(results: dict, signals: dict) -> list[Finding]:
    """The distilled student not better than the baseline: the teacher-student gap and the agreement."""
    if not all(isinstance(results.get(s), dict) for s in STAGES):
        return []
    metric = next((m for m in METRICS if m in results["student"] and m in results["baseline"]), None)
    if metric is None:
        return []
    teacher, baseline, student = (results[s].get(metric) for s in STAGES)
    lower = metric in LOWER_IS_BETTER
    if (student < baseline) if lower else (student > baseline):
        return []
    agreement = signals.get("student", {}).get("agreement", {}).get("last")
    gap = f"teacher {_fmt(teacher)}, " if teacher is not None else ""
    saw = f"held-out {metric}: {gap}distilled student {_fmt(student)}, baseline {_fmt(baseline)} (no gain)"
    if agreement is not None:
        saw += f"; the student's top-1 agreement with the teacher ended at {agreement:.1%}"
    weak_teacher = teacher is not None and ((teacher >= baseline) if lower else (teacher <= baseline))
    if weak_teacher:
        advice = "the teacher itself is no better than the baseline: train a stronger teacher first (teacher.train)"
    elif agreement is not None and agreement >= 0.9:
        advice = (
            "the student follows the teacher closely, so the teacher is what limits it: a stronger teacher (more "
            "teacher.train.steps), or more rows for it to label (a transfer set)"
        )
    else:
        advice = (
            "the student does not follow the teacher: more distillation steps or KD weight, a temperature that "
            "keeps the teacher's ranking, or a larger student ('distilflow size-student' for the largest that fits)"
        )
    values = {"metric": metric, "teacher": teacher, "baseline": baseline, "student": student, "agreement": agreement}
    return [Finding("no_gain_over_baseline", "student", saw, advice, values)]


def speed_rule(results: dict) -> list[Finding]:
    """The student slower than its MAC ratio predicts -> the deploy table's fastest variant."""
    speed, student = results.get("speed"), results.get("student", {})
    macs_ratio = student.get("macs_ratio_to_teacher")
    if not speed or not macs_ratio:
        return []
    batch = max(speed["batches"], key=int)
    at = speed["batches"][batch]
    # The best of the interleaved repeats: a shared machine's load moves medians, not minima (bench.py).
    student_ms, teacher_ms = at.get("student_min_ms", at["student_ms"]), at.get("teacher_min_ms", at["teacher_ms"])
    ratio = student_ms / max(teacher_ms, 1e-12)
    if ratio <= SLOW_FACTOR * macs_ratio:
        return []
    saw = (
        f"at batch {batch} the eager student takes {ratio:.2f} of the teacher's time ({_fmt(student_ms)} vs "
        f"{_fmt(teacher_ms)} ms, best of the repeats, {speed['threads']} thread(s)) for {macs_ratio:.3f} of its MACs"
    )
    fastest = _fastest_variant(results.get("deploy") or {}, batch)
    advice = "ship the student through ONNX Runtime (article 4.3)"
    if fastest:
        name, ms, base = fastest
        gain = f", {base / ms:.2f}x torch fp32" if base else ""
        advice = f"ship the deploy table's fastest variant, {name} ({_fmt(ms)} ms at batch {batch}{gain})"
    advice += "; or size a leaner student for the latency you need: 'distilflow size-student --latency-ms X'"
    return [Finding("slower_than_macs", "student", saw, advice, {"batch": batch, "latency_ratio": ratio, **at})]


def _fastest_variant(table: dict, batch: str) -> tuple[str, float, float | None] | None:
    key = f"latency_ms_b{batch}"
    timed = {name: row[key] for name, row in table.items() if isinstance(row, dict) and key in row}
    if not timed:
        return None
    name = min(timed, key=timed.get)
    return name, timed[name], timed.get("torch_fp32")


STAGE_RULES = (spike_rule, flat_feature_rule, kd_share_rule, eval_rule)


def diagnose(rows: list[dict], results: dict | None = None, config: dict | None = None) -> Diagnosis:
    """The signals of every stage in ``rows`` and the rules that fire on them (and on ``results``)."""
    stages = list(dict.fromkeys(r["stage"] for r in rows if "stage" in r))
    signals = {stage: stage_signals(rows, stage, config) for stage in stages}
    findings = [f for stage in stages for rule in STAGE_RULES for f in rule(stage, signals[stage], config)]
    if results:
        findings += baseline_rule(results, signals) + speed_rule(results)
    return Diagnosis(signals, findings)


# --- text --------------------------------------------------------------------------------------------


def _signal_cells(sig: dict) -> list[str]:
    spikes = sig["spikes"]
    spiked = f"{len(spikes)}" + (f" (steps {', '.join(str(s['step']) for s in spikes[:5])})" if spikes else "")
    gn = sig.get("grad_norm")
    norm = f"{_fmt(gn['median'])} / {_fmt(gn['max'])}" if gn else "-"
    if gn and "clipped_share" in gn:
        norm += f"; {gn['clipped_share']:.0%} clipped at {sig['grad_clip']:g}"
    ag = sig.get("agreement")
    agree = f"{ag['first']:.1%} -> {ag['last']:.1%}" if ag else "-"
    feats = "; ".join(f"{n}: {_fmt(f['first'])} -> {_fmt(f['last'])}" for n, f in sig.get("features", {}).items())
    return [str(sig["last_step"]), spiked, norm, agree, feats or "-"]


def diagnosis_lines(diagnosis: dict) -> list[str]:
    """The Diagnosis section (markdown) of ``Diagnosis.to_dict()``: what was measured, then each finding."""
    lines = [
        "## Diagnosis",
        "",
        "| stage | steps | loss spikes | grad norm before clipping (median / max) | top-1 agreement with the teacher "
        "(first -> last) | feature similarity (first -> last) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, sig in diagnosis["signals"].items():
        lines.append("| " + " | ".join([stage, *_signal_cells(sig)]) + " |")
    lines.append("")
    findings = diagnosis["findings"]
    if not findings:
        lines.append(
            "No rule fired: no loss spikes, no flat feature pair, the KD term not near zero, held-out metrics "
            "converging, the distilled student better than the baseline, its speed as its MACs predict "
            "(where measured)."
        )
    for f in findings:
        lines.append(f"- **{f['rule'].replace('_', ' ')}** ({f['stage']}): {f['saw']}. Try: {f['advice']}.")
    return [*lines, ""]


# --- a run folder ------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (a line cut by a crash is skipped); [] when there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def diagnose_run(run_dir: str | Path) -> Diagnosis:
    """The Diagnosis of a run folder from its metrics (and results.json, or the stages' result.json, and
    config.yaml where present); a folder without metrics is one line."""
    folder = Path(run_dir)
    rows = read_metrics(folder)
    if not rows:
        what = "does not exist" if not folder.exists() else "has no metrics.jsonl with rows"
        raise UserError(f"'{folder}' {what}; give a run folder written by 'distilflow run' (or train-teacher, distill)")
    results = _read_json(folder / "results.json")
    if results is None:  # interrupted: the stages that finished
        results = {s: r for s in STAGES if (r := _read_json(folder / s / "result.json")) is not None}
    results = {k: v for k, v in results.items() if k != "diagnosis"}
    config = None
    if (folder / "config.yaml").is_file():
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text())
        except yaml.YAMLError:
            config = None
    return diagnose(rows, results, config if isinstance(config, dict) else None)
