"""The output JSONL of kept samples, resumable and safe against a kill.

Per finished prompt, its kept samples are appended to ``OUTPUT`` and then one summary line to
``OUTPUT.progress``, each fsynced. On start, the progress file names the finished prompts (they
are skipped); output lines of a prompt that never reached the progress file, and a line cut by a
kill, are dropped (the file is rewritten atomically only when there is such a line). So every
finished completion survives, and no prompt is written twice. An append that fails (a full disk)
is cut back to where it started and stops with one line (distilflow/storage.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distilflow.errors import UserError
from distilflow.storage import append_text, remove_stale_temps, write_text

PROGRESS_SUFFIX = ".progress"
SUMMARY_SUFFIX = ".summary.json"  # the run's counts, written next to the output at the end


def read_complete_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Parsed JSON objects of ``path`` and whether any line had to be dropped (cut or not JSON)."""
    if not path.is_file():
        return [], False
    rows, dropped = [], False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                dropped = True  # cut by a kill mid-write
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped = True
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                dropped = True
    return rows, dropped


def rewrite_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` atomically by ``rows`` as JSON lines (a temporary file, fsynced, renamed)."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_output_path(path: Path) -> None:
    """Preflight of the output file (before any model is loaded): it, its progress and summary files
    must be files or absent, and the nearest existing folder above it a folder."""
    for name in (path.name, path.name + PROGRESS_SUFFIX, path.name + SUMMARY_SUFFIX):
        if path.with_name(name).is_dir():
            raise UserError(
                f"generate.output '{path}' is a folder ('{path.with_name(name)}'); name a .jsonl file, "
                f"e.g. generate.output={path / 'generated.jsonl'}"
            )
    above = next(folder for folder in path.parents if folder.exists() or folder == folder.parent)
    if above.exists() and not above.is_dir():
        raise UserError(f"generate.output '{path}': '{above}' is a file, not a folder")


class SampleWriter:
    """Appends kept samples per prompt; knows which prompts are finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.progress_path = self.path.with_name(self.path.name + PROGRESS_SUFFIX)
        check_output_path(self.path)
        if self.path.parent.is_dir():
            remove_stale_temps(self.path.parent, (self.path.name, self.progress_path.name))  # a killed rewrite's
        progress, progress_dropped = read_complete_lines(self.progress_path)
        self.finished: dict[str, dict[str, Any]] = {str(row["id"]): row for row in progress if "id" in row}
        if progress_dropped:
            rewrite_lines(self.progress_path, list(self.finished.values()))
        samples, samples_dropped = read_complete_lines(self.path)
        kept = [row for row in samples if str(row.get("id")) in self.finished]
        self.dropped_on_resume = len(samples) - len(kept) + int(samples_dropped)
        if samples_dropped or len(kept) != len(samples):
            rewrite_lines(self.path, kept)
        self.samples_on_disk = len(kept)

    def done(self, prompt_id: str) -> bool:
        return prompt_id in self.finished

    def write_prompt(self, prompt_id: str, samples: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append ``samples`` (each with ``id``), then mark the prompt finished with ``summary``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # here, so a run stopped before its first row writes none
        if samples:
            append_text(self.path, "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
        row = {"id": prompt_id, **summary}
        append_text(self.progress_path, json.dumps(row, ensure_ascii=False) + "\n")
        self.finished[prompt_id] = row
        self.samples_on_disk += len(samples)
