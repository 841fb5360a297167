"""LM demo students over seeds, one fixed teacher: CE only, distilled, distilled + adaptive KD weight, label-free.

    python benchmarks/lm_adaptive_label_free.py --teacher PATH [--cases ce kd adaptive label_free]
        [--seeds 0 1 2] [--out DIR] [--table] [key=value ...]

PATH is a trained teacher of configs/lm_stdlib.yaml (a stage folder or its model.safetensors). Each
(case, seed) is its own run folder ``DIR/<case>/seed<N>``; one whose stage finished is skipped, so
the script can be called once per run (e.g. one per CPU slot) and resumed. ``--table`` trains nothing
and prints what is there. The cases (the rest of the config as shipped):

- ``ce``: the baseline stage (next-token cross-entropy only, no teacher);
- ``kd``: the distilled student, the shipped phases and KD-weight schedule;
- ``adaptive``: ``kd`` + ``distill.adaptive`` (teacher entropy, prefer confident, tau 1: per token);
- ``label_free``: ``distill.label_free`` with the ``ce`` term dropped from the last phase (feature
  0.2 -> KD 0.8 of the steps): KD alone from raw text, the next tokens never read as labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

CASES = {
    "ce": [],
    "kd": [],
    "adaptive": ["distill.adaptive={source: entropy, prefer: confident, tau: 1.0}"],
    "label_free": [
        "distill.label_free=true",
        "distill.phases=[{name: feature_alignment, fraction: 0.2, terms: [feature]}, "
        "{name: soft_label_pretrain, fraction: 0.5, terms: [kd]}, {name: kd_only, fraction: 0.3, terms: [kd]}]",
    ],
}
LABELS = {
    "ce": "CE only (baseline stage)",
    "kd": "distilled, shipped schedule",
    "adaptive": "distilled + adaptive KD weight (entropy)",
    "label_free": "label-free (KD alone, raw text)",
}


def result_path(out: Path, case: str, seed: int) -> Path:
    stage = "baseline" if case == "ce" else "student"
    return out / case / f"seed{seed}" / stage / "result.json"


def train(config: str, teacher: str, out: Path, case: str, seed: int, overrides: list[str]) -> dict:
    from distilflow.config import load_config
    from distilflow.pipeline import baseline_stage, distill_stage, open_run
    from distilflow.teacher_stages import teacher_stage

    cfg = load_config(
        config,
        [
            "threads=1",
            "deploy.enabled=false",
            *CASES[case],
            *overrides,
            f"seed={seed}",
            f"output_dir={out / case / f'seed{seed}'}",
            f"teacher.model.checkpoint={teacher}",
        ],
    )
    run = open_run(cfg)
    model, _ = teacher_stage(run, log_tensorboard=False)
    if case == "ce":
        return baseline_stage(run, log_tensorboard=False, teacher=model)[1]
    return distill_stage(run, model, log_tensorboard=False)[1]


def table(out: Path, cases: list[str], seeds: list[int]) -> str:
    lines = [
        "| student | held-out perplexity (mean +- std) | seeds | per seed | train s (mean) |",
        "|---|---:|---|---|---:|",
    ]
    for case in cases:
        found = [
            (s, json.loads(result_path(out, case, s).read_text())) for s in seeds if result_path(out, case, s).is_file()
        ]
        if not found:
            continue
        ppl = [r["perplexity"] for _, r in found]
        std = sample_std(ppl)
        per_seed = ", ".join(f"{p:.2f}" for p in ppl)
        secs = statistics.mean(r["train_seconds"] for _, r in found)
        mean = f"{statistics.mean(ppl):.2f} +- {std:.2f}"
        lines.append(f"| {LABELS[case]} | {mean} | {[s for s, _ in found]} | {per_seed} | {secs:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/lm_stdlib.yaml")
    parser.add_argument("--teacher", help="the fixed trained teacher (needed unless --table)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-lm-adaptive-label-free")
    parser.add_argument("--table", action="store_true", help="print the table of finished runs only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    if not args.table:
        if not args.teacher:
            parser.error("--teacher is needed to train")
        for case in args.cases:
            for seed in args.seeds:
                if result_path(out, case, seed).is_file():
                    print(f"{case} seed {seed}: finished, skipped", flush=True)
                    continue
                result = train(args.config, args.teacher, out, case, seed, args.overrides)
                print(f"{case} seed {seed}: perplexity {result['perplexity']:.4f}", flush=True)
    print(table(out, list(CASES), args.seeds))


if __name__ == "__main__":
    main()
