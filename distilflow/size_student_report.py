"""size-student's outputs: student.yaml, sizing.json, report.md and latency.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distilflow.deploy.speed import SLOW
from distilflow.size_student_choice import budget_words, fits, per
from distilflow.storage import write_text


def write_outputs(out: Path, tree: dict[str, Any], chosen: dict[str, Any], result: dict[str, Any]) -> None:
    """``tree``: the user's config with the chosen ``student.model`` (size_student.sized_config)."""
    out.mkdir(parents=True, exist_ok=True)
    b = result["budget"]
    header = (
        f"# distilflow size-student: the largest candidate that meets {budget_words(b)} ({b['threads']} thread(s)) "
        f"on this machine: {chosen['name']}.\n"
        "# Pass it to 'distilflow run' (this file is your config with student.model replaced).\n"
    )
    write_text(out / "student.yaml", header + yaml.safe_dump(tree, sort_keys=False))
    write_text(out / "sizing.json", json.dumps(result, indent=2))
    plot_latency(result, out / "latency.png")
    write_text(out / "report.md", "\n".join(report_lines(result)) + "\n")


def _latency_words(b: dict[str, Any]) -> str:
    if b.get("kind") == "causal_lm":
        return (
            f"ms per generated token (greedy, batch {b['batch']}, prompts of {b['prompt_tokens']} tokens, "
            f"{b['new_tokens']} new; the {b['new_tokens'] - 1} steps after the first token), backend {b['backend']}"
        )
    return f"latency of one call at batch {b['batch']}, backend {b['backend']}"


def report_lines(result: dict[str, Any]) -> list[str]:
    b = result["budget"]
    rows = result["candidates"]
    lm = b.get("kind") == "causal_lm"
    memory = any("peak_rss_mb" in r for r in rows)
    lines = [
        "# Student sizing",
        "",
        f"Budget: {budget_words(b)}; {_latency_words(b)}, {b['threads']} thread(s); {result['repeats']} "
        f"interleaved repeats per candidate; load average {result['load_average']:.1f} when measured. Chosen: "
        f"**{result['chosen']}** (most MACs{per(b)} among those that meet it).",
        "",
    ]
    if memory:
        lines += [
            "Peak RSS: of a fresh process that imports the runtime, loads the candidate's files and runs the timed "
            "workload once (runtime libraries included; 'runtime' is that process before loading the model).",
            "",
        ]
    head = ["candidate", "params", f"MACs{per(b)}", "p50 ms", "p90 ms"]
    head += ["prefill ms"] if lm else []
    head += ["size on disk (KiB)"] + (["peak RSS MB", "runtime MB"] if memory else []) + ["meets"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = "**chosen**" if r["name"] == result["chosen"] else ("yes" if fits(r, b) else "no")
        cells = [r["name"], f"{r['params']:,}", f"{r['macs']:,}", f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}"]
        cells += [f"{r['prefill_ms']:.2f}"] if lm else []
        cells += [f"{r['size_bytes'] / 1024:.1f}"]
        cells += (
            [f"{r.get('peak_rss_mb', float('nan')):.0f}", f"{r.get('runtime_rss_mb', float('nan')):.0f}"]
            if memory
            else []
        )
        lines.append("| " + " | ".join([*cells, mark]) + " |")
    lines += _confirmed_lines(result) + _speed_lines(result)
    return [*lines, "", "![latency against MACs](latency.png)"]


def _confirmed_lines(result: dict[str, Any]) -> list[str]:
    """The candidates re-timed alone after the sweep (largest first) and whether each held the budget."""
    tried = result.get("confirmed") or []
    if not tried:
        return []
    lines = [
        "",
        "## Confirmed alone",
        "",
        "The sweep's choice built again from its config and timed alone (nothing else loaded, as it will be "
        "deployed), each time after a warm-up; a p90 over the budget less the margin moves to the next smaller "
        "candidate.",
        "",
        "| candidate | p90 ms of each re-timing alone | machine speed (probe, x the sweep's) | taken again: "
        "slow windows (p90 ms, speed) | held |",
        "|---|---|---|---|---|",
    ]
    for t in tried:
        p90s = ", ".join(f"{p:.3f}" for p in t["p90_ms"])
        speeds = ", ".join(f"{x:.2f}" for x in t.get("speed", []))
        slow = ", ".join(f"{w['p90_ms']:.3f} at {w['speed']:.2f}x" for w in t.get("slow", [])) or "none"
        lines.append(f"| {t['name']} | {p90s} | {speeds} | {slow} | {'yes' if t['held'] else 'no'} |")
    return lines


def _speed_lines(result: dict[str, Any]) -> list[str]:
    """What the speed probe (deploy/speed.py) saw: the sweep's figure and whether the sweep ran slow."""
    speed = result.get("speed_probe")
    if not speed or speed["sweep_p50_ms"] != speed["sweep_p50_ms"]:
        return []
    lines = [
        "",
        f"Machine speed: a fixed reference workload (deploy/speed.py) timed once per round took p50 "
        f"{speed['sweep_p50_ms']:.2f} ms (p90 {speed['sweep_p90_ms']:.2f}) in the sweep. A re-timing that missed "
        f"the budget with that probe {SLOW:g}x slower or more was taken again ({speed['slow_windows']} such slow "
        "windows here).",
    ]
    if speed["sweep_slow"]:
        lines += [
            "",
            f"**The sweep ran in a slow window**: the re-timings' probe ran at 1/{SLOW:g} of the sweep's time or "
            "less, so every candidate's sweep latency is pessimistic and the choice may be smaller than the "
            "budget allows. Run size-student again.",
        ]
    return lines


def plot_latency(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = result["candidates"], result["budget"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for depth in sorted({_depth(r) for r in rows}):
        part = [r for r in rows if _depth(r) == depth]
        ax.errorbar(
            [r["macs"] for r in part],
            [r["p50_ms"] for r in part],
            yerr=[[0] * len(part), [r["p90_ms"] - r["p50_ms"] for r in part]],
            marker="o",
            ms=3,
            lw=1,
            capsize=2,
            label=f"{depth} layer(s): p50, bar to p90",
        )
    chosen = next(r for r in rows if r["name"] == result["chosen"])
    ax.plot([chosen["macs"]], [chosen["p50_ms"]], "r*", ms=12, label=f"chosen: {chosen['name']}")
    if b.get("latency_ms") is not None:
        ax.axhline(b["latency_ms"], color="#c44e52", ls="--", lw=0.8, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"MACs{per(b)}")
    unit = "ms per generated token" if b.get("kind") == "causal_lm" else "ms per call"
    ax.set_ylabel(f"{unit} (batch {b['batch']}, {b['backend']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _depth(row: dict[str, Any]) -> int:
    model = row["model"]
    if model.get("hf"):
        return int(model["hf"]["config"]["num_hidden_layers"])
    section = model.get("mlp") or model.get("cnn")
    return len(section.get("hidden") or section.get("channels"))
