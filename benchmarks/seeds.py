"""Baseline vs distilled student over several seeds, one fixed teacher, for any config.

    python benchmarks/seeds.py CONFIG --teacher PATH [--seeds 0 1 2] [--out DIR] [key=value ...]

PATH is a trained teacher (a stage folder such as runs/lm_stdlib/teacher, or its model.safetensors).
Prints the held-out metric of both students per seed, mean +- std, and the training throughput of a
plain step (baseline) next to a distillation step (student) in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

from distilflow.config import load_config
from distilflow.pipeline import baseline_stage, distill_stage, open_run
from distilflow.teacher_stages import teacher_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-seeds")
    parser.add_argument(
        "--include", nargs="*", default=[], help="finished run folders (same config) whose students count as seeds too"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    rows = []
    for folder in args.include:
        seed = load_config(Path(folder) / "config.yaml").seed
        base, student = (json.loads((Path(folder) / s / "result.json").read_text()) for s in ("baseline", "student"))
        rows.append({"seed": seed, "baseline": base, "student": student, "from": folder})
        print(f"seed {seed} (from {folder}): baseline {base}, distilled {student}", flush=True)
    for seed in args.seeds:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"seed={seed}",
                f"output_dir={Path(args.out) / f'seed{seed}'}",
                f"teacher.model.checkpoint={args.teacher}",
            ],
        )
        run = open_run(cfg)
        teacher, _ = teacher_stage(run, log_tensorboard=False)
        _, base = baseline_stage(run, log_tensorboard=False, teacher=teacher)
        _, student = distill_stage(run, teacher, log_tensorboard=False)
        rows.append({"seed": seed, "baseline": base, "student": student})
        print(f"seed {seed}: baseline {base}, distilled {student}", flush=True)
    metric = "perplexity" if "perplexity" in rows[0]["baseline"] else "accuracy"
    unit = next(k for k in rows[0]["baseline"] if k.startswith("train_") and k.endswith("_per_s"))
    seeds = [r["seed"] for r in rows]

    def stats(stage: str, key: str) -> str:
        values = [r[stage][key] for r in rows]
        std = sample_std(values)
        return f"{statistics.mean(values):.4f} +- {std:.4f}"

    print(f"\n| student | held-out {metric} (mean +- std, seeds {seeds}) | training {unit} |\n|---|---|---|")
    for stage in ("baseline", "student"):
        print(f"| {stage} | {stats(stage, metric)} | {stats(stage, unit)} |")
    diffs = [r["baseline"][metric] - r["student"][metric] for r in rows]
    print(f"\nper-seed baseline - distilled: {', '.join(f'{d:.4f}' for d in diffs)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "seeds.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
