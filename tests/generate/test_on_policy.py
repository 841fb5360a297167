"""On-policy batches: prompts kept and masked, continuations are the student's own samples."""

from __future__ import annotations

import json

import pytest
import torch

from distilflow.data.text import Record, tokenize
from distilflow.errors import UserError
from distilflow.generate.sampling import Sampling
from distilflow.losses.objective import IGNORE_INDEX
from distilflow.models.hf import build_causal_lm
from distilflow.tasks.causal_lm import CausalLMTask
from distilflow.tasks.on_policy import OnPolicyTask, prompt_lengths

from .conftest import greedy_reference, tiny_config


def _task(tokenizer, records, batch_size=4):
    rows = tokenize(records, tokenizer, seq_len=24, pack=False)
    return CausalLMTask(rows, rows, batch_size=batch_size, grad_accum=2, seed=0, device=torch.device("cpu"))


def _records():
    return [Record(prompt=f"{i}+{i + 3}=", completion=f"<think>x</think>{2 * i + 3}") for i in range(6)]


def test_on_policy_rows_are_prompt_then_student_greedy_continuation(tokenizer):
    torch.manual_seed(0)
    student = build_causal_lm(tiny_config(tokenizer)).train()
    base = _task(tokenizer, _records())
    task = OnPolicyTask(
        base,
        student,
        lmbda=1.0,
        sampling=Sampling(max_new_tokens=10, temperature=0.0),  # greedy: comparable to a reference decode
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=0,
    )
    originals = base.micro_batches(0)
    batches = task.micro_batches(0)
    assert student.training  # put back in train mode after sampling
    assert task.on_policy_steps == 1 and len(batches) == 2
    for original, batch in zip(originals, batches):
        lengths = prompt_lengths(original["labels"], original["attention_mask"])
        assert torch.equal(lengths, prompt_lengths(batch["labels"], batch["attention_mask"]))
        targets = task.targets(batch)
        for row, n in enumerate(lengths.tolist()):
            prompt = original["input_ids"][row, :n].tolist()
            assert batch["input_ids"][row, :n].tolist() == prompt  # the prompt is kept
            real = int(batch["attention_mask"][row].sum())
            continuation = batch["input_ids"][row, n:real].tolist()
            expected = greedy_reference(student, prompt, 10, tokenizer.eos_token_id)
            if len(expected) < 10:
                expected = expected + [tokenizer.eos_token_id]
            assert continuation == expected  # the student's own continuation
            assert (batch["labels"][row, :n] == IGNORE_INDEX).all()  # prompt masked
            assert batch["labels"][row, n:real].tolist() == continuation
            assert (batch["labels"][row, real:] == IGNORE_INDEX).all()  # padding masked
            # KD scores the sampled tokens (shifted: logits at t predict t + 1); no hard label.
            assert targets.kd_mask[row].tolist() == (batch["labels"][row, 1:] != IGNORE_INDEX).tolist()
        assert (targets.labels == IGNORE_INDEX).all()


def test_lmbda_draws_are_a_pure_function_of_the_step(tokenizer):
    student = build_causal_lm(tiny_config(tokenizer))
    base = _task(tokenizer, _records())
    kwargs = dict(sampling=Sampling(4, 1.0), pad_token_id=1, eos_token_id=0, seed=5)
    task = OnPolicyTask(base, student, lmbda=0.3, **kwargs)
    draws = [task.is_on_policy(s) for s in range(2000)]
    assert draws == [OnPolicyTask(base, student, lmbda=0.3, **kwargs).is_on_policy(s) for s in range(2000)]
    assert 0.25 < sum(draws) / 2000 < 0.35
    late = OnPolicyTask(base, student, lmbda=0.3, start_step=1000, **kwargs)
    assert [late.is_on_policy(s) for s in range(2000)] == [False] * 1000 + draws[1000:]
    off = OnPolicyTask(base, student, lmbda=0.0, **kwargs)
    batch = off.micro_batches(3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batch, base.micro_batches(3)))


