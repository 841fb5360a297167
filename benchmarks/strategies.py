"""Strategy table on MNIST-1D: CE only, Hinton KD, progressive phases, + feature alignment.

Every strategy trains the same student (the default config's MLP) for the same number of steps
and batch size, from the same teacher per seed; mean +- std over seeds.

    python benchmarks/strategies.py [--seeds 0 1 2] [--out runs/bench-strategies] [key=value ...]

Prints a Markdown table; the raw numbers go to <out>/strategies.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

from distilflow.config import load_config
from distilflow.pipeline import baseline_stage, distill_stage, open_run
from distilflow.teacher_stages import teacher_stage

KD_CE = "[{name: kd_and_ce, fraction: 1.0, terms: [kd, ce]}]"
STRATEGIES = {
    "ce_only": ("CE only (no teacher)", []),
    "hinton_kd": (
        "plain KD (Hinton): 0.7 KD + 0.3 CE, constant",
        [f"distill.phases={KD_CE}", "distill.kd_weight.schedule=constant"],
    ),
    "progressive": (
        "progressive: soft labels 0.7 -> joint 0.3, article KD-weight ramp",
        [
            "distill.phases=[{name: soft_label_pretrain, fraction: 0.7, terms: [kd]},"
            " {name: joint_optimization, fraction: 0.3, terms: [kd, ce]}]",
            "distill.kd_weight.schedule=article",
            "distill.kd_weight.warmup_steps=200",
        ],
    ),
    "progressive_feature": (
        "article phases: feature 0.2 -> soft 0.5 -> joint 0.3, article KD-weight ramp",
        [
            "distill.phases=[{name: feature_alignment, fraction: 0.2, terms: [feature]},"
            " {name: soft_label_pretrain, fraction: 0.5, terms: [kd]},"
            " {name: joint_optimization, fraction: 0.3, terms: [kd, ce]}]",
            "distill.kd_weight.schedule=article",
            "distill.kd_weight.warmup_steps=200",
        ],
    ),
    "kd_feature_aux": (
        "KD + CE + feature term together throughout",
        [
            "distill.phases=[{name: joint, fraction: 1.0, terms: [feature, kd, ce]}]",
            "distill.kd_weight.schedule=constant",
        ],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-strategies")
    parser.add_argument("--only", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    scores: dict[str, list[float]] = {name: [] for name in args.only}
    teacher_scores = []
    began = time.monotonic()
    for seed in args.seeds:
        base = [f"seed={seed}", *args.overrides]
        teacher_dir = out / f"seed{seed}" / "teacher-run"
        run = open_run(load_config(None, [*base, f"output_dir={teacher_dir}"]))
        _, teacher_result = teacher_stage(run, log_tensorboard=False)
        teacher_scores.append(teacher_result["accuracy"])
        teacher_weights = teacher_dir / "teacher" / "model.safetensors"
        for name in args.only:
            _, extra = STRATEGIES[name]
            cfg = load_config(
                None,
                [
                    *base,
                    *extra,
                    f"output_dir={out / f'seed{seed}' / name}",
                    f"teacher.model.checkpoint={teacher_weights}",
                ],
            )
            run = open_run(cfg)
            if name == "ce_only":
                _, result = baseline_stage(run, log_tensorboard=False)
            else:
                teacher, _ = teacher_stage(run, log_tensorboard=False)
                _, result = distill_stage(run, teacher, log_tensorboard=False)
            scores[name].append(result["accuracy"])
            print(f"seed {seed} {name}: {result['accuracy']:.4f}", flush=True)

    def fmt(values: list[float]) -> str:
        std = sample_std(values)
        return f"{100 * statistics.mean(values):.2f} +- {100 * std:.2f}"

    print(f"\nteacher accuracy over seeds {args.seeds}: {fmt(teacher_scores)} %")
    print("\n| strategy | what | student test accuracy % (mean +- std) |\n|---|---|---|")
    for name in args.only:
        print(f"| {name} | {STRATEGIES[name][0]} | {fmt(scores[name])} |")
    print(f"\n{time.monotonic() - began:.0f} s in all")
    (out / "strategies.json").write_text(json.dumps({"teacher": teacher_scores, **scores}, indent=2))


if __name__ == "__main__":
    main()
