"""CE-only vs ULD vs hybrid across tokenizers, several seeds, one fixed teacher; and the cost per step.

    python benchmarks/cross_tokenizer_kd.py [--seeds 0 1 2] [--out DIR] [--cost-steps 20] [--full]
        [--modes uld hybrid hybrid-span] [--skip-ce] [--teacher PATH] [key=value ...]

The config is configs/lm_stdlib_cross_tokenizer.yaml (the demo's Llama teacher on the byte-level BPE
2,048, a Qwen2-style student on the unigram 4,096), shortened by SHORT (fewer characters and steps, one
kd + ce phase) unless ``--full`` (the shipped demo as it is, at threads=1) or overridden. The teacher is
trained once (or read back from --out); per seed the student is trained on the same aligned rows: CE only
(the baseline stage) and once per ``--modes`` (ULD, the hybrid with GOLD's merged buckets, the hybrid
with span buckets). Prints held-out perplexity (over the
student's own tokens) and bits per character, mean +- std, and the hybrid's gap to CE per seed.

Cost: ``--cost-steps`` distillation steps of same-tokenizer KD (a student of the same family on the
teacher's BPE), ULD and the hybrid, one after another in this process: seconds per step (wall and CPU)
and the stage's peak RSS.
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

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_stdlib_cross_tokenizer.yaml"
SHORT = [  # 35 min at threads=1 on a 2-core machine at load 6-11 (the full demo is ~15 min per run at 2 threads)
    "threads=1",
    "data.stdlib.train_chars=1500000",
    "data.stdlib.eval_chars=60000",
    "teacher.train.steps=200",
    "teacher.train.batch_size=8",
    "teacher.train.eval_every=200",
    "teacher.train.warmup_steps=20",
    "student.train.steps=100",
    "student.train.batch_size=8",
    "student.train.eval_every=100",
    "student.train.warmup_steps=10",
    "distill.kd_weight.warmup_steps=10",
    "distill.phases=[{name: joint, fraction: 1.0, terms: [kd, ce]}]",
    "deploy.enabled=false",
]


MODES = {  # what each --modes entry sets
    "uld": ["distill.cross_tokenizer=uld"],
    "hybrid": ["distill.cross_tokenizer=hybrid"],  # GOLD's merged buckets
    "hybrid-span": ["distill.cross_tokenizer=hybrid", "distill.hybrid_buckets=span"],
}
FULL = ["threads=1", "deploy.enabled=false"]  # the shipped demo: ~80 min at threads=1 for CE + hybrid, 3 seeds
PRESET = SHORT


def trained_teacher(out: Path, overrides: list[str]) -> Path:
    cfg = load_config(CONFIG, [*PRESET, *overrides, f"output_dir={out / 'teacher_run'}"])
    run = open_run(cfg)
    weights = run.stage_dir("teacher") / "model.safetensors"
    if not weights.is_file():
        teacher_stage(run, log_tensorboard=False)
    return weights


def stage_run(out: Path, name: str, teacher: Path, overrides: list[str]):
    """The run, the frozen teacher and its result: its evaluation on this config's held-out text."""
    cfg = load_config(CONFIG, [*PRESET, *overrides, f"output_dir={out / name}", f"teacher.model.checkpoint={teacher}"])
    run = open_run(cfg)
    return run, *teacher_stage(run, log_tensorboard=False)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} +- {sample_std(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-cross-tokenizer")
    parser.add_argument("--cost-steps", type=int, default=20)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-ce", action="store_true", help="no CE-only student (measured by an earlier call)")
    parser.add_argument("--full", action="store_true", help="the shipped demo's length, not SHORT")
    parser.add_argument("--teacher", help="a trained teacher's model.safetensors (its result.json beside it)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["uld", "hybrid"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    global PRESET
    PRESET = FULL if args.full else SHORT
    out = Path(args.out)
    teacher = Path(args.teacher) if args.teacher else trained_teacher(out, args.overrides)
    teacher_result = json.loads((teacher.parent / "result.json").read_text())
    print(f"teacher (its own run): {teacher_result}", flush=True)
    scored = None  # the teacher evaluated on this config's held-out rows (its own run's may be another data set)
    rows: dict[str, list[dict]] = {"ce": [], **{mode: [] for mode in args.modes}}
    for seed in [] if args.skip_quality else args.seeds:
        for mode in args.modes:
            given = [*args.overrides, f"seed={seed}", *MODES[mode]]
            run, frozen, evaluated = stage_run(out, f"seed{seed}-{mode}", teacher, given)
            if scored is None:
                scored = evaluated
                print(f"teacher on this config's held-out rows: {evaluated}", flush=True)
            if mode == args.modes[0] and not args.skip_ce:  # CE only on the same aligned rows: the baseline stage
                _, base = baseline_stage(run, log_tensorboard=False, teacher=frozen)
                rows["ce"].append(base)
                print(f"seed {seed} ce: {base}", flush=True)
            _, result = distill_stage(run, frozen, log_tensorboard=False)
            rows[mode].append(result)
            print(f"seed {seed} {mode}: {result}", flush=True)
    if args.skip_ce:  # no CE row to pair with: each mode's figures alone
        for mode in args.modes:
            print(f"{mode} bits/char per seed {args.seeds}: {[round(r['bits_per_char'], 4) for r in rows[mode]]}")
    if rows["ce"]:
        print(f"\nheld-out, {len(rows['ce'])} seeds {args.seeds}; teacher bits/char {scored['bits_per_char']:.4f}")
        print(f"{'student':<8} {'perplexity (own tokens)':>26} {'bits per char':>20}")
        for mode, results in rows.items():
            ppl = mean_std([r["perplexity"] for r in results])
            bpc = mean_std([r["bits_per_char"] for r in results])
            print(f"{mode:<8} {ppl:>26} {bpc:>20}")
        for mode in args.modes:  # paired by seed: same init, batch order and rows as the CE run
            gaps = [ce["bits_per_char"] - r["bits_per_char"] for ce, r in zip(rows["ce"], rows[mode], strict=True)]
            print(f"{mode} better than CE by (bits/char, per seed): {[round(g, 4) for g in gaps]} = {mean_std(gaps)}")
    if args.cost_steps <= 0:
        return
    cost = [f"student.train.steps={args.cost_steps}", "student.train.eval_every=0", "seed=0", *args.overrides]
    cost.append("data.stdlib.eval_chars=20000")  # the stage's closing evaluation stays small next to its steps
    print(f"\ncost per distillation step ({args.cost_steps} steps each, one process, in this order)")
    print(f"{'KD':<26} {'s/step wall':>12} {'s/step CPU':>11} {'peak RSS MB':>12}")
    for label, extra in (
        (
            "same tokenizer (plain KD)",
            ["data.stdlib.student_tokenizer=bpe", "data.stdlib.student_vocab_size=0", "data.stdlib.teacher_seq_len=0"],
        ),
        ("ULD", ["distill.cross_tokenizer=uld"]),
        ("hybrid", ["distill.cross_tokenizer=hybrid"]),
    ):
        run, frozen, _ = stage_run(out, "cost-" + label.split()[0].lower(), teacher, [*cost, *extra])
        cpu = time.process_time()
        _, result = distill_stage(run, frozen, log_tensorboard=False)
        cpu, steps = time.process_time() - cpu, result["steps"]  # CPU: the stage with its closing evaluation
        wall = result["train_seconds"] / steps
        print(f"{label:<26} {wall:>12.3f} {cpu / steps:>11.3f} {result['peak_rss_bytes'] / 2**20:>12.0f}")


if __name__ == "__main__":
    main()
