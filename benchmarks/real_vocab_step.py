"""Issue 8, benchmark 4d: one distillation step at a real vocabulary, plain vs fused loss, fp32 vs bf16.

    python benchmarks/real_vocab_step.py [--quick] [--json PATH] [--threads N] [--steps S]

Qwen2-shaped teacher (hidden 768) and student (hidden 256) built from transformers' Qwen2Config
with Qwen's vocabulary of 151,936 (random init), 4 rows x 512 tokens. A step is what the training
loop does: teacher forward (no grad), student forward, KD (forward KL, T = 2) + CE, backward,
AdamW step, through distilflow's own CausalLMTask, LiveTeacher and Objective:

- plain: the task returns logits ``(4, 511, 151936)``; the objective's plain losses;
- fused: the task returns hidden states + lm_head (``distill.loss_impl: fused``); losses/fused.py.

bf16: forward passes and the objective under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
float32 weights (what ``train.precision: bf16`` does). Each variant runs in its own child process:
peak resident set (ru_maxrss) and that minus the resident set once both models and the batch exist;
time (wall clock, and CPU time of the process: the steadier measure on a shared machine) is the
fastest of ``--steps`` steps after a first (warm-up) step, whose AdamW state allocation counts in
the peak of every variant alike. ``--quick``: 128 tokens per row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB, ROWS, TOKENS = 151936, 4, 512
TEACHER = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12}
STUDENT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}
VARIANTS = (("plain", "fp32"), ("fused", "fp32"), ("plain", "bf16"), ("fused", "bf16"))


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def qwen2(shape: dict, seed: int):
    import torch

    from distilflow.models.hf import build_causal_lm

    torch.manual_seed(seed)
    config = {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,  # as Qwen2's small models
        **shape,
    }
    return build_causal_lm(config)


def child(impl: str, precision: str, tokens: int, steps: int) -> dict:
    import torch

    from distilflow.config import KDWeightConfig
    from distilflow.losses.objective import Objective, Outputs, add_counts
    from distilflow.schedules import Phase
    from distilflow.tasks.causal_lm import CausalLMTask
    from distilflow.teachers.live import LiveTeacher

    teacher, student = qwen2(TEACHER, 0), qwen2(STUDENT, 1).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (ROWS, tokens), generator=g)
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    task = CausalLMTask(
        rows,
        rows,
        batch_size=ROWS,
        grad_accum=1,
        seed=0,
        device=torch.device("cpu"),
        loss_impl=impl,
    )
    signals = LiveTeacher(teacher, task, None)
    objective = Objective(
        [Phase("joint", 0, steps + 1, ("kd", "ce"))],
        total_steps=steps + 1,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
        temperature=2.0,
        ce_weight=0.3,
        per_token=True,
        loss_impl=impl,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    base = current_rss()
    times, cpu_times, losses = [], [], []
    for step in range(steps + 1):
        began, cpu_began = time.perf_counter(), time.process_time()
        batch = task.micro_batches(step)[0]
        target = task.targets(batch)
        counts = add_counts({}, target.counts(True))
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            teacher_out = signals(batch, features=False)
            student_out = Outputs(task.forward(student, batch))
            loss, parts = objective(step, student_out, teacher_out, target, counts)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "precision": precision,
        "tokens": ROWS * tokens,
        "peak_bytes": peak,
        "peak_above_models_bytes": peak - base,
        "seconds": min(times[1:]),
        "cpu_seconds": min(cpu_times[1:]),
        "first_step_seconds": times[0],
        "losses": losses,
        "params": {
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in student.parameters()),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 tokens per row instead of 512")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = 128 if args.quick else TOKENS
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.case[0], args.case[1], tokens, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results = {}
    print(f"one distillation step, {ROWS} x {tokens} tokens, V = {VOCAB}, {args.threads} threads", flush=True)
    print(
        f"{'loss':>6} {'precision':>9} | {'peak GiB':>8} {'above models GiB':>16} {'step s':>7} {'cpu s':>7}",
        flush=True,
    )
    for impl, precision in (v for v in VARIANTS if v[1] in args.precisions):
        command = [sys.executable, __file__, "--case", impl, precision, "--threads", str(args.threads)]
        command += ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{impl:>6} {precision:>9} | failed: {last[:160]}", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[f"{impl}_{precision}"] = r
        print(
            f"{impl:>6} {precision:>9} | {r['peak_bytes'] / 2**30:>8.2f} {r['peak_above_models_bytes'] / 2**30:>16.2f} "
            f"{r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f}",
            flush=True,
        )
    print("ratios (fused / plain, same precision):")
    for precision in ("fp32", "bf16"):
        plain, fused = results.get(f"plain_{precision}"), results.get(f"fused_{precision}")
        if plain and fused:
            mem = fused["peak_above_models_bytes"] / plain["peak_above_models_bytes"]
            sec = fused["seconds"] / plain["seconds"]
            cpu = fused["cpu_seconds"] / plain["cpu_seconds"]
            fused["memory_vs_plain"], fused["time_vs_plain"], fused["cpu_vs_plain"] = (
                round(mem, 3),
                round(sec, 3),
                round(cpu, 3),
            )
            print(f"  {precision}: memory above models {mem:.3f}, step time {sec:.2f}, cpu time {cpu:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": ROWS, "tokens_per_row": tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
