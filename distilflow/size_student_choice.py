"""size-student's choice: the budget in words, which measured candidates meet it, the largest of them,
and its confirmation alone, with the speed probe's slow windows taken again (size_student.py's docstring)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from distilflow.deploy.speed import SLOW, median
from distilflow.errors import UserError

SLOW_PAUSE_S = 30.0  # the wait before a re-timing taken in a slow window is taken again
# The share of a latency budget kept free by default (size-student --margin): a candidate is chosen and
# confirmed on p90 <= budget x (1 - margin). Without it the largest shape under the budget sits a few per
# cent under it, inside the minute-to-minute spread of one shape's p90 (0.65-1.3x on a shared VM,
# docs/BENCHMARKS.md "LM demo, session 8"), and about one later measurement in ten misses.
MARGIN = 0.2


class Timing(NamedTuple):
    """One candidate timed alone: its p50 / p90 and the speed probe's median over the same rounds."""

    p50_ms: float
    p90_ms: float
    probe_ms: float

    def speed(self, reference_ms: float | None) -> float:
        """The probe's time as a multiple of ``reference_ms`` (the sweep's); NaN without one."""
        return self.probe_ms / reference_ms if reference_ms else float("nan")

    def slow_miss(self, limit_ms: float, reference_ms: float | None) -> bool:
        """Whether this timing missed ``limit_ms`` while the machine ran ``SLOW`` times slower than in the sweep."""
        return self.p90_ms > limit_ms and self.speed(reference_ms) >= SLOW


def per(budget: dict[str, Any]) -> str:
    """What MACs are counted per: a sample (classifiers) or a token (causal LMs)."""
    return " per token" if budget.get("kind") == "causal_lm" else " per sample"


def latency_limit(budget: dict[str, Any]) -> float:
    """The p90 a candidate must meet: the latency budget less its margin (``budget['margin']``, 0 if unset)."""
    return budget["latency_ms"] * (1 - budget.get("margin", 0.0))


def lower_margin(budget: dict[str, Any]) -> str:
    """``, lower --margin``: one more thing to try in a refusal, when a latency budget kept a margin."""
    return ", lower --margin" if budget.get("latency_ms") is not None and budget.get("margin") else ""


def budget_words(budget: dict[str, Any]) -> str:
    """``p90 <= 0.3 ms at batch 256 with ort-int8 (chosen at p90 <= 0.24 ms: a 20 % margin), <= 50,000
    params``: the limits that were given."""
    words = []
    if budget.get("latency_ms") is not None:
        unit = " per generated token" if budget.get("kind") == "causal_lm" else ""
        margin = budget.get("margin", 0.0)
        kept = f" (chosen at p90 <= {latency_limit(budget):.3g} ms: a {margin * 100:g} % margin)" if margin else ""
        words.append(
            f"p90 <= {budget['latency_ms']:g} ms{unit} at batch {budget['batch']} with {budget['backend']}{kept}"
        )
    if budget.get("max_params") is not None:
        words.append(f"<= {budget['max_params']:,} params")
    if budget.get("max_macs") is not None:
        words.append(f"<= {budget['max_macs']:,} MACs{per(budget)}")
    if budget.get("max_memory_mb") is not None:
        words.append(f"peak RSS <= {budget['max_memory_mb']:g} MB with {budget['backend']}")
    return ", ".join(words)


def fits(row: dict[str, Any], budget: dict[str, Any]) -> bool:
    """Whether a measured candidate meets every limit given (latency by its p90 against the budget less its
    margin, ``latency_limit``; memory by the measured peak RSS, a failed measurement (NaN) meets nothing)."""
    memory = budget.get("max_memory_mb")
    return (
        (budget.get("latency_ms") is None or row["p90_ms"] <= latency_limit(budget))
        and (budget.get("max_params") is None or row["params"] <= budget["max_params"])
        and (budget.get("max_macs") is None or row["macs"] <= budget["max_macs"])
        and (memory is None or row.get("peak_rss_mb", float("nan")) <= memory)
    )