def test_rows_without_prompt_are_refused(tokenizer):
    student = build_causal_lm(tiny_config(tokenizer))
    packed = _task(tokenizer, [Record(completion="12+3=15")] * 6)
    with pytest.raises(UserError, match="no prompt"):
        OnPolicyTask(packed, student, lmbda=0.5, sampling=Sampling(4, 1.0), pad_token_id=1, eos_token_id=0, seed=0)


def _pipeline_args(tmp_path, model_dir, teacher: str) -> list[str]:
    from .conftest import write_jsonl

    data = write_jsonl(
        tmp_path / "traces.jsonl",
        [{"prompt": f"{i}+{i}=", "completion": f"<think>{i}+{i}={2 * i}</think>{2 * i}"} for i in range(12)],
    )
    return [
        "run",
        f"output_dir={tmp_path / 'run'}",
        "data.source=text",
        f"data.text.path={data}",
        "data.text.pack=false",
        "data.text.seq_len=24",
        "data.text.test_fraction=0.25",
        "teacher.model.arch=hf",
        f"teacher.model.hf.path={teacher}",
        "student.model.arch=hf",
        f"student.model.hf.path={model_dir}",
        "student.train.steps=2",
        "student.train.batch_size=4",
        "student.train.warmup_steps=0",
        "distill.feature_layers=[]",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        "distill.divergence=jsd",
        "on_policy.lmbda=1.0",
        "on_policy.max_new_tokens=8",
        "deploy.enabled=false",
        "--no-tensorboard",
    ]


def test_pipeline_distills_on_policy_on_generated_prompt_completion_data(tmp_path, model_dir):
    from distilflow.cli import main

    assert main(_pipeline_args(tmp_path, model_dir, str(model_dir))) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    student = [m for m in metrics if m.get("stage") == "student" and "kd" in m]
    # lmbda 1: every batch is the student's own samples, scored by KD only (no hard label).
    assert student and all(m.get("ce", 0.0) == 0.0 for m in student)


def test_teacher_with_another_tokenizer_and_cross_tokenizer_off_is_refused(tmp_path, model_dir, tokenizer, capsys):
    from distilflow.cli import main
    from distilflow.data.arith import arith_tokenizer

    other = tmp_path / "other"
    torch.manual_seed(1)
    build_causal_lm(tiny_config(tokenizer)).save_pretrained(other)
    shuffled = arith_tokenizer()
    vocab = json.loads(shuffled.backend_tokenizer.to_str())
    # Swap two digits: same size, different ids.
    model_vocab = vocab["model"]["vocab"]
    model_vocab["1"], model_vocab["2"] = model_vocab["2"], model_vocab["1"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(vocab)), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(other)
    capsys.readouterr()  # the save's progress bar
    assert main([*_pipeline_args(tmp_path, model_dir, str(other)), "distill.cross_tokenizer=off"]) == 2
    err = capsys.readouterr().err
    assert "distill.cross_tokenizer off: teacher and student tokenizers differ at id" in err and err.count("\n") == 1


def test_on_policy_across_tokenizers_rescores_the_students_samples_with_the_teachers_tokens(
    tmp_path, model_dir, tokenizer, capsys
):
    """The same teacher of another tokenizer, left at cross_tokenizer auto: the student's samples are
    re-tokenized for the teacher (the ids guard checks the first, sampled, batch) and scored by the hybrid."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from distilflow.cli import main
    from distilflow.data.arith import arith_tokenizer

    other = tmp_path / "other"
    torch.manual_seed(1)
    build_causal_lm(tiny_config(tokenizer)).save_pretrained(other)
    vocab = json.loads(arith_tokenizer().backend_tokenizer.to_str())
    model_vocab = vocab["model"]["vocab"]
    model_vocab["1"], model_vocab["2"] = model_vocab["2"], model_vocab["1"]
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(vocab)), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(other)
    assert main(_pipeline_args(tmp_path, model_dir, str(other))) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    student = [m for m in metrics if m.get("stage") == "student" and "kd" in m]
    assert student and all(m.get("ce", 0.0) == 0.0 and m["kd"] > 0 and "kd_matched" in m for m in student)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["cross_tokenizer"] == "hybrid"
