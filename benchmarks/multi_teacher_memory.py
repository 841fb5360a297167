"""Issue 16 (phase A): peak memory of the KD term against N combined teachers, lazy vs materialised.

    python benchmarks/multi_teacher_memory.py [--quick] [--json PATH] [--threads N]

Forward + backward of ``T^2 KL(mixture || student) / N_tokens`` (T = 2, float32, CPU) by the fused
loss (losses/fused.py) from the student's hidden states ``(N_tokens, H)`` and lm_head ``(V, H)``;
each teacher is given as its hidden states and lm_head (an online teacher, as loss_memory.py), so
no teacher logits exist before the loss:

- ``one``: one teacher (today's path; the reference);
- ``lazy-N``: N teachers combined per position by ``entropy`` weights (teachers/combine.MixedTeacher),
  rows made on demand by the fused loss's chunks;
- ``materialised-N``: the same mixture made whole first (``logits_at()``: one ``(N_tokens, V)``
  float32 tensor), then the fused loss against it as dense teacher logits.

Each case runs ``--runs`` times, each in its own child process (loss_memory.py's method): the peak
resident set minus the resident set once the inputs exist. The student's lm_head gradient (V x H)
is in every case. The resident peak moves from run to run by what the allocator keeps (seen: one
run of ``lazy-2`` at V = 131k at +134 MiB, the next at +0), so the table gives the lowest and the
highest peak of the runs; ``--fixed-mmap-threshold`` runs the children with glibc's mmap threshold
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so that every buffer above 1 MiB is mapped when
allocated and unmapped when freed and the resident peak follows the live tensors. Ratios are
against ``one`` of the same (V, N_tokens), lowest peaks and lowest CPU times (user + system: the
steadier time measure on a shared machine).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_memory import address_space, current_rss  # noqa: E402

H, TEMPERATURE = 512, 2.0
GRID = ((32768, 1024), (131072, 1024))
CASES = ("one", "lazy-2", "lazy-3", "materialised-2")


def child(case: str, vocab: int, tokens: int, limit_gib: float) -> dict:
    import torch

    from distilflow.losses.fused import HiddenStates, fused_kd_ce
    from distilflow.teachers.combine import combine_teachers
    from distilflow.teachers.weighting import Combination

    teachers = 1 if case == "one" else int(case.split("-")[1])
    g = torch.Generator().manual_seed(0)

    def inputs(n: int, v: int):
        hidden = torch.randn(n, H, generator=g).requires_grad_()
        weight = (0.02 * torch.randn(v, H, generator=g)).requires_grad_()
        sides = [
            HiddenStates(torch.randn(n, H, generator=g), 0.03 * torch.randn(v, H, generator=g)) for _ in range(teachers)
        ]
        return hidden, weight, sides

    def step(hidden, weight, sides) -> float:
        if case == "one":
            teacher = sides[0]
        else:
            teacher = combine_teachers(sides, temperature=TEMPERATURE, combination=Combination("entropy"))
            if case.startswith("materialised"):
                teacher = teacher.logits_at()  # (N_tokens, V) float32
        loss = fused_kd_ce(HiddenStates(hidden, weight), teacher, temperature=TEMPERATURE, kd_weight=1.0 / len(hidden))
        loss.loss.backward()
        return float(loss.loss.detach())

    step(*inputs(16, 64))  # warm-up at a tiny size: kernels and thread arenas are no memory of the loss
    real = inputs(tokens, vocab)
    base = current_rss()
    limit = address_space() + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    began, cpu_began = time.perf_counter(), time.process_time()
    try:
        value = step(*real)
    except (RuntimeError, MemoryError) as error:
        return {"case": case, "V": vocab, "N": tokens, "fits": False, "error": str(error).splitlines()[0][:120]}
    return {
        "case": case,
        "V": vocab,
        "N": tokens,
        "fits": True,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base,
        "seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
        "loss": value,
    }


def run_case(case: str, vocab: int, tokens: int, args) -> dict:
    command = [sys.executable, __file__, "--case", case, str(vocab), str(tokens), "--limit-gib", str(args.limit_gib)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"case": case, "V": vocab, "N": tokens, "fits": False, "error": f"child failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _best(runs: list[dict]) -> dict | None:
    """Lowest and highest peak, lowest CPU time of the runs that fitted (None if none did)."""
    done = [r for r in runs if r["fits"]]
    if not done:
        return None
    peaks = [r["peak_bytes"] for r in done]
    return {"low": min(peaks), "high": max(peaks), "cpu": min(r["cpu_seconds"] for r in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 32k only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="child processes per case")
    parser.add_argument("--fixed-mmap-threshold", action="store_true", help="glibc mmap threshold fixed at 1 MiB")
    parser.add_argument("--limit-gib", type=float, default=12.0, help="address space a case may add to its inputs")
    parser.add_argument("--case", nargs=3, metavar=("CASE", "V", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.case[0], int(args.case[1]), int(args.case[2]), args.limit_gib)))
        return
    grid = GRID[:1] if args.quick else GRID
    malloc = "mmap threshold fixed at 1 MiB" if args.fixed_mmap_threshold else "default malloc"
    print(
        f"fused KD forward+backward against N teachers (hidden states), H={H}, fp32, {args.threads} thread(s), {malloc}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        f"{'V':>7} {'tokens':>6} {'case':>15} {'peak MiB':>9} {'x one':>6} {'[N,V] MiB':>9} {'CPU s':>7} {'x one':>6}"
    )
    results = []
    for vocab, tokens in grid:
        rows = {case: [run_case(case, vocab, tokens, args) for _ in range(args.runs)] for case in CASES}
        for runs in rows.values():
            results.extend(runs)
        best = {case: _best(runs) for case, runs in rows.items()}
        ref = best["one"]
        for case, r in best.items():
            if r is None:
                print(f"{vocab:>7} {tokens:>6} {case:>15}  did not run: {rows[case][0].get('error')}")
                continue
            mem = r["low"] / ref["low"] if ref else float("nan")
            cpu = r["cpu"] / ref["cpu"] if ref else float("nan")
            peaks = f"{r['low'] / 2**20:.0f}-{r['high'] / 2**20:.0f}"
            print(
                f"{vocab:>7} {tokens:>6} {case:>15} {peaks:>9} {mem:>6.2f} "
                f"{tokens * vocab * 4 / 2**20:>9.0f} {r['cpu']:>7.2f} {cpu:>6.2f}"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
