"""Issue 11: student training throughput of 1 process vs 2 torchrun processes (DDP, gloo) on this CPU.

    python benchmarks/dist_throughput.py [--rounds 3] [--mnist-steps 300] [--lm-steps 30] [--json PATH]

Two students of the shipped demos, distilled from a teacher trained for a few steps (its weights do
not change the speed): the MNIST-1D MLP (configs/mnist1d.yaml: batch 128 samples) and the LM demo
student (configs/lm_stdlib.yaml: 3 x 128 Llama, batch 16 rows of 128 tokens, on a smaller slice of
the corpus). Each is run as ``distilflow distill`` in three ways, interleaved in rounds (a shared
CPU drifts): one process with 1 thread, one process with 2 threads, and
``torch.distributed.run --nproc_per_node 2`` with 1 thread per process (torchrun's default). The
number is the student stage's own throughput (``train_<unit>_per_s`` in student/result.json: units
of the optimizer steps, evaluation and checkpoints excluded; under torchrun the units of both ranks
over rank 0's step time). The median over rounds is reported with its ratio to each 1-process mode.

Caveat: this machine has 2 cores shared with other work, so 2 processes compete with 1 process of 2
threads for the same cores; the ratio says what data parallelism costs or gains here, not what it
does on 2 GPUs or 2 machines.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("1 process, 1 thread", "1 process, 2 threads", "2 processes x 1 thread")


def workloads(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    mnist = [
        f"data.cache_dir={out / 'cache'}",
        "teacher.train.steps=20",
        "teacher.train.warmup_steps=2",
        "teacher.train.eval_every=0",
        f"student.train.steps={args.mnist_steps}",
        f"student.train.warmup_steps={min(5, args.mnist_steps)}",
        "student.train.eval_every=0",
        f"student.train.log_every={args.mnist_steps}",
        "student.train.checkpoint_every=0",
        "deploy.enabled=false",
    ]
    lm = [
        "configs/lm_stdlib.yaml",
        f"data.cache_dir={out / 'cache'}",
        "data.stdlib.train_chars=250000",
        "data.stdlib.eval_chars=2000",
        "teacher.train.steps=10",
        "teacher.train.warmup_steps=2",
        "teacher.train.eval_every=0",
        f"student.train.steps={args.lm_steps}",
        f"student.train.warmup_steps={min(5, args.lm_steps)}",
        "student.train.eval_every=0",
        f"student.train.log_every={args.lm_steps}",
        "student.train.checkpoint_every=0",
        "deploy.enabled=false",
    ]
    return {
        "MNIST-1D student (MLP)": {"args": mnist, "unit": "samples"},
        "LM demo student": {"args": lm, "unit": "tokens"},
    }


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")


def distill(config: list[str], out: Path, mode: str, teacher: Path) -> float:
    """One distill run in ``mode``; the student's units per second."""
    threads = 2 if mode == "1 process, 2 threads" else 1
    args = ["distill", *config, f"output_dir={out}", f"teacher.model.checkpoint={teacher}", f"threads={threads}"]
    if mode.startswith("2 processes"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}"]
        _run([*launcher, "-m", "distilflow", *args, "--no-tensorboard"], threads)
    else:
        _run([sys.executable, "-m", "distilflow", *args, "--no-tensorboard"], threads)
    result = json.loads((out / "student" / "result.json").read_text())
    return next(v for k, v in result.items() if k.startswith("train_") and k.endswith("_per_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mnist-steps", type=int, default=300)
    parser.add_argument("--lm-steps", type=int, default=30)
    parser.add_argument("--out", default="runs/bench-dist-throughput")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    report: dict[str, dict] = {}
    for name, work in workloads(args, out).items():
        slug = "mnist" if name.startswith("MNIST") else "lm"
        teacher_run = out / slug / "teacher-run"
        _run([sys.executable, "-m", "distilflow", "train-teacher", *work["args"], f"output_dir={teacher_run}"], 2)
        teacher = teacher_run / "teacher"
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        load_before = os.getloadavg()[0]
        for round_ in range(args.rounds):
            for i, mode in enumerate(MODES):
                run_dir = out / slug / f"round{round_}-mode{i}"
                rates[mode].append(distill(work["args"], run_dir, mode, teacher))
                print(f"{name}: round {round_ + 1}, {mode}: {rates[mode][-1]:.0f} {work['unit']}/s", file=sys.stderr)
        medians = {mode: statistics.median(values) for mode, values in rates.items()}
        load = (round(load_before, 1), round(os.getloadavg()[0], 1))
        report[name] = {"unit": work["unit"], "median_per_s": medians, "per_round": rates, "load_average": load}
    print(f"| student | unit | {' | '.join(MODES)} | 2 proc / 1 proc 1 thread | 2 proc / 1 proc 2 threads |")
    print("|---|---|" + "---:|" * (len(MODES) + 2))
    for name, r in report.items():
        m = r["median_per_s"]
        two = m[MODES[2]]
        cells = " | ".join(f"{m[mode]:,.0f}" for mode in MODES)
        print(f"| {name} | {r['unit']}/s | {cells} | {two / m[MODES[0]]:.2f}x | {two / m[MODES[1]]:.2f}x |")
        r["ratio_2proc_to_1thread"] = two / m[MODES[0]]
        r["ratio_2proc_to_2threads"] = two / m[MODES[1]]
    loads = ", ".join(f"{name}: {r['load_average'][0]} -> {r['load_average'][1]}" for name, r in report.items())
    print(f"\n1-minute load average of this {os.cpu_count()}-core machine before -> after: {loads}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
