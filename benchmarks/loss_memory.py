"""Issue 8, benchmark 4a: peak memory and time of the KD + CE loss, plain vs chunked vs fused.

    python benchmarks/loss_memory.py [--quick] [--json PATH] [--threads N] [--limit-gib G]

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


def child(impl: str, vocab: int, tokens: int, repeats: int, limit_gib: float, chunk_rows: int) -> dict:
    """One case, in this (fresh) process; returns peak bytes above the inputs and the best time."""
    import torch

    from distilflow.losses.chunked import chunked_kd_ce
    from distilflow.losses.fused import HiddenStates, fused_kd_ce
    from distilflow.losses.logits import cross_entropy_sum, forward_kl

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, H, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(vocab, H, generator=g)).requires_grad_()
    teacher_hidden = torch.randn(tokens, H, generator=g)
    teacher_weight = 0.03 * torch.randn(vocab, H, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    kd_w, ce_w = KD_WEIGHT / tokens, CE_WEIGHT / tokens

    def step() -> float:
        if impl == "plain":
            logits = hidden @ weight.T  # (N, V)
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            loss = kd_w * forward_kl(logits, teacher_logits, temperature=TEMPERATURE) + ce_w * cross_entropy_sum(
                logits, labels
            )
        elif impl == "chunked":
            logits = hidden @ weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            loss = chunked_kd_ce(
                logits,
                teacher_logits,
                labels,
                temperature=TEMPERATURE,
                kd_weight=kd_w,
                ce_weight=ce_w,
                chunk_rows=chunk_rows,
            ).loss
        else:
            loss = fused_kd_ce(
                HiddenStates(hidden, weight),
                HiddenStates(teacher_hidden, teacher_weight),
                labels,
                temperature=TEMPERATURE,
                kd_weight=kd_w,
                ce_weight=ce_w,
                chunk_rows=chunk_rows,
            ).loss
        loss.backward()
        return float(loss.detach())

    # Warm up at a tiny size first: the first call of each kernel maps library code and thread
    # arenas into the resident set, which is no memory of the loss.
    real = (hidden, weight, teacher_hidden, teacher_weight, labels)
    hidden = torch.randn(16, H, generator=g).requires_grad_()
    weight = torch.randn(64, H, generator=g).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(16, H, generator=g), torch.randn(64, H, generator=g)
    labels = torch.randint(0, 64, (16,), generator=g)
    step()
    hidden, weight, teacher_hidden, teacher_weight, labels = real
    base = current_rss()
    # Cap the address space: a case that does not fit fails to allocate instead of taking the machine.
    limit = address_space() + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times, cpu_times, value = [], [], None
    try:
        for _ in range(repeats):
            hidden.grad = weight.grad = None
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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "V": vocab, "N": tokens, "fits": False, "error": f"child failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 32k and 128k at N = 1024 only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--limit-gib", type=float, default=24.0, help="address space a case may add to its inputs")
    parser.add_argument("--chunk-rows", type=int, default=0, help="chunked/fused rows per chunk (0 = auto)")
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "V", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        impl, vocab, tokens = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(child(impl, vocab, tokens, args.repeats, args.limit_gib, args.chunk_rows)))
        return

    grid = [(v, n) for n in ((1024,) if args.quick else GRID_N) for v in (GRID_V[:2] if args.quick else GRID_V)]
    results = []
    print(f"KD + CE forward+backward from hidden states, H={H}, fp32, {args.threads} threads", flush=True)
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
        args.json.write_text(json.dumps({"H": H, "threads": args.threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
