"""CausalLMTask against hand computations, and token-level KD under gradient accumulation in the loop."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from distilflow.config import KDWeightConfig, PhaseConfig, TrainConfig
from distilflow.data.text import Record, tokenize
from distilflow.losses.objective import IGNORE_INDEX, Objective
from distilflow.models.heads import build_head
from distilflow.models.hf import build_causal_lm
from distilflow.models.layers import decoder_layers
from distilflow.models.taps import Taps
from distilflow.schedules import phase_boundaries
from distilflow.tasks.causal_lm import CausalLMTask
from distilflow.teachers.live import LiveTeacher
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit

from .conftest import FAMILIES, family_config

CPU = torch.device("cpu")
SEQ_LEN = 28
# Prompt/completion pairs of very different lengths: with pack=False each is one row, so the rows
# (and the micro-batches of an accumulated step) hold different numbers of real and scored tokens.
RECORDS = [
    Record(prompt="def f(x):", completion=" return x"),  # 7 prompt + 8 completion tokens (EOS included)
    Record(prompt="import", completion=" bisect\nfrom heapq import heappush"),  # 5 + 22
    Record(prompt="class Heap:", completion="\n    pass"),  # 10 + 7
    Record(prompt="", completion="while lo < hi:\n    mid = (lo + hi) // 2"),  # 0 + 30: truncated to SEQ_LEN
    Record(prompt="# keyword", completion=" list"),  # 7 + 4
]


@pytest.fixture(scope="module")
def rows(tokenizer) -> dict[str, torch.Tensor]:
    return tokenize(RECORDS, tokenizer, seq_len=SEQ_LEN, pack=False)


def _llama(tokenizer, *, layers: int, hidden: int, seed: int, family: str = "llama") -> nn.Module:
    torch.manual_seed(seed)
    config = family_config(family, len(tokenizer), layers=layers, hidden=hidden)
    if family == "gpt2":
        # GPT-2 defaults to dropout 0.1, which draws other masks when a batch is split in two;
        # the accumulation equality is about loss normalisation, so it is checked without dropout.
        config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return build_causal_lm(config).eval()


def _task(rows, *, batch_size: int = 4, grad_accum: int = 1, vocab_size: int | None = None) -> CausalLMTask:
    return CausalLMTask(
        rows, rows, batch_size=batch_size, grad_accum=grad_accum, seed=3, device=CPU, vocab_size=vocab_size
    )


def _perplexity_by_hand(model: nn.Module, rows: dict[str, torch.Tensor], vocab_size: int | None = None) -> float:
    """exp(mean negative log-likelihood) of every scored token, one row and one position at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, mask, labels in zip(rows["input_ids"], rows["attention_mask"], rows["labels"]):
            logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0].double()  # (T, V)
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            log_probs = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(ids)):
                if labels[t] != IGNORE_INDEX:  # the logits at t - 1 predict the token at t
                    nll -= float(log_probs[t - 1, labels[t]])
                    count += 1
    return math.exp(nll / count)


def test_rows_have_padding_prompts_and_uneven_lengths(rows):
    real = rows["attention_mask"].sum(1)
    scored = (rows["labels"] != IGNORE_INDEX).sum(1)
    assert len(set(real.tolist())) == len(RECORDS)  # every row a different length
    assert (real < SEQ_LEN).any() and (scored < real).any()  # padding and prompt tokens exist


def test_forward_targets_and_counts(rows, tokenizer):
    model = _llama(tokenizer, layers=1, hidden=16, seed=0)
    task = _task(rows)
    batch = {k: v[:3] for k, v in rows.items()}
    logits = task.forward(model, batch)
    assert logits.shape == (3, SEQ_LEN - 1, len(tokenizer))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, full[:, :-1])
    targets = task.targets(batch)
    assert torch.equal(targets.labels, batch["labels"][:, 1:])
    assert torch.equal(targets.kd_mask, batch["labels"][:, 1:] != -100)
    assert torch.equal(targets.feature_mask, batch["attention_mask"] == 1)
    assert task.count(batch) == int(batch["attention_mask"].sum())
    counts = targets.counts(per_token=True)
    assert counts == {
        "kd": int((batch["labels"][:, 1:] != -100).sum()),
        "ce": int((batch["labels"][:, 1:] != -100).sum()),
        "feature": int(batch["attention_mask"].sum()),
    }


