"""distill.loss_impl and distill.loss_chunk_rows are decided once per stage and honoured by every stage.

The teacher, the baseline and the distilled student each run the configured implementation with
the configured chunk size (spied on the loss functions themselves, see the ``loss_calls`` fixture);
the reasoning demo's stages are checked in tests/generate/test_reasoning.py.
"""

from __future__ import annotations

import pytest

from distilflow.cli import main

STAGES = ("teacher", "baseline", "student")


def _by_stage(calls, *, training: bool = True) -> dict[str, set]:
    out: dict[str, set] = {stage: set() for stage in STAGES}
    for stage, impl, chunk_rows in calls:
        if (impl == "fused eval") != training:
            out[stage].add((impl, chunk_rows))
    return out


@pytest.mark.parametrize(("setting", "expected"), [("chunked", "chunked"), ("fused", "chunked"), ("plain", "plain")])
def test_classifier_stages_use_the_configured_loss(tmp_path, tiny_overrides, loss_calls, setting, expected):
    """A classifier's explicit ``fused`` is ``chunked`` (its logits are its output), in every stage."""
    args = [*tiny_overrides(tmp_path / "run"), f"distill.loss_impl={setting}", "distill.loss_chunk_rows=7"]
    assert main(["run", *args, "--no-tensorboard"]) == 0
    chunk = None if expected == "plain" else 7
    assert _by_stage(loss_calls) == {stage: {(expected, chunk)} for stage in STAGES}


@pytest.mark.parametrize("setting", ["plain", "chunked", "fused"])
def test_lm_stages_use_the_configured_loss(tmp_path, tiny_lm_args, loss_calls, setting):
    args = [*tiny_lm_args(tmp_path), f"distill.loss_impl={setting}", "distill.loss_chunk_rows=7"]
    assert main(["run", *args, "deploy.enabled=false", "--no-tensorboard"]) == 0
    chunk = None if setting == "plain" else 7
    assert _by_stage(loss_calls) == {stage: {(setting, chunk)} for stage in STAGES}
    # Held-out perplexity follows: computed on hidden states, chunk by chunk, only under fused.
    evaluated = {stage: {("fused eval", 7)} if setting == "fused" else set() for stage in STAGES}
    assert _by_stage(loss_calls, training=False) == evaluated
