"""Issue 15, 7: a long run stays flat: resident memory and open file descriptors over 20k steps.

    python benchmarks/soak.py [--steps 20000] [--checkpoint-every 500] [--kills 2] [--json PATH]

A tiny MNIST-1D job: an MLP teacher of 200 steps is trained first (``train-teacher``); then
``distill`` trains an MLP student for ``--steps`` steps (KD + CE, a checkpoint every
``--checkpoint-every`` steps, metrics every 50, evaluation every 2,000, TensorBoard on), as the user
runs it (a subprocess). It is SIGKILLed ``--kills`` times at evenly spaced student steps and the same
command is run again each time (it resumes from the last checkpoint). Every 2 s the process's resident
memory (VmRSS) and open descriptors (/proc/PID/fd) are sampled, with the student step it has logged.

Per life of the process, growth is measured from the first sample at least 1,000 student steps into
that life (allocator and caches warmed up) to its last sample: the target is resident memory growth
under 5 % and no descriptor growth. That the resumed weights equal an uninterrupted run's is
benchmarks/kill_resume.py's question; here it is checked that the student logs every step once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(command: str, out: Path, data: Path, steps: int, every: int, *extra: str) -> list[str]:
    return [
        command,
        f"output_dir={out}",
        f"data.cache_dir={data}",
        "data.mnist1d.num_samples=1000",
        "data.mnist1d.transfer_size=256",
        "threads=1",
        "teacher.model.arch=mlp",
        "teacher.model.cnn=null",
        "teacher.model.mlp.hidden=[64, 64]",
        "teacher.train.steps=200",
        "teacher.train.batch_size=32",
        "teacher.train.log_every=50",
        f"student.train.steps={steps}",
        "student.train.batch_size=32",
        "student.train.warmup_steps=100",
        "student.train.log_every=50",
        "student.train.eval_every=2000",
        f"student.train.checkpoint_every={every}",
        "deploy.enabled=false",
        *extra,
    ]


def student_step(metrics: Path) -> int:
    """The last student step logged in metrics.jsonl (0 before the student started)."""
    if not metrics.is_file():
        return 0
    with metrics.open("rb") as f:
        f.seek(max(0, metrics.stat().st_size - 4096))
        tail = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(tail):
        if '"stage": "student"' in line and '"loss"' in line:
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError):
                continue
    return 0


def sample(pid: int) -> tuple[int, int] | None:
    """(resident KiB, open descriptors) of ``pid``, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss, fds


def life(args: list[str], metrics: Path, kill_at: int | None) -> dict:
    """One process: started, sampled every 2 s, SIGKILLed once the student logged ``kill_at``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distilflow", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples, began = [], time.monotonic()
    while proc.poll() is None:
        step = student_step(metrics)
        got = sample(proc.pid)
        if got is not None:
            samples.append({"s": round(time.monotonic() - began, 1), "step": step, "rss_kib": got[0], "fds": got[1]})
        if kill_at is not None and step >= kill_at:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(2.0)
    if kill_at is None and proc.returncode != 0:
        raise SystemExit(f"the run failed: exit {proc.returncode}")
    first_step = next((s["step"] for s in samples if s["step"] > 0), 0)
    warm = [s for s in samples if s["step"] >= first_step + 1000]
    out = {"killed_at_step": kill_at, "samples": len(samples), "seconds": round(time.monotonic() - began, 1)}
    if len(warm) >= 2:
        a, b = warm[0], warm[-1]
        out |= {
            "from_step": a["step"],
            "to_step": b["step"],
            "rss_mib": [round(a["rss_kib"] / 1024, 1), round(b["rss_kib"] / 1024, 1)],
            "rss_growth_pct": round(100 * (b["rss_kib"] - a["rss_kib"]) / a["rss_kib"], 2),
            "fds": [a["fds"], b["fds"]],
            "max_fds": max(s["fds"] for s in warm),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    out = work / "run"
    metrics = out / "metrics.jsonl"
    teacher = work / "teacher"
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "distilflow",
            *job("train-teacher", teacher, work / "data", ns.steps, ns.checkpoint_every),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    if prepared.returncode != 0:
        raise SystemExit(prepared.stderr[-3000:])
    checkpoint = f"teacher.model.checkpoint={teacher / 'teacher'}"
    args = job("distill", out, work / "data", ns.steps, ns.checkpoint_every, checkpoint)
    kill_steps = [ns.steps * (i + 1) // (ns.kills + 1) for i in range(ns.kills)]
    lives = []
    for kill_at in [*kill_steps, None]:
        lives.append(life(args, metrics, kill_at))
        print(json.dumps(lives[-1]), flush=True)
    steps = [
        json.loads(line)["step"]
        for line in metrics.read_text().splitlines()
        if '"stage": "student"' in line and '"loss"' in line
    ]
    logged_once = steps == list(range(50, ns.steps + 1, 50))
    growth = [lf["rss_growth_pct"] for lf in lives if "rss_growth_pct" in lf]
    fd_growth = [lf["fds"][1] - lf["fds"][0] for lf in lives if "fds" in lf]
    summary = {
        "steps": ns.steps,
        "checkpoint_every": ns.checkpoint_every,
        "kills": ns.kills,
        "max_rss_growth_pct": max(growth) if growth else None,
        "fd_growth": fd_growth,
        "student_steps_logged_once": logged_once,
        "load_at_end": round(os.getloadavg()[0], 2),
        "lives": lives,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "lives"}))
    ok = growth and max(growth) < 5.0 and all(g <= 0 for g in fd_growth) and logged_once
    print("PASS" if ok else "FAIL", "(target: resident memory growth < 5 %, no descriptor growth, each step once)")
    if ns.json:
        ns.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
