"""Fused-linear KD + CE against the plain losses on ``F.linear(hidden, weight, bias)``, and through the loop.

Tolerances as in test_chunked.py: the same float32 loss functions run on row chunks, so values
differ only by the order of row sums; the gradients of hidden states and lm_head are the same
matmuls split by rows (the weight gradient is a sum of per-chunk products instead of one
product), a few ulps of float32 apart: rel 1e-5, absolute floor 1e-6 of the largest entry.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distilflow.config import KDWeightConfig, PhaseConfig, TrainConfig
from distilflow.errors import UserError
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.objective import IGNORE_INDEX, Objective
from distilflow.models.heads import build_head
from distilflow.models.hf import build_causal_lm
from distilflow.models.layers import decoder_layers
from distilflow.models.taps import Taps
from distilflow.schedules import phase_boundaries
from distilflow.tasks.causal_lm import CausalLMTask, lm_hidden_states
from distilflow.teachers.live import LiveTeacher
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit

from .conftest import DIVERGENCE_NAMES, assert_close, make_inputs, plain_total

H_STUDENT, H_TEACHER, V = 6, 10, 37


def make_heads(seed: int, *, v_student: int = V, v_teacher: int = V, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(3, 7, H_STUDENT, generator=g)
    weight = torch.randn(v_student, H_STUDENT, generator=g)
    b = torch.randn(v_student, generator=g) if bias else None
    teacher_hidden = torch.randn(3, 7, H_TEACHER, generator=g)
    teacher_weight = torch.randn(v_teacher, H_TEACHER, generator=g)
    return student_hidden, weight, b, teacher_hidden, teacher_weight


def leaves(*tensors):
    return [t.clone().requires_grad_() if t is not None else None for t in tensors]


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
def test_fused_equals_plain_value_and_gradients(divergence, temperature, masked, teacher_kind):
    hidden, weight, bias, t_hidden, t_weight = make_heads(1)
    _, _, labels, mask = make_inputs(1, v=V)
    mask = mask if masked else None
    teacher_logits = F.linear(t_hidden, t_weight)
    options = dict(divergence=divergence, temperature=temperature, beta=0.3, kd_weight=0.7, ce_weight=0.2)

    ref = leaves(hidden, weight, bias)
    ref_total, ref_kd, ref_ce = plain_total(F.linear(*ref), teacher_logits, labels, mask, **options)
    ref_grads = torch.autograd.grad(ref_total, ref)

    mine = leaves(hidden, weight, bias)
    teacher = teacher_logits if teacher_kind == "logits" else HiddenStates(t_hidden, t_weight)
    out = fused_kd_ce(HiddenStates(*mine), teacher, labels, mask=mask, chunk_rows=3, **options)
    grads = torch.autograd.grad(out.loss, mine)

    assert_close(out.loss, ref_total.detach(), "loss")
    assert_close(out.kd, ref_kd.detach(), "kd")
    assert_close(out.ce, ref_ce.detach(), "ce")
    for name, grad, ref_grad in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(grad, ref_grad, name)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_vocab_cut_no_bias_and_shifted_positions(divergence):
    """A student table of V + 5 rows and a teacher table of V + 2, both cut to V; no lm_head bias;
    hidden states ``[:, :-1]`` as the causal-LM task gives them."""
    hidden, weight, _, t_hidden, t_weight = make_heads(2, v_student=V + 5, v_teacher=V + 2, bias=False)
    _, _, labels, mask = make_inputs(2, v=V)
    options = dict(divergence=divergence, temperature=2.0, beta=0.5, kd_weight=1.0, ce_weight=0.5)
    ref = leaves(hidden, weight)
    logits = F.linear(ref[0][:, :-1], ref[1][:V])
    ref_total, _, _ = plain_total(
        logits, F.linear(t_hidden[:, :-1], t_weight[:V]), labels[:, 1:], mask[:, 1:], **options
    )
    ref_grads = torch.autograd.grad(ref_total, ref)

    mine = leaves(hidden, weight)
    out = fused_kd_ce(
        HiddenStates(mine[0][:, :-1], mine[1], None, V),
        HiddenStates(t_hidden[:, :-1], t_weight, None, V),
        labels[:, 1:],
        mask=mask[:, 1:],
        chunk_rows=4,
        **options,
    )
    grads = torch.autograd.grad(out.loss, mine)
    assert_close(out.loss, ref_total.detach())
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad)
    assert torch.all(grads[1][V:] == 0)  # lm_head rows of ids that are not scored


def test_teacher_of_another_width_is_refused_and_no_grad_makes_no_gradients():
    hidden, weight, bias, t_hidden, t_weight = make_heads(3, v_teacher=V + 1)
    _, _, labels, _ = make_inputs(3, v=V)
    with pytest.raises(UserError, match="teacher scores 38 vocabulary ids but the student 37"):
        fused_kd_ce(HiddenStates(hidden, weight, bias), HiddenStates(t_hidden, t_weight), labels)
    mine = leaves(hidden, weight, bias)
    with torch.no_grad():
        out = fused_kd_ce(HiddenStates(*mine), None, labels, kd_weight=None, ce_weight=1.0)
    assert not out.loss.requires_grad
    assert_close(
        out.ce, F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, V), labels.reshape(-1), reduction="sum")
    )


# ---------------------------------------------------------------- the causal-LM task and the real loop

SEQ_LEN, TABLE = 20, 96
KD_WEIGHT, CE_WEIGHT, FEATURE_WEIGHT, TEMPERATURE, LR = 0.7, 0.3, 0.5, 2.0, 1e-2


def tiny_lm(family: str, *, hidden: int, layers: int, seed: int, vocab: int = TABLE) -> nn.Module:
    torch.manual_seed(seed)
    if family == "gpt2":  # tied input and output embeddings; lm_head without bias
        config = {"model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": layers, "n_head": 2}
        config.update(n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 32,
            "tie_word_embeddings": False,
        }
    return build_causal_lm(config).eval()


def token_rows(seed: int = 0, rows: int = 6, vocab: int = TABLE) -> dict[str, torch.Tensor]:
    """Rows of uneven length: prompts (label -100) and right padding (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, SEQ_LEN), generator=g)
    lengths = torch.tensor([20, 13, 17, 9, 20, 15])[:rows]
    prompts = torch.tensor([3, 0, 5, 2, 7, 1])[:rows]
    position = torch.arange(SEQ_LEN)
    attention = (position[None] < lengths[:, None]).long()
    labels = torch.where((position[None] >= prompts[:, None]) & (attention == 1), ids, IGNORE_INDEX)
    return {"input_ids": ids * attention + (1 - attention), "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_lm_hidden_states_give_the_model_logits(family):
    model = tiny_lm(family, hidden=16, layers=1, seed=0)
    batch = token_rows(0)
    states = lm_hidden_states(model, batch, vocab_size=TABLE - 4)
    assert states.shape == (6, SEQ_LEN - 1, TABLE - 4)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(states.logits_at(), full[:, :-1, : TABLE - 4], rtol=1e-5, atol=1e-5)


def test_a_model_whose_logits_are_not_its_lm_head_output_is_refused():
    model = tiny_lm("qwen2", hidden=16, layers=1, seed=0)
    original = model.forward

    def scaled(*args, **kwargs):  # as logit scaling or soft-capping would
        out = original(*args, **kwargs)
        out.logits = 0.5 * out.logits
        return out

    model.forward = scaled
    with pytest.raises(UserError, match="does not compute its logits as lm_head"):
        lm_hidden_states(model, token_rows(0))


def run_steps(tmp_path, name, student, teacher, terms, *, hidden_states, vocab_size=None, steps=2):
    """``steps`` optimizer steps of the real loop (2 micro-batches each); the logged rows and the model."""
    student = copy.deepcopy(student)
    rows = token_rows(1)
    task = CausalLMTask(
        rows,
        rows,
        batch_size=4,
        grad_accum=2,
        seed=3,
        device=torch.device("cpu"),
        vocab_size=vocab_size,
        loss_impl="fused" if hidden_states else "plain",
        chunk_rows=5,
    )
    student_taps = teacher_taps = None
    heads = nn.ModuleList()
    pairs = []
    if "feature" in terms:
        pairs = [(decoder_layers(student)[0], decoder_layers(teacher)[1])]
        student_taps = Taps(student, [pairs[0][0]], "student")
        teacher_taps = Taps(teacher, [pairs[0][1]], "teacher")
        torch.manual_seed(7)
        heads.append(build_head((SEQ_LEN, 16), (SEQ_LEN, 24), per_token=True, name="layer pair"))
    objective = Objective(
        phase_boundaries([PhaseConfig(name="joint", fraction=1.0, terms=list(terms))], steps),
        total_steps=steps,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=KD_WEIGHT, warmup_steps=0),
        temperature=TEMPERATURE,
        ce_weight=CE_WEIGHT,
        feature_weight=FEATURE_WEIGHT,
        layer_weights=[1.0] * len(pairs),
        heads=heads,
        per_token=True,
        loss_impl="fused" if hidden_states else "plain",
        chunk_rows=5,
    )
    train = TrainConfig(
        steps=steps, batch_size=4, grad_accum=2, lr=LR, min_lr=0.0, warmup_steps=0, eval_every=1, log_every=1
    )
    folder = tmp_path / name
    folder.mkdir()
    fit(
        stage="student",
        model=student,
        objective=objective,
        task=task,
        train=train,
        stage_dir=folder,
        log=MetricsLog(folder, "student", tensorboard=False),
        config={},
        teacher=LiveTeacher(teacher, task, teacher_taps),
        student_taps=student_taps,
    )
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return logged, student


