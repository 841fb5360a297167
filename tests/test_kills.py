"""SIGKILL at chosen moments of each long command, then the same command again: the result equals an
uninterrupted run's byte for byte (final weights, cache shards and manifest, generated rows).

The moment is chosen deterministically by :data:`KILLER`, which runs the CLI in a subprocess with the
writer of distilflow/storage.py patched to SIGKILL its own process:

- ``writing``: the content of the N-th write of a file named TARGET is half on disk (its temporary
  file is cut to half, or half of an appended line is written), then the kill;
- ``renaming``: the N-th atomic write of TARGET is complete in its temporary file, the kill comes
  just before the rename.

Kills at random moments (and of a 2-process torchrun job) are in benchmarks/kill_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import QUICK_DEPLOY, SHARDED_CACHE, snapshot

from distilflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
KILLER = """
import os, signal, sys
from pathlib import Path
import distilflow.deploy.stage, distilflow.generate.runner, distilflow.pipeline, distilflow.report
from distilflow import storage

target, nth, moment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = []

def due(path):
    if Path(path).name == target:
        seen.append(path)
        return len(seen) == nth
    return False

def die():
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write, append_text = storage.atomic_write, storage.append_text

def killing_atomic_write(path, write):
    if not due(path):
        return atomic_write(path, write)
    def then_die(tmp):
        write(tmp)
        if moment == "writing":
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            die()
    os.replace = lambda src, dst: die()  # "renaming": the write is complete, the rename never happens
    atomic_write(path, then_die)

def killing_append_text(path, text, **kwargs):
    if not due(path):
        return append_text(path, text, **kwargs)
    append_text(path, text[: len(text) // 2], fsync=True)
    die()

# storage's own write_text / write_json call the patched global; other modules imported the names.
for module in list(sys.modules.values()):
    if getattr(module, "__name__", "").startswith("distilflow"):
        for name, old, new in (("atomic_write", atomic_write, killing_atomic_write),
                               ("append_text", append_text, killing_append_text)):
            if getattr(module, name, None) is old:
                setattr(module, name, new)
from distilflow.cli import main
sys.exit(main(sys.argv[4:]))
"""


def killed(args: list[str], target: str, nth: int, moment: str) -> None:
    """``distilflow ARGS`` in a subprocess, SIGKILLed at the ``moment`` of the ``nth`` write of ``target``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILLER, target, str(nth), moment, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def _weights(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(run_dir).items() if k.endswith(".safetensors")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_overrides) -> Path:
    run_dir = tmp_path_factory.mktemp("kills") / "run"
    assert main(["run", *tiny_overrides(run_dir), "--no-tensorboard"]) == 0
    return run_dir


# The student checkpoints at steps 4, 8 and 10: the second is cut mid-write or before its rename.
@pytest.mark.parametrize(
    ("target", "nth", "moment"), [("checkpoint.pt", 2, "writing"), ("checkpoint.pt", 2, "renaming")]
)
def test_run_killed_during_a_checkpoint_write_resumes_to_the_same_weights(
    uninterrupted, tmp_path, tiny_overrides, target, nth, moment
):
    run_dir = tmp_path / "run"
    args = ["run", *tiny_overrides(run_dir), "--no-tensorboard"]
    killed(args, target, nth, moment)
    assert list(run_dir.rglob(f".{target}.*.tmp"))  # the kill did leave a temporary file behind
    assert main(args) == 0
    assert _weights(run_dir) == _weights(uninterrupted)  # teacher, baseline, student, heads: same bytes
    assert not list(run_dir.rglob("*.tmp"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    student = [r["step"] for r in rows if r["stage"] == "student" and "loss" in r]
    assert student == list(range(1, 11))  # each step logged once


def test_run_killed_in_the_deploy_stage_deploys_again(uninterrupted, tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    args = ["run", *tiny_overrides(run_dir), *QUICK_DEPLOY, "--no-tensorboard"]
    killed(args, "student.onnx", 1, "writing")
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "deploy" / "student.onnx").exists()  # no half file under the real name
    assert main(args) == 0
    assert _weights(run_dir) == _weights(uninterrupted)
    results = json.loads((run_dir / "results.json").read_text())
    assert "deploy" in results and (run_dir / "deploy" / "student.onnx").is_file()
    import onnxruntime

    onnxruntime.InferenceSession(str(run_dir / "deploy" / "student.onnx"), providers=["CPUExecutionProvider"])


def test_cache_teacher_killed_mid_shard_resumes_to_the_same_cache(uninterrupted, tmp_path, tiny_overrides):
    def job(run_dir: Path) -> list[str]:
        return [
            "cache-teacher",
            *tiny_overrides(run_dir),
            f"teacher.model.checkpoint={uninterrupted / 'teacher'}",
            *SHARDED_CACHE,
        ]

    reference = tmp_path / "reference"
    assert main(job(reference)) == 0
    run_dir = tmp_path / "run"
    killed(job(run_dir), "shard-00002.safetensors", 1, "writing")
    manifest = json.loads((run_dir / "teacher_cache" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert main(job(run_dir)) == 0
    cache = {k: v for k, v in snapshot(run_dir).items() if k.startswith("teacher_cache")}
    assert cache == {k: v for k, v in snapshot(reference).items() if k.startswith("teacher_cache")}


@pytest.mark.parametrize(("target", "nth"), [("generated.jsonl", 4), ("generated.jsonl.progress", 3)])
def test_generate_killed_mid_batch_resumes_to_the_same_rows(arith_llama_dir, tmp_path, target, nth):
    """Sampled (temperature 1, 3 samples a prompt), 4 prompts a backend call: the kill cuts a call in
    the middle (some of its prompts written, a line half written); the resumed run writes each row
    of the uninterrupted one once, with the same text."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(10)))

    def job(out: Path) -> list[str]:
        return [
            "generate",
            f"output_dir={out}",
            f"generate.prompts={prompts}",
            f"generate.model={arith_llama_dir}",
            "generate.temperature=1.0",
            "generate.n=3",
            "generate.batch_size=12",
            "generate.max_new_tokens=5",
            "generate.keep_truncated=true",
            "generate.verifier=none",
            "threads=1",
        ]

    assert main(job(tmp_path / "one")) == 0
    killed(job(tmp_path / "cut"), target, nth, "writing")
    assert main(job(tmp_path / "cut")) == 0
    want = (tmp_path / "one" / "generated.jsonl").read_text().splitlines()
    got = (tmp_path / "cut" / "generated.jsonl").read_text().splitlines()
    assert got == want  # same rows, same order, none twice, none lost
