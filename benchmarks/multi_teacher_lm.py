"""Peak memory (RSS) of distilling an LM student from two LM teachers: live vs read from their caches.

    python benchmarks/multi_teacher_lm.py [--out DIR] [--hidden 512] [--layers 6] [--steps 10] [--chars 100000]

Builds, in DIR: a byte-level BPE tokenizer (2,048 ids) trained on stdlib text, two Llama teachers
of ``hidden`` x ``layers`` (random weights, saved as Hugging Face folders, float32), a 1-layer
student of hidden 64, and a JSONL file of stdlib source (records of 2,000 characters). Then, each in
a fresh child process (so that each peak is its own): ``distill`` with one teacher live, with both
live, ``cache-teacher`` (top-k 32) of both, and ``distill`` with both read from their caches; plus a
child that only imports distilflow and reads the data (the floor); ``cache-teacher`` of one teacher
too. Prints the peak resident set (``ru_maxrss``) of each and what it adds to the floor.
``--cases`` picks some (by the short names of CASES; the floor always runs); the cases that write a
cache start from an empty folder each time, so a rerun measures writing again, not a finished cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys
from distilflow.cli import main
code = main(sys.argv[1:]) if sys.argv[1] != "floor" else 0
if sys.argv[1] == "floor":
    from distilflow.config import load_config
    from distilflow.tasks.causal_lm_workload import CausalLMWorkload
    import torch
    CausalLMWorkload(load_config(None, sys.argv[2:]), torch.device("cpu"))
print(json.dumps({"rc": code, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


CASES = ("one_live", "two_live", "cache_one", "cache_two", "two_cached")


def build(out: Path, hidden: int, layers: int, chars: int) -> dict[str, Path]:
    """Tokenizer, two teacher folders, a student folder and a text file under ``out`` (made once)."""
    import torch

    from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer
    from distilflow.models.hf import build_causal_lm

    paths = {"text": out / "train.jsonl"}
    files = sorted(stdlib_root().glob("*.py"))[:40]
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)[:chars]
    if not paths["text"].is_file():
        out.mkdir(parents=True, exist_ok=True)
        records = [json.dumps({"text": text[i : i + 2000]}) for i in range(0, len(text), 2000)]
        paths["text"].write_text("\n".join(records) + "\n")
    tokenizer = train_tokenizer([text], 2048, out / "tokenizer")
    for name, size, seed in (("left", hidden, 1), ("right", hidden, 2), ("student", 64, 3)):
        folder = out / name
        paths[name] = folder
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(seed)
        n_layers = layers if name != "student" else 1
        config = tiny_llama_config(len(tokenizer), hidden=size, layers=n_layers, heads=4, max_positions=256)
        build_causal_lm(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return paths


def args_of(
    paths: dict[str, Path], run: Path, names: tuple[str, ...], steps: int, *extra: str, held: float = 0.05
) -> list[str]:
    teachers = ", ".join(f"{{name: {n}, model: {{arch: hf, hf: {{path: '{paths[n]}'}}}}}}" for n in names)
    return [
        f"output_dir={run}",
        "data.source=text",
        f"data.text.path={paths['text']}",
        "data.text.seq_len=128",
        f"data.text.test_fraction={held}",
        "threads=1",
        f"teachers=[{teachers}]",
        "student.model.arch=hf",
        f"student.model.hf.path={paths['student']}",
        "distill.feature_layers=[]",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        f"student.train.steps={steps}",
        "student.train.batch_size=8",
        "student.train.warmup_steps=1",
        f"student.train.eval_every={steps}",
        "deploy.enabled=false",
        *extra,
    ]


def child(args: list[str], cwd: Path) -> dict:
    # cwd: the benchmark's folder, so that 'python -c' imports distilflow as this process does (from
    # PYTHONPATH or the install), never from a checkout that happens to be the working directory.
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=cwd)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        raise SystemExit(f"distilflow exited {result['rc']}: {done.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-multi-teacher-lm")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chars", type=int, default=100_000, help="characters of training text (the cache's rows)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases (floor: always)")
    ns = parser.parse_args()
    out = Path(ns.out).resolve()
    paths = build(out, ns.hidden, ns.layers, ns.chars)
    both, cache = ("left", "right"), ["cache.use=true", "cache.format=topk", "cache.k=32"]
    # At least one record of 2,000 characters held out (a short text has few records).
    rows = functools.partial(args_of, held=max(0.05, round(2000 / ns.chars, 3)))
    every = {
        "one_live": ("distill, 1 teacher live", ["distill", *rows(paths, out / "one", ("left",), ns.steps)]),
        "two_live": ("distill, 2 teachers live", ["distill", *rows(paths, out / "live", both, ns.steps)]),
        "cache_one": (
            "cache-teacher, 1 teacher",
            ["cache-teacher", *rows(paths, out / "cached_one", ("left",), ns.steps, *cache)],
        ),
        "cache_two": (
            "cache-teacher, 2 teachers",
            ["cache-teacher", *rows(paths, out / "cached", both, ns.steps, *cache)],
        ),
        "two_cached": (
            "distill, 2 teachers cached",
            ["distill", *rows(paths, out / "cached", both, ns.steps, *cache)],
        ),
    }
    for name in ("cache_one", "cache_two"):  # written afresh (a finished cache would be read, not written)
        if name in ns.cases:
            shutil.rmtree(out / ("cached_one" if name == "cache_one" else "cached"), ignore_errors=True)
    floor_case = ("floor: import + data", ["floor", *rows(paths, out / "floor", both, ns.steps)])
    cases = [floor_case, *(every[name] for name in CASES if name in ns.cases)]
    teacher_mib = sum(f.stat().st_size for n in both for f in paths[n].glob("*.safetensors")) / 2**20
    print(f"teachers: 2 x Llama {ns.hidden} x {ns.layers}, {teacher_mib:.0f} MiB of float32 weights together")
    print("| case | peak RSS MiB | above the floor MiB |\n|---|---:|---:|")
    floor = None
    for label, argv in cases:
        peak = child(argv, out)["peak_kib"] / 1024
        floor = peak if floor is None else floor
        print(f"| {label} | {peak:.0f} | {peak - floor:.0f} |", flush=True)


if __name__ == "__main__":
    main()
