"""Tests that need something of the machine (the vLLM CPU venv, root to mount a tmpfs) skip without
it, naming what is missing, except where the flag that names it is set (``.ci/run`` sets each): there a
missing need fails the test, so CI never skips it."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str, flag: str, what: str) -> NoReturn:
    """Skip with ``reason``, or fail with it when the environment variable ``flag`` is ``1``."""
    if os.environ.get(flag) == "1":
        pytest.fail(f"{reason} ({flag}=1: {what} must run)", pytrace=False)
    pytest.skip(reason)
