"""Every case of the bad-input corpus: exit code 2, one line on stderr, nothing written.

The CLI runs in-process (``distilflow.cli.main``) with stdout and stderr captured at the file
descriptors (so ONNX Runtime's and other libraries' own output counts too) and the warnings that
its filters let through recorded. Each case must give exit code 2, exactly one stderr line
``distilflow: error: ...`` holding the case's expected text, no warning, and leave every file of the
case folder (its inputs and its output folder) and of the shared kit as it was: same names, sizes,
modification times and sha256.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest

from distilflow.cli import main

from .cases import CASES
from .kit import Kit, build_kit


@pytest.fixture(scope="session")
def kit(tmp_path_factory, mnist_cache) -> Kit:
    return build_kit(tmp_path_factory.mktemp("bad-inputs-kit"), mnist_cache)


def snapshot(root: Path) -> dict[str, tuple]:
    """Each path under ``root``: a link's target, a folder, or a file's size, mtime and sha256."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            out[name] = ("link", str(path.readlink()))
        elif path.is_dir():
            out[name] = ("dir",)
        else:
            stat = path.stat()
            out[name] = ("file", stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def test_case_ids_are_unique_and_the_corpus_is_large():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 100


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, kit, tmp_path, capfd, monkeypatch):
    folder = tmp_path / "case"
    folder.mkdir()
    argv, env = case.materialise(folder, kit)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before, kit_before = snapshot(folder), snapshot(kit.lm.parent)
    stdout = sys.stdout
    with warnings.catch_warnings(record=True) as caught:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help and friends
            code = exc.code
        finally:
            sys.stdout = stdout  # a rank other than 0 sends stdout to os.devnull
    _, err = capfd.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("distilflow: error"), err
    assert case.expect in lines[0]
    assert [str(w.message) for w in caught] == []
    assert snapshot(folder) == before
    assert snapshot(kit.lm.parent) == kit_before
