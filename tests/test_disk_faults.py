"""A full disk and a folder that cannot be written, through the CLI: one line naming the path and the
free space, exit 2, every file written before intact; the same command continues once there is room.

The full disk is a write that fails with ENOSPC (tests/faults.py: an atomic write's fsync, an
append's os.write); one test fills a real 1 MiB tmpfs (needs root, as this machine has).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import tempfile

import pytest
from faults import QUICK_DEPLOY, SHARDED_CACHE, FullDisk, snapshot
from required import unavailable

from distilflow.cli import main

ERROR = "distilflow: error: "


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("distilflow:")]
    assert len(errors) == 1 and errors[0].startswith(ERROR), err
    assert err.splitlines()[-1] == errors[0]
    return errors[0]


def _assert_full_disk_line(line: str, path) -> None:
    assert f"writing '{path}' failed: no space left on device (ENOSPC), " in line, line
    assert re.search(r", [\d.]+ (bytes|KiB|MiB|GiB|TiB) free there; ", line), line
    assert "run the same command again to continue" in line


# Each: the extra overrides, the file whose write fails (a glob of its name, the how-many-th), and
# the command; "run" covers a checkpoint, the final weights, the metrics, the report and the deploy stage.
RUN_FAULTS = {
    "checkpoint": ([], "checkpoint.pt", 2),  # the student's second checkpoint (step 8)
    "final-weights": ([], "model.safetensors", 2),  # the baseline's (the teacher's is written)
    "metrics": ([], "metrics.jsonl", 3),  # the third row appended
    "report-png": ([], "*.png", 1),
    "report-md": ([], "report.md", 1),
    "deploy-onnx": ([*QUICK_DEPLOY], "student.onnx", 1),
}


@pytest.mark.parametrize("case", list(RUN_FAULTS))
def test_a_full_disk_during_run_is_one_line_and_loses_nothing(tmp_path, tiny_overrides, capsys, monkeypatch, case):
    extra, pattern, nth = RUN_FAULTS[case]
    run_dir = tmp_path / "run"
    args = ["run", *tiny_overrides(run_dir), *extra, "--no-tensorboard"]
    disk = FullDisk(monkeypatch, run_dir, pattern, nth)
    assert main(args) == 2
    assert disk.failed is not None and disk.failed.parent.is_relative_to(run_dir)
    _assert_full_disk_line(_one_line(capsys), disk.failed)
    assert snapshot(run_dir) == disk.before  # nothing written before was changed, nothing half-written added
    assert not [p for p in run_dir.rglob("*.tmp")]
    disk.heal(monkeypatch)  # room again: the same command finishes the run
    assert main(args) == 0
    assert json.loads((run_dir / "results.json").read_text())["student"]["steps"] == 10


def test_a_full_disk_while_caching_keeps_the_shards_written(tmp_path, tiny_overrides, capsys, monkeypatch):
    teacher = tmp_path / "teacher"
    assert main(["train-teacher", *tiny_overrides(teacher), "--no-tensorboard"]) == 0
    run_dir = tmp_path / "run"
    args = [
        "cache-teacher",
        *tiny_overrides(run_dir),
        f"teacher.model.checkpoint={teacher / 'teacher'}",
        *SHARDED_CACHE,
    ]
    disk = FullDisk(monkeypatch, run_dir, "shard-*", 3)  # the third shard
    assert main(args) == 2
    _assert_full_disk_line(_one_line(capsys), disk.failed)
    assert snapshot(run_dir) == disk.before
    manifest = json.loads((run_dir / "teacher_cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]  # the two written shards stay listed
    disk.heal(monkeypatch)
    assert main(args) == 0
    manifest = json.loads((run_dir / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 7


def _writes_refused(monkeypatch, folder) -> None:
    """A read-only folder as root sees it: creating a file in ``folder`` fails with EROFS (root ignores
    permission bits, so chmod cannot make one)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("command", ["run", "cache-teacher"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, tiny_overrides, capsys, monkeypatch, command
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _writes_refused(monkeypatch, run_dir)
    from distilflow import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("data or models were loaded before the output folder was checked")

    monkeypatch.setattr(pipeline, "make_workload", no_work)
    extra = SHARDED_CACHE if command == "cache-teacher" else ["--no-tensorboard"]
    assert main([command, *tiny_overrides(run_dir), *extra]) == 2
    line = _one_line(capsys)
    assert f"output_dir '{run_dir}' is not writable (read-only file system, " in line, line
    assert list(run_dir.iterdir()) == []


def test_a_real_full_tmpfs_is_one_line(tmp_path, tiny_overrides):
    """The issue's finding: a 1 MiB tmpfs as output_dir (a traceback from torch.save before)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        unavailable(
            "mounting a tmpfs needs root (the injected ENOSPC tests above cover the same paths)",
            "DISTILFLOW_REQUIRE_TMPFS",
            "the real full-disk test",
        )
    try:
        run_dir = mount / "run"
        args = [*tiny_overrides(run_dir), "teacher.model.cnn.channels=[256, 256]", "--no-tensorboard"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [os.sys.executable, "-m", "distilflow", "run", *args], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert last.startswith(ERROR) and "no space left on device (ENOSPC)" in last and "free there" in last, last
        assert (run_dir / "config.yaml").is_file()  # written before the disk filled up, intact
        assert not list(run_dir.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_generating_keeps_the_rows_written(arith_llama_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(6)))

    def job(out) -> list[str]:
        return [
            "generate",
            f"output_dir={out}",
            f"generate.prompts={prompts}",
            f"generate.model={arith_llama_dir}",
            "generate.n=2",
            "generate.batch_size=4",
            "generate.max_new_tokens=4",
            "generate.keep_truncated=true",
            "generate.verifier=none",
            "threads=1",
        ]

    assert main(job(tmp_path / "one")) == 0
    capsys.readouterr()
    out = tmp_path / "full"
    disk = FullDisk(monkeypatch, out, "generated.jsonl", 4)  # the fourth prompt's rows
    assert main(job(out)) == 2
    _assert_full_disk_line(_one_line(capsys), out / "generated.jsonl")
    assert snapshot(out) == disk.before  # the rows of the first three prompts, their progress lines
    assert len((out / "generated.jsonl.progress").read_text().splitlines()) == 3
    disk.heal(monkeypatch)
    assert main(job(out)) == 0
    assert (out / "generated.jsonl").read_text() == (tmp_path / "one" / "generated.jsonl").read_text()
