"""The reasoning demo over several seeds: held-out exact match, mean +- std per method.

    python benchmarks/reasoning_seeds.py --seeds 0 1 2 --json runs/bench/reasoning_seeds.json

Each seed is a full ``distilflow run configs/reasoning_arith.yaml seed=S`` in its own folder
(``runs/reasoning_arith_seedS``). With ``--share-teacher`` the first seed's trained teacher is
copied into the other folders (reused as a finished stage), so the spread is that of the traces'
sampling and of the students' initialisation and batch order, not of teacher training.
Finished folders are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]


def run_seed(config: Path, seed: int, out: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "distilflow", "run", str(config), f"seed={seed}", f"output_dir={out}"]
    command += [f"data.text.path={out}/data/gold.jsonl", *extra, "--no-tensorboard"]
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "reasoning_arith.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--share-teacher", action="store_true", help="train the teacher once (first seed)")
    parser.add_argument("--parallel", action="store_true", help="run the seeds at the same time (1 thread each)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every seed")
    args = parser.parse_args()
    began = time.monotonic()
    folders = {seed: args.runs / f"reasoning_arith_seed{seed}" for seed in args.seeds}
    for out in folders.values():
        out.mkdir(parents=True, exist_ok=True)
    first, *rest = args.seeds
    wall: dict[int, float] = {}
    cpu: dict[int, float] = {}

    def finish(seed: int, proc: subprocess.Popen, started: float) -> None:
        # wait4 gives this child's own CPU time (user + system), independent of other load.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall[seed], cpu[seed] = time.monotonic() - started, usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed} failed; see {folders[seed]}.log")

    todo = list(args.seeds)
    if args.share_teacher:
        started = time.monotonic()
        finish(first, run_seed(args.config, first, folders[first], args.overrides), started)
        for seed in rest:
            if not (folders[seed] / "teacher").exists():
                shutil.copytree(folders[first] / "teacher", folders[seed] / "teacher")
        todo = rest
    if args.parallel:
        started = time.monotonic()
        procs = {seed: run_seed(args.config, seed, folders[seed], args.overrides) for seed in todo}
        for seed, proc in procs.items():
            finish(seed, proc, started)
    else:
        for seed in todo:
            started = time.monotonic()
            finish(seed, run_seed(args.config, seed, folders[seed], args.overrides), started)
    results = {seed: json.loads((folders[seed] / "results.json").read_text()) for seed in args.seeds}
    names = ["teacher", *results[first]["students"]]

    def score(result: dict, name: str) -> float:
        return result["teacher"]["exact_match"] if name == "teacher" else result["students"][name]["exact_match"]

    table = {}
    for name in names:
        values = [score(results[s], name) for s in args.seeds]
        table[name] = {
            "per_seed": values,
            "mean": statistics.mean(values),
            "std": sample_std(values),
        }
    kept = [results[s]["traces"]["kept"] for s in args.seeds]
    rejected = [results[s]["traces"]["rejected"] for s in args.seeds]
    print(f"held-out exact match over seeds {args.seeds} (mean +- sample std)")
    print("| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean +- std |")
    print("|---|" + "---|" * len(args.seeds) + "---|")
    for name, row in table.items():
        cells = " | ".join(f"{v:.3f}" for v in row["per_seed"])
        print(f"| {name} | {cells} | {row['mean']:.3f} +- {row['std']:.3f} |")
    print(f"traces kept {kept}, rejected {rejected}")
    print(
        f"per run: wall seconds {[round(wall[s]) for s in args.seeds]}, "
        f"CPU seconds {[round(cpu[s]) for s in args.seeds]}"
    )
    print(f"stage seconds: {[results[s]['stage_seconds'] for s in args.seeds]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "table": table,
            "kept": kept,
            "rejected": rejected,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "stage_seconds": {s: results[s]["stage_seconds"] for s in args.seeds},
            "total_seconds": time.monotonic() - began,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
