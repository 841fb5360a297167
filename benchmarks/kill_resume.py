"""Issue 15, 1: SIGKILL each long command at random moments, resume, compare with an uninterrupted run.

    python benchmarks/kill_resume.py [--kills 4] [--seed 0] [--only run,cache,generate,torchrun] [--json PATH]

For each command an uninterrupted reference runs first (a subprocess, as the user runs it) and its wall
time T is measured; then the same command is started again in a fresh folder and SIGKILLed (the whole
process group: torchrun's agent and both workers) at a moment drawn uniformly from [0.05, 0.95] of
the work still left (after the command's start-up), ``--kills`` times, and finally run to the end.
The result must equal the reference:

- ``run`` (teacher, baseline, student with checkpoints every 5 steps, deploy stage with dynamic int8):
  every ``.safetensors`` file byte for byte (weights of the three stages and the heads), and the
  student's logged steps each once; the ONNX files are compared too and reported;
- ``cache``: ``cache-teacher`` (132 top-k shards of 8 rows): the manifest and every shard byte for byte;
- ``generate``: sampled generation (temperature 1, 3 samples a prompt): the output JSONL line for line;
- ``torchrun``: ``torchrun --nproc_per_node 2 -m distilflow run`` (the built-in BatchNorm CNN teacher),
  resumed by torchrun again: every ``.safetensors`` byte for byte against an uninterrupted 2-process run.

A kill that lands after the command finished counts as no kill (the table says how many landed). The
kill of a checkpoint write at a chosen moment (mid-write, before the rename) is in tests/test_kills.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny(out: Path, data: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.cache_dir={data}",
        "data.mnist1d.num_samples=1000",
        "data.mnist1d.transfer_size=256",
        "threads=1",
        "teacher.model.cnn.channels=[16, 16]",
        "teacher.train.steps=60",
        "teacher.train.batch_size=32",
        "teacher.train.warmup_steps=5",
        "teacher.train.log_every=5",
        "teacher.train.checkpoint_every=5",
        "student.model.mlp.hidden=[64, 64]",
        "student.train.steps=80",
        "student.train.batch_size=32",
        "student.train.warmup_steps=5",
        "student.train.log_every=5",
        "student.train.eval_every=20",
        "student.train.checkpoint_every=5",
    ]


def deploy_args() -> list[str]:
    return ["deploy.methods=[dynamic]", "deploy.iterations=2", "deploy.batch_sizes=[1]", "deploy.torch_backend='off'"]


def files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name.endswith(suffixes)
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, args: list[str]) -> list[str]:
    if kind == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        return [*launcher, "-m", "distilflow", *args]
    return [sys.executable, "-m", "distilflow", *args]


def start(kind: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        command(kind, args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches torchrun's workers too
    )


def finish(kind: str, args: list[str]) -> float:
    began = time.monotonic()
    proc = start(kind, args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{kind}: exit {proc.returncode}\n{err[-3000:]}")
    return time.monotonic() - began


def startup_seconds() -> float:
    """Wall time of a command that does no work (interpreter, torch and distilflow imports)."""
    began = time.monotonic()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "distilflow", "print-config"], cwd=ROOT, env=env, capture_output=True)
    return time.monotonic() - began


def killed_then_finished(
    kind: str, args: list[str], seconds: float, kills: int, rng: random.Random, startup: float
) -> list[float]:
    """Kill ``kills`` times at random moments, then run to the end; the moments that landed (s).

    Each attempt resumes the last one, so less work is left each time: the moment is drawn from
    [0.05, 0.95] of the work still left (estimated from the uninterrupted time less the work the
    killed attempts did), plus the start-up time of the command."""
    landed, left = [], seconds - startup
    for _ in range(kills):
        moment = startup + rng.uniform(0.05, 0.95) * max(left, 1.0)
        proc = start(kind, args)
        try:
            proc.wait(timeout=moment)
            break  # finished before the kill: nothing left to kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed.append(round(moment, 1))
            left -= moment - startup
    finish(kind, args)
    return landed


def jobs(work: Path, data: Path, models: dict[str, Path]) -> dict[str, tuple[list[str], object]]:
    """name -> (args for a folder, the comparison of two folders)."""

    def run_args(out: Path) -> list[str]:
        return ["run", *tiny(out, data), *deploy_args(), "--no-tensorboard"]

    def compare_run(a: Path, b: Path) -> dict:
        steps = [
            json.loads(line)["step"]
            for line in (b / "metrics.jsonl").read_text().splitlines()
            if '"stage": "student"' in line and '"loss"' in line
        ]
        return {
            "weights_identical": files(a, (".safetensors",)) == files(b, (".safetensors",)),
            "onnx_identical": files(a / "deploy", (".onnx",)) == files(b / "deploy", (".onnx",)),
            "steps_logged_once": steps == sorted(set(steps)),
        }

    def cache_args(out: Path) -> list[str]:
        return [
            "cache-teacher",
            *tiny(out, data),
            f"teacher.model.checkpoint={models['teacher']}",
            "cache.use=true",
            "cache.features=true",
            "cache.format=topk",
            "cache.k=4",
            "cache.shard_rows=8",
        ]

    def compare_cache(a: Path, b: Path) -> dict:
        return {"cache_identical": files(a / "teacher_cache", ("",)) == files(b / "teacher_cache", ("",))}

    def generate_args(out: Path) -> list[str]:
        return [
            "generate",
            f"output_dir={out}",
            f"generate.prompts={models['prompts']}",
            f"generate.model={models['lm']}",
            "generate.temperature=1.0",
            "generate.n=3",
            "generate.batch_size=12",
            "generate.max_new_tokens=12",
            "generate.keep_truncated=true",
            "generate.verifier=none",
            "threads=1",
        ]

    def compare_generate(a: Path, b: Path) -> dict:
        want = (a / "generated.jsonl").read_text().splitlines()
        got = (b / "generated.jsonl").read_text().splitlines()
        return {"rows_identical": got == want, "rows": len(got), "duplicates": len(got) - len(set(got))}

    def torchrun_args(out: Path) -> list[str]:
        return ["run", *tiny(out, data), "deploy.enabled=false", "--no-tensorboard"]

    def compare_torchrun(a: Path, b: Path) -> dict:
        return {"weights_identical": files(a, (".safetensors",)) == files(b, (".safetensors",))}

    return {
        "run": (run_args, compare_run),
        "cache": (cache_args, compare_cache),
        "generate": (generate_args, compare_generate),
        "torchrun": (torchrun_args, compare_torchrun),
    }


def prepare(work: Path, data: Path) -> dict[str, Path]:
    """A trained teacher (for cache-teacher), a tiny random Llama and 40 prompts (for generate)."""
    import torch

    from distilflow.data.arith import arith_tokenizer
    from distilflow.data.stdlib_corpus import tiny_llama_config
    from distilflow.models.hf import build_causal_lm

    teacher_run = work / "teacher"
    finish("run", ["train-teacher", *tiny(teacher_run, data), "--no-tensorboard"])
    tokenizer = arith_tokenizer()
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    lm = build_causal_lm(tiny_llama_config(len(tokenizer), hidden=64, layers=2, heads=4, max_positions=64, **special))
    lm.save_pretrained(work / "lm")
    tokenizer.save_pretrained(work / "lm")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{3 * i}=", "answer": str(4 * i)}) + "\n" for i in range(40)))
    return {"teacher": teacher_run / "teacher", "lm": work / "lm", "prompts": prompts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="run,cache,generate,torchrun")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    rng = random.Random(ns.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    data = work / "data"
    models = prepare(work, data)
    startup = startup_seconds()
    table = []
    for name, (make_args, compare) in jobs(work, data, models).items():
        if name not in ns.only.split(","):
            continue
        kind = "torchrun" if name == "torchrun" else "plain"
        reference, resumed = work / f"{name}-reference", work / f"{name}-killed"
        seconds = finish(kind, make_args(reference))
        landed = killed_then_finished(
            kind, make_args(resumed), seconds, ns.kills, rng, startup * (2 if kind == "torchrun" else 1)
        )
        row = {
            "command": name,
            "reference_s": round(seconds, 1),
            "kills_landed_at_s": landed,
            **compare(reference, resumed),
        }
        table.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nload {os.getloadavg()[0]:.2f}; work folder {work}")
    print("| command | uninterrupted (s) | kills landed at (s) | result |")
    print("|---|---|---|---|")
    for row in table:
        checks = ", ".join(
            f"{k} {v}" for k, v in row.items() if k not in ("command", "reference_s", "kills_landed_at_s")
        )
        print(f"| {row['command']} | {row['reference_s']} | {row['kills_landed_at_s']} | {checks} |")
    if ns.json:
        ns.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
