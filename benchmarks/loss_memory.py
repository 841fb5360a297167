"""Issue 8, benchmark 4a: peak memory and time of the KD + CE loss, plain vs chunked vs fused.

    python benchmarks/loss_memory.py [--quick] [--json PATH] [--threads N] [--limit-gib G]
    python benchmarks/loss_memory.py --crossover [--hidden H] [--json PATH]

``--crossover`` (issue 14: the rule of ``distill.loss_impl: auto``): the same three over the logit
entries of one micro-batch, 2^16 to 2^26, at V = 2,048, 32,768 and 131,072 (N = entries / V rows),
H = ``--hidden`` (default 256); the table says where fused stops costing time and how much memory
it saves at each size.

For each vocabulary V and token count N (H = 1024, float32, CPU): forward + backward of
``0.7 * T^2 KL(teacher || student) / N + 0.3 * CE / N`` (T = 2) from the student's final hidden
states ``(N, H)`` and lm_head ``(V, H)``, the teacher given as its hidden states and lm_head
(an online teacher). Gradients reach the student's hidden states and lm_head.

- plain: ``hidden @ weight.T`` -> losses/logits.py (today's path);
- chunked: the same logits -> losses/chunked.py (rows in chunks; the logits themselves still exist);
- fused: losses/fused.py (logits made chunk by chunk from the hidden states and lm_head).

Each case runs in its own child process: the peak resident set (ru_maxrss) minus the resident
set once the inputs exist is the memory the loss needs (the lm_head gradient, V x H, is part of
it for all three). The child's address space is capped at ``--limit-gib`` above its inputs; a
case that needs more fails to allocate and is reported as not fitting. Time: the faster of
``--repeats`` runs, wall clock and CPU time of the process (user + system, all threads; on a
machine shared with other work the CPU time is the steadier measure of the work done). Ratios are
fused/plain and chunked/plain of the same (V, N).
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

H, TEMPERATURE, KD_WEIGHT, CE_WEIGHT = 1024, 2.0, 0.7, 0.3
GRID_V = (32768, 131072, 151936)
GRID_N = (1024, 4096)
IMPLS = ("plain", "chunked", "fused")
CROSSOVER_H = 256
CROSSOVER_V = (2048, 32768, 131072)
CROSSOVER_LOG2 = (16, 18, 20, 22, 24, 26)  # logit entries of one micro-batch: 64K to 64M


def current_rss() -> int:
    """Resident set now, bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def make_inputs(vocab: int, tokens: int, width: int, seed: int = 0) -> dict:
    """Student hidden states ``(N, H)`` and lm_head ``(V, H)`` (with gradients), the teacher's, labels ``(N,)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(tokens, width, generator=g).requires_grad_(),
        "weight": (0.02 * torch.randn(vocab, width, generator=g)).requires_grad_(),
        "teacher_hidden": torch.randn(tokens, width, generator=g),
        "teacher_weight": 0.03 * torch.randn(vocab, width, generator=g),
        "labels": torch.randint(0, vocab, (tokens,), generator=g),
    }


def loss_step(impl: str, inputs: dict, chunk_rows: int):
    """One forward + backward of the loss by ``impl``, as a function of no arguments returning the loss."""
    import torch

    from distilflow.losses.chunked import chunked_kd_ce
    from distilflow.losses.fused import HiddenStates, fused_kd_ce
    from distilflow.losses.logits import cross_entropy_sum, forward_kl

    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    teacher_hidden, teacher_weight = inputs["teacher_hidden"], inputs["teacher_weight"]
    tokens = len(labels)
    kd_w, ce_w = KD_WEIGHT / tokens, CE_WEIGHT / tokens

    options = dict(temperature=TEMPERATURE, kd_weight=kd_w, ce_weight=ce_w, chunk_rows=chunk_rows)

    def step() -> float:
        hidden.grad = weight.grad = None
        if impl == "fused":
            student, teacher = HiddenStates(hidden, weight), HiddenStates(teacher_hidden, teacher_weight)
            loss = fused_kd_ce(student, teacher, labels, **options).loss
        else:
            logits = hidden @ weight.T  # (N, V)
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            if impl == "plain":
                kd = forward_kl(logits, teacher_logits, temperature=TEMPERATURE)
                loss = kd_w * kd + ce_w * cross_entropy_sum(logits, labels)
            else:
                loss = chunked_kd_ce(logits, teacher_logits, labels, **options).loss
        loss.backward()
        return float(loss.detach())

    return step


def timing_child(vocab: int, tokens: int, rounds: int, chunk_rows: int, hidden: int) -> dict:
    """CPU seconds of the three, measured side by side in this one process: ``rounds`` rounds, each
    running plain, chunked and fused once in a rotating order (so that load from other processes
    falls on all three alike); the median per implementation."""
    import statistics

    inputs = make_inputs(vocab, tokens, hidden)
    steps = {impl: loss_step(impl, inputs, chunk_rows) for impl in IMPLS}
    for step in steps.values():  # warm-up: first calls map kernels and grow the allocator
        step()
    seconds: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        order = IMPLS[r % 3 :] + IMPLS[: r % 3]
        for impl in order:
            began = time.process_time()
            steps[impl]()
            seconds[impl].append(time.process_time() - began)
    return {impl: statistics.median(values) for impl, values in seconds.items()}


def child(impl: str, vocab: int, tokens: int, repeats: int, limit_gib: float, chunk_rows: int, hidden: int = H) -> dict:
    """One case, in this (fresh) process; returns peak bytes above the inputs and the best time."""

    width = hidden
    real = make_inputs(vocab, tokens, width)
    step = loss_step(impl, real, chunk_rows)

    # Warm up at a tiny size first: the first call of each kernel maps library code and thread
    # arenas into the resident set, which is no memory of the loss.
    loss_step(impl, make_inputs(64, 16, width, seed=1), chunk_rows)()
    base = current_rss()
    # Cap the address space: a case that does not fit fails to allocate instead of taking the machine.
    limit = address_space() + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times, cpu_times, value = [], [], None
    try:
        for _ in range(repeats):
            began, cpu_began = time.perf_counter(), time.process_time()
            value = step()
            times.append(time.perf_counter() - began)
            cpu_times.append(time.process_time() - cpu_began)
    except (RuntimeError, MemoryError) as error:
        return {"impl": impl, "V": vocab, "N": tokens, "fits": False, "error": str(error).splitlines()[0][:120]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "V": vocab,
        "N": tokens,
        "fits": True,
        "peak_bytes": peak - base,
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "loss": value,
        "logits_bytes": tokens * vocab * 4,
    }


def run_case(impl: str, vocab: int, tokens: int, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        impl,
        str(vocab),
        str(tokens),
        "--repeats",
        str(args.repeats),
        "--limit-gib",
        str(args.limit_gib),
        "--chunk-rows",
        str(args.chunk_rows),
        "--hidden",
        str(args.hidden),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "V": vocab, "N": tokens, "fits": False, "error": f"child failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def crossover(args) -> None:
    """Memory (one child per case) and CPU time (the three side by side in one child) by logit entries."""
    print(
        f"KD + CE forward+backward from hidden states, H={args.hidden}, fp32, {args.threads} threads; "
        f"time: median CPU ms of {args.rounds} interleaved rounds",
        flush=True,
    )
    print(
        f"{'V':>7} {'N':>6} {'entries':>9} | {'plain MiB':>9} {'chunked':>8} {'fused':>8} | {'plain ms':>9} "
        f"{'chunked':>8} {'fused':>8} | fused/plain mem, cpu | chunked/plain mem, cpu",
        flush=True,
    )
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for vocab in CROSSOVER_V:
        for exponent in CROSSOVER_LOG2:
            tokens = max(1, (1 << exponent) // vocab)
            args.repeats = 1
            memory = {impl: run_case(impl, vocab, tokens, args) for impl in IMPLS}
            command = [sys.executable, __file__, "--case-time", str(vocab), str(tokens), "--rounds", str(args.rounds)]
            command += ["--chunk-rows", str(args.chunk_rows), "--hidden", str(args.hidden)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            cpu = json.loads(done.stdout.strip().splitlines()[-1])
            mib = {impl: memory[impl]["peak_bytes"] / 2**20 if memory[impl]["fits"] else float("nan") for impl in IMPLS}
            row = {"V": vocab, "N": tokens, "entries": vocab * tokens, "H": args.hidden, "peak_mib": mib, "cpu_s": cpu}
            results.append(row)
            ratios = " | ".join(
                f"{mib[impl] / mib['plain']:.3f}, {cpu[impl] / cpu['plain']:.2f}x" for impl in ("fused", "chunked")
            )
            print(
                f"{vocab:>7} {tokens:>6} {vocab * tokens:>9} | {mib['plain']:>9.1f} {mib['chunked']:>8.1f} "
                f"{mib['fused']:>8.1f} | {1000 * cpu['plain']:>9.2f} {1000 * cpu['chunked']:>8.2f} "
                f"{1000 * cpu['fused']:>8.2f} | {ratios}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"H": args.hidden, "threads": args.threads, "crossover": results}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 32k and 128k at N = 1024 only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit-gib", type=float, default=24.0, help="address space a case may add to its inputs")
    parser.add_argument("--chunk-rows", type=int, default=0, help="chunked/fused rows per chunk (0 = auto)")
    parser.add_argument("--crossover", action="store_true", help="sweep the logit entries per micro-batch")
    parser.add_argument("--hidden", type=int, default=0, help=f"H (default {H}; {CROSSOVER_H} with --crossover)")
    parser.add_argument("--rounds", type=int, default=7, help="--crossover: interleaved timing rounds")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "V", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--case-time", nargs=2, metavar=("V", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hidden = args.hidden or (CROSSOVER_H if args.crossover else H)
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        impl, vocab, tokens = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(child(impl, vocab, tokens, args.repeats, args.limit_gib, args.chunk_rows, args.hidden)))
        return
    if args.case_time:
        import torch

        torch.set_num_threads(args.threads)
        vocab, tokens = int(args.case_time[0]), int(args.case_time[1])
        print(json.dumps(timing_child(vocab, tokens, args.rounds, args.chunk_rows, args.hidden)))
        return
    if args.crossover:
        crossover(args)
        return

    grid = [(v, n) for n in ((1024,) if args.quick else GRID_N) for v in (GRID_V[:2] if args.quick else GRID_V)]
    results = []
    print(f"KD + CE forward+backward from hidden states, H={args.hidden}, fp32, {args.threads} threads", flush=True)
    header = f"{'V':>7} {'N':>5} {'[N,V] GiB':>9} | " + " | ".join(f"{i:>7} GiB {i:>7} s" for i in IMPLS)
    print(header + " | fused/plain mem, time | chunked/plain mem, time", flush=True)
    for vocab, tokens in grid:
        row = {impl: run_case(impl, vocab, tokens, args) for impl in IMPLS}
        results.extend(row.values())
        cells = []
        for impl in IMPLS:
            r = row[impl]
            fit = f"{gib(r['peak_bytes']):>11} {r['seconds']:>9.2f}" if r["fits"] else f"{'no fit':>11} {'-':>9}"
            cells.append(fit)
        ratios = []
        for impl in ("fused", "chunked"):
            r, p = row[impl], row["plain"]
            if r["fits"] and p["fits"]:
                mem, sec = r["peak_bytes"] / p["peak_bytes"], r["seconds"] / p["seconds"]
                cpu = r["cpu_seconds"] / p["cpu_seconds"]
                r["memory_vs_plain"], r["time_vs_plain"], r["cpu_vs_plain"] = (
                    round(mem, 3),
                    round(sec, 3),
                    round(cpu, 3),
                )
                ratios.append(f"{mem:.3f}, {sec:.2f} (cpu {cpu:.2f})")
            else:
                ratios.append("-")
        line = f"{vocab:>7} {tokens:>5} {gib(tokens * vocab * 4):>9} | " + " | ".join(cells)
        print(line + " | " + " | ".join(ratios))
        for impl in IMPLS:
            if not row[impl]["fits"]:
                print(f"    {impl}: does not fit ({row[impl]['error']})", flush=True)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps({"H": args.hidden, "threads": args.threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