def test_micro_batches_split_the_step(rows):
    whole = _task(rows, batch_size=4, grad_accum=1).micro_batches(0)
    halves = _task(rows, batch_size=4, grad_accum=2).micro_batches(0)
    assert len(whole) == 1 and len(halves) == 2 and [len(h["input_ids"]) for h in halves] == [2, 2]
    for key in rows:
        assert torch.equal(torch.cat([h[key] for h in halves]), whole[0][key])
    # Four distinct rows of the five.
    assert len({tuple(r.tolist()) for r in whole[0]["input_ids"]}) == 4


@pytest.mark.parametrize("batch_size", [2, 16])
def test_perplexity_is_exp_of_mean_token_cross_entropy(rows, tokenizer, batch_size):
    model = _llama(tokenizer, layers=2, hidden=32, seed=1)
    result = _task(rows).evaluate(model, batch_size=batch_size)
    expected = _perplexity_by_hand(model, rows)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(expected), rel=1e-5)
    assert model.training is False


def test_vocab_size_cuts_the_logits_and_renormalises(rows, tokenizer):
    """A student with extra embedding rows is scored over the ids it shares with the teacher."""
    model = _llama(tokenizer, layers=1, hidden=16, seed=2)
    model.resize_token_embeddings(len(tokenizer) + 64, mean_resizing=False)
    shared = len(tokenizer)
    task = _task(rows, vocab_size=shared)
    batch = {k: v[:2] for k, v in rows.items()}
    logits = task.forward(model, batch)
    assert logits.shape == (2, SEQ_LEN - 1, shared)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert full.shape[-1] == shared + 64
    torch.testing.assert_close(logits, full[:, :-1, :shared])
    cut = task.evaluate(model)["perplexity"]
    assert cut == pytest.approx(_perplexity_by_hand(model, rows, vocab_size=shared), rel=1e-5)
    uncut = _task(rows).evaluate(model)["perplexity"]
    assert uncut == pytest.approx(_perplexity_by_hand(model, rows), rel=1e-5)
    assert uncut > cut  # the extra rows take probability mass from every real token


# ---------------------------------------------------------------- gradient accumulation in the loop

KD_WEIGHT, CE_WEIGHT, FEATURE_WEIGHT, TEMPERATURE, LR = 0.7, 0.3, 0.5, 2.0, 1e-2


