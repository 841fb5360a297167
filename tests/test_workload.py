"""The Workload seam: every workload implements the protocol, and the stages above it use nothing else."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from distilflow.config import load_config
from distilflow.tasks.causal_lm_workload import CausalLMWorkload
from distilflow.tasks.classify import ClassifierWorkload
from distilflow.tasks.reasoning import ReasoningWorkload
from distilflow.workload import Workload, make_workload

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = (
    "{model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"
)


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(Workload).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


@pytest.mark.parametrize("cls", [ClassifierWorkload, CausalLMWorkload, ReasoningWorkload])
def test_every_workload_has_the_protocol_methods_with_its_parameters(cls):
    methods = _protocol_methods()
    assert len(methods) >= 15  # the declared contract, not an empty protocol
    for name, signature in methods.items():
        params = list(inspect.signature(getattr(cls, name)).parameters.values())
        wanted = list(signature.parameters)
        assert [p.name for p in params[: len(wanted)]] == wanted, f"{cls.__name__}.{name}"
        assert all(p.default is not p.empty for p in params[len(wanted) :]), f"{cls.__name__}.{name}: extra parameters"
    for attribute in ("kind", "per_token", "primary_metric"):
        assert hasattr(cls, attribute), attribute


def test_make_workload_builds_each_kind_and_each_is_a_workload(tmp_path, tiny_overrides, tiny_lm_args):
    classifier = make_workload(load_config(None, tiny_overrides(tmp_path / "c")), CPU)
    lm_args = tiny_lm_args(tmp_path)
    lm = make_workload(load_config(lm_args[0], lm_args[1:]), CPU)
    reasoning_cfg = load_config(
        ROOT / "configs" / "reasoning_arith.yaml",
        [
            "reasoning.digits=2",
            "reasoning.teacher_problems=20",
            "reasoning.fresh_prompts=5",
            "reasoning.eval_prompts=5",
            "reasoning.gold_problems=5",
            f"student.model.hf.config={TINY}",
            f"teacher.model.hf.config={TINY}",
        ],
    )
    reasoning = make_workload(reasoning_cfg, CPU)
    assert (type(classifier), type(lm), type(reasoning)) == (ClassifierWorkload, CausalLMWorkload, ReasoningWorkload)
    for work, kind in ((classifier, "classifier"), (lm, "causal_lm"), (reasoning, "causal_lm")):
        assert isinstance(work, Workload) and work.kind == kind
        source = work.cache_source()
        rows = len(next(iter(source.rows.values())))
        assert all(len(v) == rows for v in source.rows.values())
        model = work.new_model("student")
        positions, columns = work.logit_shape(model)
        assert work.forward(model, work.probe()).shape == (2, *((positions,) if work.per_token else ()), columns)
    assert classifier.tokenizer is None and lm.tokenizer is lm.cache_source().tokenizer


def test_the_stages_and_deploy_use_workloads_only_through_the_protocol():
    """pipeline.py, stages, the CLI and deploy/ import no workload implementation (make_workload builds them)."""
    implementations = {"distilflow.tasks.classify", "distilflow.tasks.causal_lm_workload", "distilflow.tasks.reasoning"}
    stage_lists = ("pipeline.py", "teacher_stages.py", "teacher_signals.py", "cli.py", "cli_args.py")
    files = [ROOT / "distilflow" / name for name in stage_lists]
    files += sorted((ROOT / "distilflow" / "deploy").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in implementations, f"{path.name} imports from {node.module}"
