"""``distilflow generate`` under torchrun: each rank generates its share of the prompts into its own
resumable part, and rank 0 merges the parts into the one output file.

Rank r takes the unfinished prompts r, r + N, r + 2N, ... (N processes) and runs the ordinary
single-process generator (generate/runner.py) on them, writing ``OUTPUT.rank-R`` with its own
progress file. After a barrier rank 0 appends the finished prompts of every part to ``OUTPUT`` and
``OUTPUT.progress`` in prompt-set order and removes the parts; the merged files are what a
1-process run writes, so any later run, on any number of processes, sees those prompts as done. A job
that is killed leaves parts whose finished prompts are merged when the next job starts.

With greedy decoding (``generate.temperature=0``) the rows equal a 1-process run's; with sampling
they are an equally valid draw, but not the same one (the random stream follows the batches).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from distilflow.generate.prompts import read_prompts
from distilflow.generate.writer import (
    PROGRESS_SUFFIX,
    SUMMARY_SUFFIX,
    check_output_path,
    read_complete_lines,
    rewrite_lines,
)
from distilflow.storage import check_writable, write_text
from distilflow.train import dist

COUNTS = ("prompts", "already_done", "generated_prompts", "kept", "rejected", "duplicates", "tokens")


def output_path(cfg: Any) -> Path:
    return Path(cfg.generate.output) if cfg.generate.output else cfg.run_dir / "generated.jsonl"


def run_generate_sharded(cfg: Any) -> dict[str, Any]:
    """The ``generate`` command: the plain generator in one process, split over the ranks under torchrun."""
    from distilflow.device import resolve_device
    from distilflow.generate.runner import run_generate

    with dist.input_checks():  # the same inputs on every rank: rank 0 alone reports what is wrong
        world = dist.setup(cfg, resolve_device(cfg.device))
        if not cfg.generate.prompts:
            return run_generate(cfg)  # which names the missing key
        output = output_path(cfg)
        check_output_path(output)  # before any part is merged or a model loaded
        check_writable(output.parent, "the folder of generate.output")
        prompt_set = read_prompts(cfg.generate.prompts, on_error=cfg.generate.on_error)
    order = [p.id for p in prompt_set.prompts]
    if not world.distributed:
        merge_parts(output, order)  # finished prompts of an interrupted torchrun job, if any
        return run_generate(cfg)
    with world.main_first("merging the parts of an earlier job"):
        if world.is_main:
            merge_parts(output, order)
    finished = _finished(output)
    todo = [p for p in prompt_set.prompts if p.id not in finished]
    mine = todo[world.rank :: world.size]
    part = output.with_name(f"{output.name}.rank-{world.rank}")
    summary = {key: 0 for key in COUNTS} | {"seconds": 0.0, "reasons": {}, "bad_lines_skipped": 0}
    if mine:
        subset = part.with_name(part.name + ".prompts.jsonl")
        subset.parent.mkdir(parents=True, exist_ok=True)
        write_text(subset, "".join(json.dumps(p.as_record(), ensure_ascii=False) + "\n" for p in mine))
        g = dataclasses.replace(cfg.generate, prompts=str(subset), output=str(part))
        summary = run_generate(dataclasses.replace(cfg, generate=g), show_progress=world.is_main)
    summaries = world.all_gather_objects(summary)  # also the barrier before the merge
    if world.is_main:
        merge_parts(output, order)
    total = _combine(summaries, prompts=len(prompt_set.prompts), done_before=len(prompt_set.prompts) - len(todo))
    total |= {"output": str(output), "samples_in_file": len(read_complete_lines(output)[0])}
    total["bad_lines_skipped"] = prompt_set.skipped
    if world.is_main:
        write_text(output.with_name(output.name + SUMMARY_SUFFIX), json.dumps(total, indent=2) + "\n")
        if prompt_set.skipped:
            skipped = prompt_set.skipped
            print(f"distilflow: skipped {skipped} bad prompt lines (generate.on_error=skip)", file=sys.stderr)
    world.barrier("merging the generated parts")
    return total


def _finished(output: Path) -> set[str]:
    progress, _ = read_complete_lines(output.with_name(output.name + PROGRESS_SUFFIX))
    return {str(row["id"]) for row in progress if "id" in row}


def _combine(summaries: list[dict[str, Any]], *, prompts: int, done_before: int) -> dict[str, Any]:
    total: dict[str, Any] = {key: sum(s.get(key, 0) for s in summaries) for key in COUNTS}
    total["prompts"], total["already_done"] = prompts, done_before
    total["seconds"] = round(max(s.get("seconds", 0.0) for s in summaries), 2)  # the ranks run side by side
    total["tokens_per_s"] = round(total["tokens"] / total["seconds"], 1) if total["seconds"] else 0.0
    reasons: dict[str, int] = {}
    for s in summaries:
        for key, value in s.get("reasons", {}).items():
            reasons[key] = reasons.get(key, 0) + value
    total["reasons"] = reasons
    total["model"] = next((s["model"] for s in summaries if "model" in s), "")
    return total


def merge_parts(output: Path, order: list[str]) -> None:
    """Append the finished prompts of every ``OUTPUT.rank-R`` part to OUTPUT (rows, then progress),
    in prompt-set order, then remove the parts. A prompt already in OUTPUT is not added twice."""
    parts = sorted(output.parent.glob(f"{output.name}.rank-*[0-9]")) if output.parent.is_dir() else []
    if not parts:
        return
    progress_path = output.with_name(output.name + PROGRESS_SUFFIX)
    progress, _ = read_complete_lines(progress_path)
    done = {str(row["id"]) for row in progress if "id" in row}
    rows = [row for row in read_complete_lines(output)[0] if str(row.get("id")) in done]
    for part in parts:
        part_progress, _ = read_complete_lines(part.with_name(part.name + PROGRESS_SUFFIX))
        new = [row for row in part_progress if "id" in row and str(row["id"]) not in done]
        ids = {str(row["id"]) for row in new}
        rows += [row for row in read_complete_lines(part)[0] if str(row.get("id")) in ids]
        progress += new
        done |= ids
    rank = {pid: i for i, pid in enumerate(order)}
    last = len(order)
    rows.sort(key=lambda row: (rank.get(str(row.get("id")), last), row.get("sample", 0)))
    progress.sort(key=lambda row: rank.get(str(row.get("id")), last))
    # Rows first: a crash before the progress file is replaced leaves rows of unlisted prompts,
    # which the writer drops on its next start, while the parts (removed last) still hold them.
    rewrite_lines(output, rows)
    rewrite_lines(progress_path, progress)
    for part in parts:
        for path in (part, *part.parent.glob(part.name + ".*")):
            path.unlink(missing_ok=True)
