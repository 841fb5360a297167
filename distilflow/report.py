"""report.md with a results table and PNG plots drawn from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distilflow.config import Config
from distilflow.schedules import kd_weight, lr_at, phase_boundaries
from distilflow.storage import atomic_write, write_text

PART_NAMES = ("kd", "ce", "feature")


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """The figure as a PNG; a full disk is one line naming the file (an earlier PNG of that name stays)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _shade_phases(ax, cfg: Config) -> None:
    colors = ["#dbe9f6", "#fde9d9", "#e2f0d9", "#eee3f3"]
    for i, phase in enumerate(phase_boundaries(cfg.distill.phases, cfg.student.train.steps)):
        if phase.steps:
            ax.axvspan(phase.start, phase.end, color=colors[i % len(colors)], alpha=0.8, lw=0)
            ax.text(
                (phase.start + phase.end) / 2,
                1.0,
                phase.name,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
            )


def plot_losses(rows: list[dict], cfg: Config, path: Path) -> None:
    plt = _pyplot()
    stages = [
        stage
        for stage in ("teacher", "baseline", "student")
        if any(r.get("stage") == stage and "loss" in r for r in rows)
    ]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(5 * max(len(stages), 1), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        train_rows = [r for r in rows if r.get("stage") == stage and "loss" in r]
        if stage == "student":
            _shade_phases(ax, cfg)
        steps = [r["step"] for r in train_rows]
        ax.plot(steps, [r["loss"] for r in train_rows], label="total", color="black", lw=1.2)
        plotted = [r["loss"] for r in train_rows]
        for part in PART_NAMES:
            points = [(r["step"], r[part]) for r in train_rows if part in r]
            if points:
                ax.plot(*zip(*points), label=part, lw=1)
                plotted += [value for _, value in points]
        ax.set_title(stage, pad=12)
        ax.set_xlabel("step")
        # A log axis drops values <= 0 (a loss that reached 0, or rounding below it): linear then.
        ax.set_yscale("log" if all(value > 0 for value in plotted) else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_diagnostics(rows: list[dict], cfg: Config, path: Path) -> None:
    """Per stage: gradient norm before clipping (with the clip level), loss spikes on the objective; for the
    student also its agreement with the teacher and each feature pair's similarity (phases shaded)."""
    plt = _pyplot()
    stages = [s for s in ("teacher", "baseline", "student") if any(r.get("stage") == s and "loss" in r for r in rows)]
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(4.2 * (len(stages) + 1), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        train = [r for r in rows if r.get("stage") == stage and "grad_norm" in r and "loss" in r]
        ax.plot([r["step"] for r in train], [r["grad_norm"] for r in train], color="black", lw=1, label="grad norm")
        clip = (cfg.teacher.train if stage == "teacher" else cfg.student.train).grad_clip
        if clip > 0:
            ax.axhline(clip, color="#c44e52", lw=0.8, ls="--", label=f"grad_clip {clip:g}")
        spikes = [r for r in rows if r.get("stage") == stage and "spike_loss" in r]
        if spikes:
            ax.plot([r["step"] for r in spikes], [r["grad_norm"] for r in spikes], "rv", ms=5, label="loss spike")
        ax.set_yscale("log")
        ax.set_title(f"{stage}: gradient norm before clipping", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    _shade_phases(ax, cfg)
    student = [r for r in rows if r.get("stage") == "student" and "loss" in r]
    for key in ["agreement"] + sorted({k for r in student for k in r if k.startswith("feature_cos/")}):
        points = [(r["step"], r[key]) for r in student if key in r]
        if points:
            ax.plot(*zip(*points), marker=".", ms=3, lw=1, label=key.removeprefix("feature_cos/"))
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("student: agreement and feature similarity", pad=12, fontsize=9)
    ax.set_xlabel("step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(cfg: Config, path: Path) -> None:
    plt = _pyplot()
    total = cfg.student.train.steps
    train = cfg.student.train
    steps = list(range(total))
    plan = phase_boundaries(cfg.distill.phases, total)
    # The KD weight only matters where a phase uses the kd term; elsewhere it is drawn as 0.
    active = {step for p in plan if "kd" in p.terms for step in range(p.start, p.end)}
    kd = [kd_weight(step, total, cfg.distill.kd_weight) if step in active else 0.0 for step in steps]
    lr = [
        lr_at(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps, total_steps=total)
        for step in steps
    ]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, values, title in ((a1, kd, "KD weight (student)"), (a2, lr, "learning rate (student)")):
        _shade_phases(ax, cfg)
        ax.plot(steps, values, color="black", lw=1.2)
        ax.set_title(title, pad=12)
        ax.set_xlabel("step")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def model_rows(results: dict) -> list[tuple[str, dict]]:
    """``(label, result)`` of each model of a run: the teacher (``teacher:<name>`` for each of several),
    the baseline (absent from a label-free run without labels) and the student."""
    rows = [(f"teacher:{name}", r) for name, r in results.get("teachers", {}).items()]
    return rows + [(stage, results[stage]) for stage in ("teacher", "baseline", "student") if stage in results]


def plot_metric(rows: list[dict], results: dict, metric: str, path: Path) -> None:
    """The primary metric (accuracy or perplexity) during training and at the end, per stage."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for stage in ("teacher", "baseline", "student"):
        points = [(r["step"], r[f"eval_{metric}"]) for r in rows if r.get("stage") == stage and f"eval_{metric}" in r]
        if points:
            a1.plot(*zip(*points), marker="o", ms=3, label=stage)
    a1.set_title(f"held-out {metric} during training")
    a1.set_xlabel("step")
    if metric == "perplexity":
        a1.set_yscale("log")
    if a1.get_legend_handles_labels()[0]:
        a1.legend(fontsize=8)
    rows = [(name, r) for name, r in model_rows(results) if metric in r]
    names, values = [name for name, _ in rows], [r[metric] for _, r in rows]
    colors = {"baseline": "#999999", "student": "#55a868"}
    bars = a2.bar(names, values, color=[colors.get(name, "#4c72b0") for name in names])
    for bar, value in zip(bars, values):
        a2.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    if metric == "accuracy":
        a2.set_ylim(0, 1.05)
    a2.set_title(f"final held-out {metric}")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_reasoning_report(run_dir: Path, cfg: Config, results: dict) -> Path:
    """report.md of the reasoning demo: teacher and students side by side, trace counts, a bar chart."""
    plt = _pyplot()
    names = ["teacher", *results["students"]]
    values = [results["teacher"]["exact_match"], *(r["exact_match"] for r in results["students"].values())]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bars = ax.bar(names, values, color=["#4c72b0"] + ["#999999", "#55a868", "#c44e52", "#8172b2"][: len(names) - 1])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out exact match (greedy)")
    fig.tight_layout()
    _save(fig, run_dir / "exact_match.png")
    plt.close(fig)
    task, traces = results["task"], results["traces"]
    reasons = ", ".join(f"{k} {v}" for k, v in traces["rejected_by_reason"].items()) or "none"
    lines = [
        f"# distilflow report: {cfg.name} (reasoning demo)",
        "",
        f"Task: addition of {task['operands']} numbers of up to {task['digits']} digits with written-out column "
        f"steps; {task['eval_prompts']} held-out prompts scored by exact match of the final answer.",
        "",
        "| model | data | held-out exact match | params | steps | train seconds |",
        "|---|---|---|---|---|---|",
    ]
    teacher = results["teacher"]
    lines.append(
        f"| teacher | {task['teacher_problems']} worked solutions | {teacher['exact_match']:.3f} | "
        f"{teacher['params']:,} | {teacher['steps']} | {teacher['train_seconds']} |"
    )
    for method, r in results["students"].items():
        lines.append(
            f"| {method} | {r['data']} | {r['exact_match']:.3f} | {r['params']:,} | {r['steps']} | "
            f"{r['train_seconds']} |"
        )
    lines += [
        "",
        f"Teacher traces for {traces['prompts']} fresh prompts ({traces['samples']} samples): kept {traces['kept']}, "
        f"rejected {traces['rejected']} ({reasons}); "
        f"{traces['prompts_with_a_kept_trace']} prompts have at least one kept trace. The SFT student sees "
        f"{task['gold_problems']} gold worked solutions. Whole run: {results['wall_seconds']} s.",
        "",
        "![exact match](exact_match.png)",
        "",
    ]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path


def write_report(run_dir: Path, cfg: Config, results: dict) -> Path:
    rows = _read_metrics(run_dir)
    metric = "perplexity" if cfg.task == "causal_lm" else "accuracy"
    cost = "macs_per_token" if cfg.task == "causal_lm" else "macs"
    plot_losses(rows, cfg, run_dir / "losses.png")
    plot_schedules(cfg, run_dir / "schedules.png")
    plot_metric(rows, results, metric, run_dir / f"{metric}.png")
    bpc = "bits_per_char" in results.get("student", {})  # across tokenizers: what compares the models
    lines = [
        f"# distilflow report: {cfg.name}",
        "",
        f"| model | architecture | held-out {metric} |{' bits per char |' if bpc else ''} params | "
        f"{cost.replace('_', ' ')} | steps | train seconds |",
        "|---|---|---|---|---|---|---|" + ("---|" if bpc else ""),
    ]
    archs = {"baseline": cfg.student.model.arch, "student": cfg.student.model.arch}
    if cfg.teachers:
        archs.update({f"teacher:{t.name}": t.model.arch for t in cfg.teachers})
    else:
        archs["teacher"] = cfg.teacher.model.arch
    for stage, r in model_rows(results):
        per_char = f" {r.get('bits_per_char', float('nan')):.4f} |" if bpc else ""
        lines.append(
            f"| {stage} | {archs.get(stage, '')} | {r.get(metric, float('nan')):.4f} |{per_char} "
            f"{r.get('params', 0):,} | "
            f"{r.get(cost, 0):,} | {r.get('steps', 0)} | {r.get('train_seconds', 0)} |"
        )
    if bpc:
        lines += [
            "",
            f"Teacher and student tokenizers differ (cross-tokenizer KD: {results.get('cross_tokenizer')}): each "
            "perplexity is over the model's own tokens; bits per character compare the models on the same text.",
        ]
    plan = phase_boundaries(cfg.distill.phases, cfg.student.train.steps)
    student, teacher = results["student"], results.get("teacher", {})
    which = "the largest teacher's" if cfg.teachers else "the teacher's"
    if "macs_ratio_to_teacher" in student:
        ratios = (
            f"Student compute is {student['macs_ratio_to_teacher']:.3f} and parameters "
            f"{student.get('params_ratio_to_teacher', float('nan')):.3f} of {which}."
        )
    else:
        ratios = f"The teacher's cost is not known here: {teacher.get('note', 'not recorded')}."
    where = f" Teacher: {teacher['loaded_from']}." if "served at" in str(teacher.get("loaded_from", "")) else ""
    lines += [
        "",
        f"{ratios}{where} Whole run: {results['wall_seconds']} s.",
        "",
        "Phases of distillation: "
        + ", ".join(f"{p.name} steps {p.start}-{p.end} ({'+'.join(p.terms)})" for p in plan)
        + f"; temperature {cfg.distill.temperature}, divergence {cfg.distill.divergence}.",
        "",
    ]
    if results.get("gaps"):  # label-free or report.compare_to (report_gaps.py)
        from distilflow.report_gaps import gap_lines

        lines += gap_lines(results["gaps"])
    lines += [
        "## Losses (phases shaded)",
        "![losses](losses.png)",
        "",
        "## KD weight and learning rate",
        "![schedules](schedules.png)",
        "",
        f"## {metric.capitalize()}",
        f"![{metric}]({metric}.png)",
        "",
    ]
    deploy = results.get("deploy_info")
    if deploy and deploy.get("genai"):  # a causal LM shipped through ONNX Runtime GenAI
        from distilflow.deploy.stage import genai_report_lines

        lines += genai_report_lines(deploy)
        deploy = None
    if deploy:
        lines += [
            "## Deployment (the distilled student)",
            "",
            deploy["table_markdown"],
            "",
            f"ONNX export parity with the eager model: max abs diff {deploy['parity']['max_abs']:.3g}, "
            f"relative {deploy['parity']['max_rel']:.3g}. PyTorch int8 backend: {deploy['torch_int8_backend']}. "
            f"Per-channel weight scales: {deploy['per_channel']}. Kept in float by name: "
            f"{', '.join(deploy['excluded_from_quantization']) or 'nothing'}.",
            "",
            "Operators in each ONNX file: "
            + "; ".join(f"{name}: {nodes}" for name, nodes in deploy["quantized_nodes"].items()),
            "",
            *deploy["notes"],
            "",
        ]
    if results.get("diagnosis"):
        from distilflow.diagnose import diagnosis_lines

        lines += diagnosis_lines(results["diagnosis"])
        plot_diagnostics(rows, cfg, run_dir / "diagnostics.png")
        lines += ["![diagnostics](diagnostics.png)", ""]
    samples = results.get("student_samples", [])
    if samples:
        lines += ["## Samples from the distilled student", "", "Greedy continuation after the marker `=>`.", ""]
    for sample in samples:
        lines += ["```", sample["prompt"] + " => " + sample["continuation"], "```", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
