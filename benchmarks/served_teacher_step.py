"""Distillation step time and the student process's peak memory with the teacher in process, served by
vLLM (the next step's requests sent ahead, and not), and cached: side by side in one run (issue 19).

The LM demo's shapes (configs/lm_stdlib.yaml): rows of 128 tokens, batch 16, a 2048-id BPE, teacher
hidden 256 x 4 layers (``--teacher-hidden`` / ``--teacher-layers`` for a larger one: memory), student
hidden 128 x 3 layers; the teacher is untrained (random init, std 0.2,
so its distributions are spread like a trained model's, not near-uniform), since only time and memory
are measured. Each mode is one ``distilflow distill`` process (KD + CE at T = 1, top-k 32 for the
served and cached teachers); the modes run in turn, ``--repeats`` times. Per mode: the median step
time of the loop's throughput windows after the first (``tokens_per_s`` in metrics.jsonl; a step is
16 x 128 tokens), the process's CPU seconds and its peak RSS (``wait4``'s ``ru_maxrss``, the whole
process), and for the served modes the server's CPU seconds over the run (its processes' utime +
stime from /proc). "sync" patches ``ServedTeacher.ahead`` to do nothing, so each micro-batch's request
is sent when the loss needs it; "ahead" is what ``distill`` does.

    OMP_NUM_THREADS=1 python benchmarks/served_teacher_step.py            # starts its own vLLM server

Needs .vllm-venv (scripts/vllm_venv.sh). Take figures at a load under 1.5 (the server and the student
share the cores); the script prints the load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.vllm.launch: the server launcher the tests use

from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer  # noqa: E402
from distilflow.models.hf import build_causal_lm  # noqa: E402
from tests.vllm.launch import MODEL_NAME, VllmServer  # noqa: E402

K = 32
ROWS, SEQ_LEN = 16, 128
MODES = ("in_process", "served_sync", "served_ahead", "cached")
# Run in each mode's process: "sync" sends nothing ahead (each micro-batch asks when its loss needs it).
RUNNER = """
import sys
from distilflow.cli import main
if sys.argv[1] == "served_sync":
    from distilflow.teachers.served import ServedTeacher
    ServedTeacher.ahead = lambda self, batch: None
raise SystemExit(main(sys.argv[2:]))
"""


def make_teacher(out: Path, *, hidden: int, layers: int) -> Path:
    """The teacher (random init, std 0.2; the demo's shape by default) and a 2048-id BPE, saved where vLLM and
    transformers load it. Heads of 64 dimensions (vLLM's CPU attention refuses 16)."""
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py", "argparse.py")]
    tokenizer = train_tokenizer(texts, 2048, out)
    intermediate = round(hidden * 688 / 256)  # the demo's ratio
    config = tiny_llama_config(
        len(tokenizer), hidden=hidden, layers=layers, heads=hidden // 64, intermediate=intermediate, max_positions=256
    )
    torch.manual_seed(0)
    model = build_causal_lm({**config, "initializer_range": 0.2, "tie_word_embeddings": False})
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"teacher hidden {hidden} x {layers} layers: {params:,} parameters ({4 * params / 2**20:.0f} MiB float32)")
    return out


def distill_args(root: Path, teacher: Path, steps: int, log_every: int, train_chars: int) -> list[str]:
    return [
        "configs/lm_stdlib.yaml",
        f"data.cache_dir={root / 'data'}",
        f"data.stdlib.tokenizer={teacher}",
        f"data.stdlib.train_chars={train_chars}",
        "data.stdlib.eval_chars=20000",
        "threads=1",
        f"teacher.model.hf.path={teacher}",
        "teacher.model.hf.config={}",
        f"student.train.steps={steps}",
        f"student.train.log_every={log_every}",
        "student.train.warmup_steps=2",
        "distill.kd_weight.warmup_steps=2",
        "student.train.eval_every=0",
        "student.train.checkpoint_every=0",
        "distill.layer_map=null",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        "deploy.enabled=false",
        f"cache.k={K}",
        f"cache.path={root / 'teacher-cache'}",
    ]


def mode_args(mode: str, server: VllmServer) -> list[str]:
    if mode.startswith("served"):
        url, name = server.url, MODEL_NAME
        return [f"teacher.server.url={url}", f"teacher.server.model={name}", f"teacher.server.top_k={K}"]
    return ["cache.use=true"] if mode == "cached" else []


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of the live processes in process group ``pgid`` (the server and its engine)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(12) stime(13)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, args: list[str], out: Path, server: VllmServer) -> dict:
    """One ``distill`` process in ``mode``: its step time, CPU seconds, peak RSS, and the server's CPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", RUNNER, mode, "distill", *args, f"output_dir={out}", "--no-tensorboard"]
    served = mode.startswith("served")
    server_before = group_cpu_seconds(server.process.pid) if served else 0.0
    log = open(out.parent / f"{out.name}.log", "wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} failed: see {out.parent / f'{out.name}.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in rows if r.get("stage") == "student" and "tokens_per_s" in r][1:]
    return {
        "step_ms": 1000 * ROWS * SEQ_LEN / statistics.median(windows),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "server_cpu_s": group_cpu_seconds(server.process.pid) - server_before if served else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--teacher-hidden", type=int, default=256, help="teacher width (the demo's: 256)")
    parser.add_argument("--teacher-layers", type=int, default=4, help="teacher depth (the demo's: 4)")
    parser.add_argument("--train-chars", type=int, default=400000, help="training text (rows to cache)")
    parser.add_argument("--keep", default=None, help="folder to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="served-step-"))
    teacher = make_teacher(root / "teacher", hidden=args.teacher_hidden, layers=args.teacher_layers)
    base = distill_args(root, teacher, args.steps, args.log_every, args.train_chars)
    from distilflow.cli import main as cli

    # The cache first (cache-teacher from the local teacher), then the server and a first served run
    # (vLLM compiles its rank count on first use).
    assert cli(["cache-teacher", *base, f"output_dir={root / 'cache-run'}"]) == 0
    server = VllmServer(teacher, root / "server.log", max_model_len=SEQ_LEN + 8)
    server.start()
    try:
        print(f"vLLM server up in {server.start_seconds:.0f} s; load {os.getloadavg()[0]:.2f}", flush=True)
        warm_up = [*base, f"student.train.steps={2 * args.log_every}", *mode_args("served", server)]
        run_mode("served_ahead", warm_up, root / "warm-up", server)
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            for mode in MODES:
                got = run_mode(mode, [*base, *mode_args(mode, server)], root / f"{mode}-{repeat}", server)
                results[mode].append(got)
                print(mode, repeat, {k: round(v, 1) for k, v in got.items()}, flush=True)
        print(f"load after {os.getloadavg()[0]:.2f}")
        print("\n| mode | step ms (median of runs) | student process CPU s | server CPU s | student peak RSS MB |")
        print("|---|---|---|---|---|")
        for mode in MODES:
            runs = results[mode]
            cell = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            server_cpu = f"{cell['server_cpu_s']:.1f}" if mode.startswith("served") else "-"
            print(
                f"| {mode} | {cell['step_ms']:.0f} | {cell['cpu_s']:.1f} | {server_cpu} | {cell['peak_rss_mb']:.0f} |"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
