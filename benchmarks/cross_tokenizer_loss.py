"""Issue 17 (phase A): peak memory and time of the cross-tokenizer losses vs same-tokenizer KD.

    python benchmarks/cross_tokenizer_loss.py [--quick] [--json PATH] [--threads N]

For N student tokens (float32, CPU): forward + backward of

- kd: ``T^2 KL(teacher || student)`` by losses/chunked.py, the teacher on the *student's* vocabulary
  (what the same run costs when both models share a tokenizer);
- uld: losses/uld.py ``uld_loss`` against a teacher of vocabulary V_t;
- hybrid: losses/uld.py ``hybrid_loss``, half of the teacher's ids shared with the student.

The groups are made like those of data/align.py on held-out stdlib text with the stdlib pair
(data/unigram_tokenizer.py 4,096 student, byte-level BPE 2,048 teacher): (student, teacher) tokens
per group (1, 1) 66 %, (1, 2) 9 %, (2, 1) 8 %, (2, 2) 8 %, then (1, 3), (3, 2), (2, 3), (3, 1);
drawn (seeded) until the student's N tokens are used, about 0.8 groups per student token.

Each case runs in its own child process: the peak resident set (ru_maxrss) minus the resident set
once the logits exist is the memory the loss needs (the student's logit gradient, N x V_s x 4 bytes,
is part of it for all three). Time: the faster of ``--repeats`` runs, wall clock and CPU time of
the process (on a shared machine the CPU time is the steadier measure). T = 2, chunks automatic.
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

from loss_memory import current_rss  # benchmarks/ is on the path when this file runs as a script

TEMPERATURE = 2.0
GRID = ((1024, 4096, 2048), (1024, 32000, 151936), (1024, 151936, 128256))
QUICK = GRID[:2]
IMPLS = ("kd", "uld", "hybrid")
GROUP_KINDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 2), (2, 3), (3, 1))
GROUP_WEIGHTS = (0.66, 0.09, 0.08, 0.08, 0.025, 0.02, 0.015, 0.012)


def synthetic_alignment(tokens: int, student_vocab: int, teacher_vocab: int, generator):
    """An Alignment of one row: groups drawn from ``GROUP_KINDS`` until ``tokens`` student tokens are used."""
    import torch

    from distilflow.data.align import AlignedSide, Alignment

    kinds = torch.tensor(GROUP_KINDS)  # (k, 2) student and teacher tokens of a kind of group
    drawn = kinds[torch.multinomial(torch.tensor(GROUP_WEIGHTS), tokens, replacement=True, generator=generator)]
    student_lengths, teacher_lengths = drawn[:, 0], drawn[:, 1]
    ends = torch.cumsum(student_lengths, 0)
    count = int((ends < tokens).sum())  # groups that fit after position 0 (nothing predicts it)
    s_first = 1 + torch.cumsum(student_lengths[:count], 0) - student_lengths[:count]
    t_first = 1 + torch.cumsum(teacher_lengths[:count], 0) - teacher_lengths[:count]
    s_last, t_last = s_first + student_lengths[:count] - 1, t_first + teacher_lengths[:count] - 1
    teacher_tokens = int(t_last[-1]) + 1

    def side(width, vocab, first, last):
        ids = torch.randint(0, vocab, (1, width), generator=generator)
        ones = torch.ones_like(ids)
        return AlignedSide(ids, ones, ones.bool(), torch.zeros(1, width, 2, dtype=torch.long), first, last)

    return Alignment(
        side(tokens, student_vocab, s_first, s_last),
        side(teacher_tokens, teacher_vocab, t_first, t_last),
        torch.zeros(count, dtype=torch.long),
        [""],
    )


def child(impl: str, tokens: int, student_vocab: int, teacher_vocab: int, repeats: int, chunk: int) -> dict:
    import torch

    from distilflow.data.vocab_map import VocabMap
    from distilflow.losses.chunked import chunked_kd_ce
    from distilflow.losses.uld import hybrid_loss, uld_loss

    g = torch.Generator().manual_seed(0)

    def inputs(n, v_s, v_t):
        alignment = synthetic_alignment(n, v_s, v_t, g)
        # In place: a transient second copy would set the peak before the loss runs.
        student = torch.randn(1, n, v_s, generator=g).mul_(2).requires_grad_()
        width = alignment.teacher.input_ids.shape[1] if impl != "kd" else n
        teacher = torch.randn(1, width, v_t if impl != "kd" else v_s, generator=g).mul_(2)
        shared = min(v_s, v_t) // 2
        vocab_map = VocabMap(torch.randperm(v_t, generator=g)[:shared], torch.randperm(v_s, generator=g)[:shared])
        return alignment, student, teacher, vocab_map

    def step(alignment, student, teacher, vocab_map) -> float:
        if impl == "kd":
            loss = chunked_kd_ce(student, teacher, temperature=TEMPERATURE, kd_weight=1.0).loss
        elif impl == "uld":
            loss = uld_loss(student, teacher, alignment, temperature=TEMPERATURE, chunk_groups=chunk).loss
        else:
            loss = hybrid_loss(student, teacher, alignment, vocab_map, temperature=TEMPERATURE, chunk_groups=chunk).loss
        loss.backward()
        return float(loss.detach())

    step(*inputs(32, 64, 96))  # warm-up at a tiny size: kernels and arenas are no memory of the loss
    case = inputs(tokens, student_vocab, teacher_vocab)
    base = current_rss()
    times, cpu_times, value = [], [], None
    for _ in range(repeats):
        case[1].grad = None
        began, cpu_began = time.perf_counter(), time.process_time()
        value = step(*case)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "impl": impl,
        "N": tokens,
        "V_s": student_vocab,
        "V_t": teacher_vocab,
        "groups": case[0].num_groups,
        "peak_bytes": peak - base,
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "loss": value,
    }


def run_case(impl: str, tokens: int, student_vocab: int, teacher_vocab: int, args) -> dict:
    command = [sys.executable, __file__, "--case", impl, str(tokens), str(student_vocab), str(teacher_vocab)]
    command += ["--repeats", str(args.repeats), "--chunk-groups", str(args.chunk_groups)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"impl": impl, "error": f"child failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first two sizes only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-groups", type=int, default=0, help="groups per chunk of uld/hybrid (0 = auto)")
    parser.add_argument("--case", nargs=4, metavar=("IMPL", "N", "V_S", "V_T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        impl, *sizes = args.case
        print(json.dumps(child(impl, *map(int, sizes), args.repeats, args.chunk_groups)))
        return
    print(f"forward+backward, fp32, {args.threads} thread(s); load {os.getloadavg()[0]:.1f}", flush=True)
    print("    N     V_s     V_t groups |  kd GiB  cpu s | uld GiB  cpu s | hyb GiB  cpu s | uld/kd mem, cpu | hyb/kd")
    results = []
    for tokens, student_vocab, teacher_vocab in QUICK if args.quick else GRID:
        row = {impl: run_case(impl, tokens, student_vocab, teacher_vocab, args) for impl in IMPLS}
        results.extend(row.values())
        if any("error" in r for r in row.values()):
            print(tokens, student_vocab, teacher_vocab, [r.get("error") for r in row.values()], flush=True)
            continue
        cells = " | ".join(f"{r['peak_bytes'] / 2**30:7.2f} {r['cpu_seconds']:6.2f}" for r in row.values())
        kd = row["kd"]
        ratios = " | ".join(
            f"{row[i]['peak_bytes'] / kd['peak_bytes']:.2f}, {row[i]['cpu_seconds'] / kd['cpu_seconds']:.1f}x"
            for i in ("uld", "hybrid")
        )
        groups = row["uld"]["groups"]
        print(f"{tokens:5d} {student_vocab:7d} {teacher_vocab:7d} {groups:6d} | {cells} | {ratios}", flush=True)
    print(f"load after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "results": results}, indent=1))


if __name__ == "__main__":
    main()
