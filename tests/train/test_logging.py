"""The progress display: plain lines with elapsed time and ETA in logs, a tqdm bar on a terminal."""

from __future__ import annotations

import io

from distilflow.train import logging as train_logging
from distilflow.train.logging import CountProgress, Progress

INFO = {"phase": "joint", "loss": 1.5, "parts": {"kd": 0.25, "ce": 2.0}, "kd_weight": 0.7, "lr": 1e-3}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_ten_seconds_with_elapsed_and_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(train_logging.time, "monotonic", clock)
    stream = io.StringIO()
    # A resumed stage: steps 20..100 run in this process.
    progress = Progress("student", 100, start=20, stream=stream)
    clock.now += 5
    progress.update(25, {**INFO, "tokens_per_s": 1234.4})
    assert stream.getvalue() == ""  # under 10 s since the start: nothing yet
    clock.now += 7  # 12 s for 10 steps: 1.2 s a step, 70 steps left -> 84 s
    progress.update(30, {**INFO, "tokens_per_s": 1234.4})
    assert stream.getvalue() == (
        "[student] 30/100 joint loss 1.5000 (kd 0.2500 ce 2.0000) kd_w 0.700 lr 1.00e-03 1234 tokens/s "
        "elapsed 0:12 eta 1:24\n"
    )
    clock.now += 3588  # 3600 s for 80 steps: done, and the last line is forced
    progress.update(100, INFO, force=True)
    assert stream.getvalue().splitlines()[-1].endswith("elapsed 1:00:00 eta 0:00")


def test_a_terminal_gets_a_bar_that_ends_at_the_total():
    stream = _Terminal()
    progress = Progress("teacher", 40, stream=stream)
    progress.update(10, {**INFO, "samples_per_s": 99.0})
    assert "10/40" in stream.getvalue() and "teacher" in stream.getvalue() and "99 samples/s" in stream.getvalue()
    progress.update(40, INFO, force=True)
    assert "40/40" in stream.getvalue()
    assert progress.bar.n == 40


def test_counted_progress_in_a_log_is_plain_lines_without_carriage_returns(monkeypatch):
    """generate's progress when stderr is a file: a line every 10 s and one at the end, no tqdm frames."""
    clock = _Clock()
    monkeypatch.setattr(train_logging.time, "monotonic", clock)
    stream = io.StringIO()
    progress = CountProgress("generate", 8, "prompts", stream=stream)
    for done in range(1, 9):
        clock.now += 3  # 3 s a prompt: lines at prompt 4 (12 s) and prompt 8 (12 s later), then close()
        progress.update(done, kept=done * 2, rejected=0)
    progress.close()
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == [
        "[generate] 4/8 prompts kept 8 rejected 0 elapsed 0:12 eta 0:12",
        "[generate] 8/8 prompts kept 16 rejected 0 elapsed 0:24 eta 0:00",
    ]
    again = CountProgress("generate", 8, "prompts", stream=stream)
    clock.now += 1
    again.update(1, kept=0)
    again.close()  # under 10 s: the one line at the end still says how far it got
    assert stream.getvalue().splitlines()[-1] == "[generate] 1/8 prompts kept 0 elapsed 0:01 eta 0:07"


def test_counted_progress_on_a_terminal_is_a_bar_and_nothing_when_hidden():
    stream = _Terminal()
    progress = CountProgress("generate", 3, "prompts", stream=stream)
    progress.update(3, kept=1)
    progress.close()
    assert "3/3" in stream.getvalue() and "\r" in stream.getvalue()  # tqdm's frames, on a terminal only
    quiet = io.StringIO()
    hidden = CountProgress("generate", 3, "prompts", show=False, stream=quiet)
    hidden.update(3, kept=1)
    hidden.close()
    assert quiet.getvalue() == ""
