"""The reasoning demo end to end at toy size: stages, results.json, report, reuse, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilflow import reasoning
from distilflow.cli import main
from distilflow.generate.verify import Checker

ROOT = Path(__file__).resolve().parents[2]
TINY = "{model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"  # noqa: E501


def _args(out: Path) -> list[str]:
    return [
        "run",
        str(ROOT / "configs" / "reasoning_arith.yaml"),
        f"output_dir={out}",
        f"data.text.path={out}/data/gold.jsonl",
        "reasoning.digits=2",
        "reasoning.teacher_problems=40",
        "reasoning.gold_problems=8",
        "reasoning.fresh_prompts=6",
        "reasoning.eval_prompts=5",
        f"teacher.model.hf.config={TINY}",
        f"student.model.hf.config={TINY}",
        "teacher.train.steps=2",
        "teacher.train.warmup_steps=1",
        "teacher.train.batch_size=4",
        "student.train.steps=2",
        "student.train.warmup_steps=1",
        "student.train.batch_size=4",
        "on_policy.lmbda=1.0",
        "on_policy.start_fraction=0.0",
        "generate.n=2",
        "--no-tensorboard",
    ]


def test_untrained_teacher_without_verified_traces_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distilflow: error: the teacher wrote no verified trace")
    # Nothing written is lost: the trained teacher and the finished prompts stay for the next try.
    assert (out / "teacher" / "model.safetensors").is_file()
    assert len((out / "data" / "traces.jsonl.progress").read_text().splitlines()) == 6


def test_demo_stages_results_and_reuse(tmp_path, capsys, monkeypatch):
    # A 2-step teacher writes no correct sum; accept every trace so that the student stages run.
    monkeypatch.setattr(reasoning, "Checker", lambda **kwargs: Checker(verifier=None, keep_truncated=True))
    out = tmp_path / "run"
    assert main(_args(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["students"]) == ["sft", "seq_kd", "seq_token_kd", "gkd"]
    for r in [results["teacher"], *results["students"].values()]:
        assert 0.0 <= r["exact_match"] <= 1.0 and r["steps"] == 2
    traces = results["traces"]
    assert traces["kept"] + traces["rejected"] + traces["duplicates"] == traces["samples"] == 12
    kept_lines = (out / "data" / "traces.jsonl").read_text().splitlines()
    assert len(kept_lines) == traces["kept"]
    assert results["students"]["gkd"]["on_policy_steps"] == 2  # lmbda 1: every step samples from the student
    for stage in ("teacher", "sft", "gkd"):  # Hugging Face folders: 'distilflow generate' can use the teacher
        assert (out / stage / "hf" / "config.json").is_file() and (out / stage / "hf" / "tokenizer.json").is_file()
    report = (out / "report.md").read_text()
    assert "| gkd |" in report and "| sft |" in report and "kept" in report
    assert "teacher" in capsys.readouterr().out
    # A second run reuses every finished stage and gives the same results; deploy settings do not
    # change what was trained (the pipeline's folder rule), another student budget does.
    assert main([*_args(out), "deploy.threads=2"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["students"] == results["students"] and again["traces"]["kept"] == traces["kept"]
    capsys.readouterr()
    assert main([*_args(out), "student.train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run with a different config (keys: student.train.steps)" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.text.seq_len=20", "config key 'data.text.seq_len': 20 is too short"),
        ("reasoning.gold_problems=10000", "reasoning.digits"),
        ("distill.layer_map=uniform", "distils logits only"),
    ],
)
def test_refusals(tmp_path, capsys, override, message):
    args = _args(tmp_path / "run")
    if override.startswith("distill.layer_map"):
        args += ["distill.feature_layers=[]", "distill.phases=[{name: f, fraction: 1.0, terms: [feature, kd]}]"]
    assert main([*args, override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("setting", ["chunked", "fused"])
def test_every_demo_stage_uses_the_configured_loss(tmp_path, monkeypatch, loss_calls, setting):
    """The teacher and each student run distill.loss_impl with distill.loss_chunk_rows (spied on the losses)."""
    monkeypatch.setattr(reasoning, "Checker", lambda **kwargs: Checker(verifier=None, keep_truncated=True))
    args = [*_args(tmp_path / "run"), f"distill.loss_impl={setting}", "distill.loss_chunk_rows=7"]
    assert main(args) == 0
    stages = ("teacher", "sft", "seq_kd", "seq_token_kd", "gkd")
    used = {stage: set() for stage in stages}
    for stage, impl, chunk_rows in loss_calls:
        used[stage].add((impl, chunk_rows))
    assert used == {stage: {(setting, 7)} for stage in stages}


@pytest.mark.parametrize("command", ["train-teacher", "distill", "eval", "cache-teacher"])
def test_other_commands_refuse_the_demo_config_with_one_line(tmp_path, capsys, command):
    """The demo has its own stages and folder layout: only 'distilflow run' runs it."""
    args = [a for a in _args(tmp_path / "run") if a not in ("run", "--no-tensorboard")]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the reasoning demo runs with 'distilflow run' only" in err
    assert not (tmp_path / "run").exists()
