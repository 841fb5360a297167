"""The output JSONL: resume after a kill keeps finished completions, skips finished prompts; dedup."""

from __future__ import annotations

import json

import pytest

from distilflow.errors import UserError
from distilflow.generate.backends import Completion
from distilflow.generate.prompts import Prompt
from distilflow.generate.runner import generate_to_file
from distilflow.generate.sampling import Sampling
from distilflow.generate.verify import Checker, load_verifier
from distilflow.generate.writer import SampleWriter


class ScriptedBackend:
    """Returns fixed completions per prompt text and records which prompts it was asked for."""

    tokenizer = None

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.calls = answers, []

    def encode(self, text, *, special_tokens):
        return list(text)

    def generate(self, texts, *, n, sampling, special_tokens):
        self.calls += texts
        return [[Completion(t, len(t), "stop") for t in self.answers[text][:n]] for text in texts]


def _prompts(count: int) -> list[Prompt]:
    return [Prompt(id=str(i), text=f"{i}+{i}=", answer=str(2 * i)) for i in range(count)]


def _answers(count: int) -> dict[str, list[str]]:
    # Two right (one repeated) and one wrong completion per prompt.
    return {f"{i}+{i}=": [f"</think>{2 * i}", f"</think>{2 * i}", f"</think>{2 * i + 1}"] for i in range(count)}


def _run(path, prompts, backend):
    checker = Checker(verifier=load_verifier("exact"))
    return generate_to_file(
        prompts,
        backend,
        checker,
        SampleWriter(path),
        n=3,
        sampling=Sampling(),
        prompts_per_call=2,
        show_progress=False,
        chat_template=False,
    )


def _patch_render(monkeypatch):
    # Plain prompts need no tokenizer; the scripted backend has none.
    monkeypatch.setattr("distilflow.generate.runner.render_prompt", lambda p, tok, chat_template: p.text)


def test_dedup_and_counts(tmp_path, monkeypatch):
    _patch_render(monkeypatch)
    stats = _run(tmp_path / "out.jsonl", _prompts(4), ScriptedBackend(_answers(4)))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (stats.kept, stats.rejected, stats.duplicates) == (4, 4, 4)
    assert stats.reasons == {"wrong": 4}
    assert [(r["id"], r["prompt"], r["completion"], r["extracted"]) for r in rows] == [
        (str(i), f"{i}+{i}=", f"</think>{2 * i}", str(2 * i)) for i in range(4)
    ]


def test_resume_after_kill_keeps_finished_and_skips_them(tmp_path, monkeypatch):
    _patch_render(monkeypatch)
    path = tmp_path / "out.jsonl"
    _run(path, _prompts(3), ScriptedBackend(_answers(6)))
    finished = path.read_text()
    # A kill while prompt 3 was being written: its sample is on disk, cut mid-line, and it never
    # reached the progress file.
    with path.open("a") as f:
        f.write('{"id": "3", "prompt": "3+3=", "completion": "</thi')
    backend = ScriptedBackend(_answers(6))
    stats = _run(path, _prompts(6), backend)
    # Calls of 2 prompts over the whole set: [0, 1] is finished and not made again; [2, 3] was cut by the
    # kill, so it is made again in full (the same draws as an uninterrupted run), and only 3 is written.
    assert backend.calls == ["2+2=", "3+3=", "4+4=", "5+5="]
    assert stats.already_done == 3 and stats.kept == 3 and stats.generated_prompts == 3
    text = path.read_text()
    assert text.startswith(finished)  # every finished completion kept, unchanged
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4", "5"]  # the cut line is gone, no repeats
    # A complete third run generates nothing and changes nothing.
    again = ScriptedBackend(_answers(6))
    assert _run(path, _prompts(6), again).generated_prompts == 0 and again.calls == []
    assert path.read_text() == text


def test_unfinished_prompt_lines_are_dropped_on_resume(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = SampleWriter(path)
    writer.write_prompt("a", [{"id": "a", "completion": "1"}], {"kept": 1})
    # Complete lines of prompt "b" written, then a kill before its progress line.
    with path.open("a") as f:
        f.write(json.dumps({"id": "b", "completion": "2"}) + "\n")
    with writer.progress_path.open("a") as f:
        f.write('{"id": "b", "ke')  # the progress line itself cut
    resumed = SampleWriter(path)
    assert resumed.done("a") and not resumed.done("b")
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a"]
    assert resumed.dropped_on_resume == 1
    assert writer.progress_path.read_text().endswith("\n")


def raises_on_some(completion, answer):
    """A verifier with a bug: it raises on completions ending in "1" (one of the first batch)."""
    if completion.endswith("1"):
        raise KeyError("score")
    return completion.endswith(answer)


def always_raises(completion):
    raise KeyError("score")


def test_a_verifier_that_raises_on_every_sample_of_the_first_batch_stops_before_writing(tmp_path, monkeypatch):
    _patch_render(monkeypatch)
    path = tmp_path / "sub" / "out.jsonl"
    checker = Checker(verifier=load_verifier(f"{__name__}:always_raises"))
    with pytest.raises(UserError, match=r"raised on every sample of the first batch \(4 samples; first: KeyError"):
        generate_to_file(
            _prompts(4), ScriptedBackend(_answers(4)), checker, SampleWriter(path), n=3, sampling=Sampling(),
            prompts_per_call=2, show_progress=False,
        )  # fmt: skip
    assert not path.parent.exists()  # nothing written, not even the folder
    # A verifier that raises on some samples only rejects those and the run goes on.
    checker = Checker(verifier=load_verifier(f"{__name__}:raises_on_some"))
    stats = generate_to_file(
        _prompts(4), ScriptedBackend(_answers(4)), checker, SampleWriter(path), n=3, sampling=Sampling(),
        prompts_per_call=2, show_progress=False,
    )  # fmt: skip
    assert stats.kept == 4 and stats.generated_prompts == 4
    assert stats.reasons.get("verifier error: KeyError: 'score'", 0) + stats.reasons.get("wrong", 0) == 4