def _step_once(tmp_path, rows, teacher, student, terms, grad_accum):
    """One optimizer step of ``fit`` on the 4-row batch of step 0 split into ``grad_accum`` micro-batches."""
    student = copy.deepcopy(student)
    task = _task(rows, batch_size=4, grad_accum=grad_accum)
    pairs = []
    student_taps = teacher_taps = None
    heads = nn.ModuleList()
    if "feature" in terms:
        pairs = [(decoder_layers(student)[0], decoder_layers(teacher)[1])]
        student_taps = Taps(student, [pairs[0][0]], "student")
        teacher_taps = Taps(teacher, [pairs[0][1]], "teacher")
        torch.manual_seed(7)
        heads.append(build_head((SEQ_LEN, 16), (SEQ_LEN, 32), per_token=True, name="layer pair"))
    objective = Objective(
        phase_boundaries([PhaseConfig(name="joint", fraction=1.0, terms=list(terms))], 1),
        total_steps=1,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=KD_WEIGHT, warmup_steps=0),
        temperature=TEMPERATURE,
        ce_weight=CE_WEIGHT,
        feature_weight=FEATURE_WEIGHT,
        layer_weights=[1.0] * len(pairs),
        heads=heads,
        per_token=True,
    )
    train = TrainConfig(
        steps=1, batch_size=4, grad_accum=grad_accum, lr=LR, min_lr=0.0, warmup_steps=0, eval_every=0, log_every=1
    )
    folder = tmp_path / f"accum{grad_accum}"
    folder.mkdir()
    log = MetricsLog(folder, "student", tensorboard=False)
    fit(
        stage="student",
        model=student,
        objective=objective,
        task=task,
        train=train,
        stage_dir=folder,
        log=log,
        config={},
        teacher=LiveTeacher(teacher, task, teacher_taps),
        student_taps=student_taps,
    )
    (row,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return row, student


def _loss_by_hand(teacher, student, batch) -> tuple[float, float]:
    """Token-level KD (T^2 KL(teacher || student) at temperature T) and CE, each a mean over scored tokens."""
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    kd, ce, count = 0.0, 0.0, 0
    for b in range(len(batch["input_ids"])):
        for t in range(1, SEQ_LEN):
            label = int(batch["labels"][b, t])
            if label == IGNORE_INDEX:
                continue
            log_p_teacher = torch.log_softmax(t_logits[b, t - 1] / TEMPERATURE, dim=-1)
            log_p_student = torch.log_softmax(s_logits[b, t - 1] / TEMPERATURE, dim=-1)
            kd += TEMPERATURE**2 * float((log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum())
            ce -= float(torch.log_softmax(s_logits[b, t - 1], dim=-1)[label])
            count += 1
    return kd / count, ce / count


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("terms", [("kd", "ce"), ("feature", "kd", "ce")])
def test_gradient_accumulation_matches_one_batch_with_uneven_tokens(tmp_path, rows, tokenizer, terms, family):
    teacher = _llama(tokenizer, layers=2, hidden=32, seed=10, family=family)
    student = _llama(tokenizer, layers=1, hidden=16, seed=11, family=family)
    halves = _task(rows, batch_size=4, grad_accum=2).micro_batches(0)
    scored = [int((h["labels"][:, 1:] != IGNORE_INDEX).sum()) for h in halves]
    real = [int(h["attention_mask"].sum()) for h in halves]
    assert scored[0] != scored[1] and real[0] != real[1]  # the micro-batches really are uneven

    one_row, one = _step_once(tmp_path, rows, teacher, student, terms, grad_accum=1)
    two_row, two = _step_once(tmp_path, rows, teacher, student, terms, grad_accum=2)

    # KD is a small difference of terms of the size of log V (about 7 here): float32 rounding of those
    # terms (7 * 1.2e-7 per token) bounds its absolute error, not its own small value.
    for key in ("loss", *terms):
        assert two_row[key] == pytest.approx(one_row[key], rel=1e-5, abs=1e-6), key
    assert two_row["grad_norm"] == pytest.approx(one_row["grad_norm"], rel=1e-5)
    # Gradients (left in .grad after the step) agree up to float32 summation order: micro-batches
    # add the same terms in another order, so the error scales with the tensor's largest entry, not
    # with each entry (an entry near zero may even change sign).
    conditioned = total = 0
    for (name, p1), p2 in zip(one.named_parameters(), two.parameters()):
        scale = float(p1.grad.abs().max())
        torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=1e-4 * scale + 1e-10, msg=name)
        # AdamW's first step moves each weight by lr * g / (|g| + eps), about lr * sign(g): where g is
        # at the level of the summation noise its sign, and so the update, may flip by 2 * lr. Where |g|
        # is ten times that noise (and far above eps) the update cannot flip and barely depends on g.
        noise = float((p2.grad - p1.grad).abs().max())
        sure = p1.grad.abs() > 10 * noise + 1e-6
        torch.testing.assert_close(p2[sure], p1[sure], rtol=0, atol=1e-4 * LR, msg=name)
        conditioned, total = conditioned + int(sure.sum()), total + sure.numel()
    assert conditioned > total / 2  # the step is checked on most weights, not a handful
    assert not torch.equal(one.get_input_embeddings().weight, student.get_input_embeddings().weight)  # it trained

    # The logged parts equal means over all scored tokens of the step, computed by hand ...
    whole = _task(rows, batch_size=4).micro_batches(0)[0]
    kd, ce = _loss_by_hand(teacher, student, whole)
    # (the float32 run against a float64 reference: the same absolute bound on KD as above)
    assert one_row["kd"] == pytest.approx(kd, rel=1e-5, abs=1e-6) and one_row["ce"] == pytest.approx(ce, rel=1e-5)
    if "feature" not in terms:
        assert one_row["loss"] == pytest.approx(KD_WEIGHT * kd + CE_WEIGHT * ce, rel=1e-5, abs=1e-6)
    # ... which the mean of per-micro-batch means (the usual accumulation bug) would not give.
    ce_halves = [_loss_by_hand(teacher, student, h)[1] for h in halves]
    assert abs(sum(ce_halves) / 2 - ce) > 1e-3
