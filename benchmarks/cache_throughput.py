"""Issue 8, 4b: LM-demo student training throughput: plain CE vs online KD vs cached top-k vs cached sampled.

    python benchmarks/cache_throughput.py [--steps 30] [--rounds 3] [--json PATH] [key=value ...]

The teacher and student shapes of configs/lm_stdlib.yaml (teacher 4 x 256, student 3 x 128, 2,048-id
vocabulary, rows of 128 tokens, 16 rows per step) on a smaller slice of the corpus (so that caching
it takes seconds); the teacher is trained for a few steps only (its weights do not change the speed).
Every mode trains a fresh student for the same steps on the same batches, with KD + CE from the first
step; the modes are interleaved in rounds (a shared CPU drifts), and each mode's median tokens/s is
reported with its ratio to plain CE and to online KD. The time to write each cache (one teacher pass
over every training row) is reported separately. Extra ``key=value`` overrides go to the config.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from distilflow.config import load_config
from distilflow.data.cache import cache_dir, read_manifest
from distilflow.losses.logits import cross_entropy_sum, forward_kl
from distilflow.losses.sparse import sparse_divergence
from distilflow.pipeline import baseline_stage, distill_stage, open_run
from distilflow.stages import Run
from distilflow.teacher_signals import cache_stage
from distilflow.teacher_stages import teacher_stage
from distilflow.teachers.cached import CachedTeacher

MODES = ("plain_ce", "online_kd", "cached_topk", "cached_sampled")
CACHES = {"cached_topk": ["cache.format=topk"], "cached_sampled": ["cache.format=sampled"]}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loss_costs(work, teacher, cached_runs: list[Run], repeats: int = 5) -> dict[str, float]:
    """CPU milliseconds of each KD or CE loss (forward + backward) on one micro-batch of student
    logits, with the teacher signals of real rows: what separates the modes besides the teacher pass."""
    task = work.task("student", cached_runs[0].cfg.student.train, 0)
    batch = task.micro_batches(0)[0]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        teacher_logits = task.forward(teacher, batch)
    student_logits = torch.randn_like(teacher_logits)
    temperature = cached_runs[0].cfg.distill.temperature
    signals = {}
    for run in cached_runs:
        reader = CachedTeacher(cache_dir(run.cfg), read_manifest(cache_dir(run.cfg)), work.device)
        signals[run.cfg.cache.format] = reader(batch, features=False).logits
    cases = {
        "ce": lambda s: cross_entropy_sum(s, labels, ignore_index=-100),
        "full forward_kl": lambda s: forward_kl(s, teacher_logits, temperature=temperature, mask=mask),
        "topk buckets": lambda s: sparse_divergence(s, signals["topk"], temperature=temperature, mask=mask),
        "sampled": lambda s: sparse_divergence(s, signals["sampled"], temperature=temperature, mask=mask),
    }
    out = {}
    for name, fn in cases.items():
        begin = _cpu_seconds()
        for _ in range(repeats):
            logits = student_logits.clone().requires_grad_(True)
            fn(logits).backward()
        out[name] = round(1000 * (_cpu_seconds() - begin) / repeats, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per student and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=32, help="top-k ids per position")
    parser.add_argument("--samples", type=int, default=12, help="sampled draws per position")
    parser.add_argument("--out", default="runs/bench-cache-throughput")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    common = [
        "data.stdlib.train_chars=250000",
        "data.stdlib.eval_chars=2000",  # evaluation runs once at the end of each student: kept negligible
        "threads=1",
        "teacher.train.steps=20",
        "teacher.train.warmup_steps=5",
        "teacher.train.eval_every=0",
        f"student.train.steps={args.steps}",
        f"student.train.warmup_steps={min(5, args.steps)}",
        "student.train.eval_every=0",
        f"student.train.log_every={args.steps}",
        "student.train.checkpoint_every=0",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        "distill.kd_weight.warmup_steps=0",
        "deploy.enabled=false",
        f"cache.k={args.k}",
        f"cache.samples={args.samples}",
        *args.overrides,
    ]

    def config(folder: str, *extra: str):
        (out / folder).mkdir(parents=True, exist_ok=True)  # Run() below skips open_run, which makes it
        return load_config("configs/lm_stdlib.yaml", [*common, f"output_dir={out / folder}", *extra])

    base = open_run(config("base"))
    work = base.work
    teacher, _ = teacher_stage(base, log_tensorboard=False)
    student_facts = work.facts(work.new_model("student"))
    teacher_facts = work.facts(teacher)
    compute_ratio = teacher_facts["macs_per_token"] / student_facts["macs_per_token"]

    def cached_config(mode: str, folder: str, *extra: str):
        # The teacher of the base folder; each cache in its own folder.
        teacher_file = out / "base" / "teacher" / "model.safetensors"
        return config(
            folder, *CACHES[mode], f"cache.path={out / mode}", f"teacher.model.checkpoint={teacher_file}", *extra
        )

    writes = {}
    for mode in CACHES:
        cfg = cached_config(mode, "base-" + mode)
        began, cpu = time.monotonic(), _cpu_seconds()
        manifest = cache_stage(Run(cfg, work), teacher, quiet=True)
        positions = manifest["identity"]["rows"] * (cfg.data.stdlib.seq_len - 1)
        size = sum(s["bytes"] for s in manifest["shards"])
        writes[mode] = {
            "seconds": round(time.monotonic() - began, 2),
            "cpu_seconds": round(_cpu_seconds() - cpu, 2),
            "rows": manifest["identity"]["rows"],
            "bytes": size,
            "bytes_per_token": round(size / positions, 1),
        }
        print(f"{mode}: cache written ({writes[mode]})", flush=True)

    # Tokens of the steps every student trains on (the same batches in every mode).
    task = work.task("student", base.cfg.student.train, base.cfg.seed + 1)
    tokens = sum(task.count(b) for step in range(args.steps) for b in task.micro_batches(step))
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            folder = f"{mode}-{round_}"
            before = _cpu_seconds()
            if mode == "plain_ce":
                _, result = baseline_stage(Run(config(folder), work), log_tensorboard=False, teacher=teacher)
            elif mode == "online_kd":
                _, result = distill_stage(Run(config(folder), work), teacher, log_tensorboard=False)
            else:
                run = Run(cached_config(mode, folder, "cache.use=true"), work)
                _, result = distill_stage(run, None, log_tensorboard=False)
            # CPU seconds of the whole stage (steps, plus a tiny evaluation and the final save): on a
            # shared machine they follow the work done; wall-clock tokens/s follow the neighbours too.
            cpu[mode].append(tokens / (_cpu_seconds() - before))
            wall[mode].append(result["train_tokens_per_s"])
            print(f"round {round_ + 1} {mode}: {cpu[mode][-1]:.0f} tokens per CPU-s, {wall[mode][-1]:.0f} tokens/s")

    rows = []
    for mode in MODES:
        row = {"mode": mode}
        for name, values in (("cpu", cpu), ("wall", wall)):
            median = {m: statistics.median(v) for m, v in values.items()}
            row[f"{name}_tokens_per_s"] = round(median[mode], 1)
            row[f"{name}_per_round"] = [round(v, 1) for v in values[mode]]
            row[f"{name}_vs_plain_ce"] = round(median[mode] / median["plain_ce"], 3)
            row[f"{name}_vs_online_kd"] = round(median[mode] / median["online_kd"], 3)
        rows.append(row)
    losses = _loss_costs(work, teacher, [Run(cached_config(m, "base-" + m), work) for m in CACHES])
    report = {
        "steps": args.steps,
        "rounds": args.rounds,
        "k": args.k,
        "samples": args.samples,
        "teacher_macs_per_token": teacher_facts["macs_per_token"],
        "student_macs_per_token": student_facts["macs_per_token"],
        "teacher_to_student_compute": round(compute_ratio, 2),
        "tokens_per_student": tokens,
        "cache_writes": writes,
        "modes": rows,
        "loss_cpu_ms_per_micro_batch": losses,
    }
    print(f"\nteacher / student compute per token: {compute_ratio:.2f}x; {args.steps} steps x {args.rounds} rounds")
    print(f"{tokens} tokens per student; threads={base.cfg.threads}\n")
    header = ["mode", "tokens per CPU-s", "vs plain CE", "vs online KD", "wall tokens/s (rounds)", "wall vs plain CE"]
    print("| " + " | ".join([*header, "wall vs online KD"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rounds = ", ".join(f"{v:.0f}" for v in r["wall_per_round"])
        cpu_part = f"{r['cpu_tokens_per_s']:.0f} | {r['cpu_vs_plain_ce']:.2f}x | {r['cpu_vs_online_kd']:.2f}x"
        wall_part = (
            f"{r['wall_tokens_per_s']:.0f} ({rounds}) | {r['wall_vs_plain_ce']:.2f}x | {r['wall_vs_online_kd']:.2f}x"
        )
        print(f"| {r['mode']} | {cpu_part} | {wall_part} |")
    print("\n| cache | write s (wall) | write CPU-s | rows | bytes | bytes/token |")
    print("|---|---|---|---|---|---|")
    for mode, w in writes.items():
        print(
            f"| {mode} | {w['seconds']} | {w['cpu_seconds']} | {w['rows']} | {w['bytes']:,} | {w['bytes_per_token']} |"
        )
    print("\nThe loss alone, forward + backward on one micro-batch of student logits (16 x 127 x V), CPU ms:")
    print("| " + " | ".join(losses) + " |")
    print("|" + "---|" * len(losses))
    print("| " + " | ".join(f"{v:.0f}" for v in losses.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
