"""distill.loss_impl and distill.loss_chunk_rows are decided once per stage and honoured by every stage.

The teacher, the baseline and the distilled student each run the configured implementation with
the configured chunk size (spied on the loss functions themselves, see the ``loss_calls`` fixture);
the reasoning demo's stages are checked in tests/generate/test_reasoning.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.errors import UserError
from distilflow.stages import stage_loss_impl

STAGES = ("teacher", "baseline", "student")


def _by_stage(calls, *, training: bool = True) -> dict[str, set]:
    out: dict[str, set] = {stage: set() for stage in STAGES}
    for stage, impl, chunk_rows in calls:
        if (impl == "fused eval") != training:
            out[stage].add((impl, chunk_rows))
    return out


@pytest.mark.parametrize(("setting", "expected"), [("chunked", "chunked"), ("plain", "plain")])
def test_classifier_stages_use_the_configured_loss(tmp_path, tiny_overrides, loss_calls, setting, expected):
    """Every stage of a classifier uses the setting (``fused`` is refused at load time: its logits are its
    output; tests/bad_inputs: config-fused-on-classifier)."""
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


class _Workload:
    """The two things stage_loss_impl asks of a workload: the logit shape and whether a model can fuse."""

    def __init__(self, per_token: bool, positions: int, columns: int, problem: str | None = None) -> None:
        self.per_token, self.positions, self.columns, self.problem = per_token, positions, columns, problem

    def logit_shape(self, model, vocab_size=None):
        return self.positions, self.columns if vocab_size is None else vocab_size

    def fused_problem(self, model):
        return self.problem


# A causal-LM config for the LM workloads (a classifier's config refuses fused when it loads).
LM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_stdlib.yaml"


def _resolve(setting: str, work: _Workload, *, batch_size: int = 16, grad_accum: int = 1, vocab_size=None) -> str:
    cfg = load_config(LM_CONFIG if work.per_token else None, [f"distill.loss_impl={setting}"])
    train = dataclasses.replace(cfg.student.train, batch_size=batch_size, grad_accum=grad_accum)
    return stage_loss_impl(cfg, work, train, [object()], vocab_size)


def test_auto_by_the_logits_of_one_micro_batch():
    demo = _Workload(True, 127, 2048)  # the LM demo: 16 rows x 127 positions x 2048 ids = 4.2M entries
    assert _resolve("auto", demo) == "fused"
    assert _resolve("auto", demo, grad_accum=2) == "fused"  # 8 rows: 2.1M entries
    assert _resolve("auto", demo, grad_accum=4) == "plain"  # 4 rows: 1.04M entries, just under 2^20
    assert _resolve("auto", demo, vocab_size=64) == "plain"  # the shared-vocabulary cut decides
    # A model that cannot fuse (soft-capped logits): auto falls back to chunked, explicit fused is refused.
    capped = _Workload(True, 127, 2048, problem="Gemma2ForCausalLM does not compute its logits as lm_head")
    assert _resolve("auto", capped) == "chunked"
    with pytest.raises(UserError, match="distill.loss_impl fused: Gemma2ForCausalLM"):
        _resolve("fused", capped)
    assert _resolve("plain", capped) == "plain"
    classifier = _Workload(False, 1, 10)
    assert _resolve("auto", classifier, batch_size=4096) == "plain"
    with pytest.raises(UserError, match="which only causal LMs have"):  # refused when the config loads
        _resolve("fused", classifier)
