"""``distilflow generate`` as the tests in this folder run it: the prompts, the arguments (every
completion kept, none verified) and a run that returns the kept samples."""

from __future__ import annotations

import json
from pathlib import Path

from distilflow.cli import main

PROMPTS = ["def insort(a, x", "import heapq\n", "class Keyword:\n    "]
MAX_NEW = 12


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def generate_args(tmp_path: Path, served_dir: Path, prompts: Path, output: Path, *extra: str) -> list[str]:
    """``distilflow generate`` arguments: every completion of ``served_dir`` kept, none verified."""
    return [
        "generate",
        f"output_dir={tmp_path}",
        f"generate.prompts={prompts}",
        f"generate.output={output}",
        f"generate.model={served_dir}",
        "generate.verifier=none",
        "generate.keep_truncated=true",
        f"generate.max_new_tokens={MAX_NEW}",
        "threads=1",
        *extra,
    ]


def generate(tmp_path: Path, served_dir: Path, prompts: Path, output: Path, *extra: str) -> list[dict]:
    assert main(generate_args(tmp_path, served_dir, prompts, output, *extra)) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]