def choose(rows: list[dict[str, Any]], budget: dict[str, Any]) -> dict[str, Any]:
    """The largest row (MACs, then params) that fits ``budget``; none: one line naming the candidate
    closest to it (the fastest for a latency budget, the least memory for a memory one, else the
    smallest) and what it measured."""
    meeting = [r for r in rows if fits(r, budget)]
    if not meeting:
        if budget.get("latency_ms") is not None:
            best = min(rows, key=lambda r: r["p90_ms"])
            what = f"the fastest, {best['name']}, takes {best['p50_ms']:.3g} ms (p90 {best['p90_ms']:.3g})"
        elif budget.get("max_memory_mb") is not None:
            best = min(rows, key=lambda r: (r.get("peak_rss_mb", float("inf")), r["macs"]))
            what = (
                f"the least memory, {best['name']}, peaks at {best.get('peak_rss_mb', float('nan')):.0f} MB "
                f"(the runtime alone {best.get('runtime_rss_mb', float('nan')):.0f} MB)"
            )
        else:
            best = min(rows, key=lambda r: (r["macs"], r["params"]))
            what = f"the smallest, {best['name']}, has {best['params']:,} params and {best['macs']:,} MACs"
        raise UserError(
            f"no candidate meets {budget_words(budget)}: {what}; raise the budget{lower_margin(budget)} or give "
            "smaller --widths"
        )
    return max(meeting, key=lambda r: (r["macs"], r["params"]))


def confirm_choice(
    rows: list[dict[str, Any]],
    budget: dict[str, Any],
    retime: Callable[[dict[str, Any]], Timing],
    times: int,
    reference_ms: float | None = None,
    *,
    slow_retries: int = 3,
    pause_s: float = SLOW_PAUSE_S,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The largest row that meets ``budget`` in the sweep *and* whose p90 meets the latency less the margin
    (``latency_limit``) in each of ``times`` re-timings alone (``retime(row)``: built again from its config,
    nothing else loaded: how it is deployed), trying the next smaller one after a miss; with the record of
    every candidate tried.

    A miss whose speed probe ran ``SLOW`` times the sweep's (``reference_ms``) is the machine's, not the
    shape's: after ``pause_s`` the re-timing is taken again, ``slow_retries`` times at most in a row."""
    limit = latency_limit(budget)
    tried: list[dict[str, Any]] = []
    for row in sorted((r for r in rows if fits(r, budget)), key=lambda r: (r["macs"], r["params"]), reverse=True):
        record: dict[str, Any] = {"name": row["name"], "p90_ms": [], "speed": [], "slow": []}
        in_a_row = 0
        while len(record["p90_ms"]) < times:
            timing = retime(row)
            speed = timing.speed(reference_ms)
            if timing.slow_miss(limit, reference_ms):
                record["slow"].append({"p90_ms": timing.p90_ms, "speed": speed})
                in_a_row += 1
                if in_a_row > slow_retries:
                    raise UserError(
                        f"{row['name']} missed {budget_words(budget)} in {in_a_row} re-timings in a row while this "
                        f"machine ran {speed:.1f}x slower than during the sweep (the speed probe; slow windows "
                        f"{pause_s:g} s apart): its latency cannot be told from the machine's; run size-student "
                        "again when the machine is steady, or on the device that ships"
                    )
                print(
                    f"size-student: {row['name']} p90 {timing.p90_ms:.3g} ms while the machine ran {speed:.1f}x "
                    f"slower than in the sweep; timing it again in {pause_s:g} s",
                    flush=True,
                )
                sleep(pause_s)
                continue
            in_a_row = 0
            record["p90_ms"].append(timing.p90_ms)
            record["speed"].append(speed)
            if timing.p90_ms > limit:  # one miss at the machine's usual speed is enough to move on
                break
        record["held"] = max(record["p90_ms"]) <= limit
        tried.append(record)
        if record["held"]:
            return row, tried
    last = tried[-1]
    raise UserError(
        f"no candidate meets {budget_words(budget)} when re-timed alone ({times} times each, after the sweep): the "
        f"smallest that met it in the sweep, {last['name']}, took p90 {max(last['p90_ms']):.3g} ms alone; raise "
        f"the budget{lower_margin(budget)}, give smaller --widths, or measure on a quieter machine"
    )


def speed_summary(sweep_probe: list[float], tried: list[dict[str, Any]]) -> dict[str, Any]:
    """The speed probe's record for the report: the sweep's median and p90, the re-timings' speed
    relative to it, and whether the sweep itself ran in a slow window (the re-timings' median speed
    under 1 / SLOW of it)."""
    speeds = [s for t in tried for s in t["speed"] if s == s]
    summary: dict[str, Any] = {
        "sweep_p50_ms": median(sweep_probe),
        "sweep_p90_ms": float(np.percentile(sweep_probe, 90)) if sweep_probe else float("nan"),
        "retimed_speed": speeds,
        "slow_windows": sum(len(t["slow"]) for t in tried),
    }
    summary["sweep_slow"] = bool(speeds) and median(speeds) <= 1 / SLOW
    return summary