@pytest.mark.parametrize(
    ("family", "terms", "cut"),
    [("qwen2", ("kd", "ce"), False), ("qwen2", ("feature", "kd", "ce"), True), ("gpt2", ("kd", "ce"), False)],
)
def test_loop_with_fused_loss_logs_what_the_plain_loss_logs(tmp_path, family, terms, cut):
    """Two optimizer steps of the real loop with grad_accum 2: losses, parts, gradient norms,
    held-out perplexity and the trained weights agree with the plain loss. ``cut``: the student's
    table has 8 more rows than the teacher's (the shared-vocabulary cut)."""
    teacher = tiny_lm(family, hidden=24, layers=2, seed=10)
    student = tiny_lm(family, hidden=16, layers=1, seed=11, vocab=TABLE + 8 if cut else TABLE)
    vocab = TABLE if cut else None
    plain, plain_model = run_steps(tmp_path, "plain", student, teacher, terms, hidden_states=False, vocab_size=vocab)
    fused, fused_model = run_steps(tmp_path, "fused", student, teacher, terms, hidden_states=True, vocab_size=vocab)
    assert len(plain) == len(fused) == 4  # a training row and an evaluation row per step
    for expected, got in zip(plain, fused):
        assert set(got) == set(expected)
        for key in ("loss", *terms, "grad_norm", "eval_perplexity", "eval_loss"):
            if key in expected:
                # abs: KD between two nearly uniform random-init models is ~1e-2, a difference of
                # per-token terms of size log(V) ~ 4.6 whose float32 rounding is ~1e-6 absolute.
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # AdamW's first steps move each weight by about lr * g / (|g| + eps), which amplifies float noise
    # where g is near eps: weights are compared at a thousandth of the step size lr.
    for (name, p_plain), p_fused in zip(plain_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(p_fused, p_plain, rtol=0, atol=1e-3 * LR, msg=name)
    assert not torch.equal(plain_model.get_input_embeddings().weight, student.get_input_embeddings().weight)


def test_bf16_autocast_fused_matches_plain_under_autocast():
    """Under bf16 autocast both paths run the lm_head matmul in bf16 and the loss in float32; the
    chunks round like the whole matmul does, so values agree to bf16 precision (2^-8 relative) and
    the float32 lm_head gradient too."""
    hidden, weight, bias, t_hidden, t_weight = make_heads(5)
    _, _, labels, mask = make_inputs(5, v=V)
    options = dict(divergence="forward_kl", temperature=2.0, beta=0.5, kd_weight=0.7, ce_weight=0.3)
    ref, mine = leaves(hidden, weight, bias), leaves(hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_total, _, _ = plain_total(F.linear(*ref), F.linear(t_hidden, t_weight), labels, mask, **options)
        out = fused_kd_ce(
            HiddenStates(*mine), HiddenStates(t_hidden, t_weight), labels, mask=mask, chunk_rows=4, **options
        )
    ref_grads = torch.autograd.grad(ref_total, ref)
    grads = torch.autograd.grad(out.loss, mine)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.detach(), ref_total.detach(), rtol=2**-8, atol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        scale = float(ref_grad.abs().max())
        torch.testing.assert_close(grad, ref_grad, rtol=2**-6, atol=2**-7 * scale)
