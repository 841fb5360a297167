"""Cross-tokenizer losses (losses/uld.py) against plain references written group by group.

The references build each group's merged distribution with a Python loop over its tokens (float64,
autograd for the gradient), sort with numpy or torch, pad with zeros and sum absolute differences;
the hybrid reference builds the shared-id buckets by hand. Tolerances: float64 inputs run the
implementation in float64 (rel 1e-9); float32 inputs are compared at rel 1e-5 (summation order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distilflow.data.align import AlignedSide, Aligner, Alignment
from distilflow.data.stdlib_corpus import stdlib_root, train_tokenizer
from distilflow.data.vocab_map import VocabMap, build_vocab_map
from distilflow.errors import UserError
from distilflow.losses.logits import forward_kl, generalized_jsd
from distilflow.losses.uld import TopkTeacher, hybrid_loss, sorted_l1, uld_loss

# (batch row, student first, student last, teacher first, teacher last): 1:1, 1:2, 2:1, 2:3, 3:1
GROUPS = [(0, 1, 1, 1, 1), (0, 2, 2, 2, 3), (0, 3, 4, 4, 4), (0, 5, 6, 5, 7), (1, 1, 3, 2, 2), (1, 4, 4, 3, 3)]
B, T_S, T_T, V_S, V_T = 2, 8, 9, 23, 31


def side(ids: torch.Tensor, first: list[int], last: list[int]) -> AlignedSide:
    offsets = torch.full((*ids.shape, 2), -1, dtype=torch.long)  # not read by the losses
    ones = torch.ones_like(ids)
    return AlignedSide(ids, ones, ones.bool(), offsets, torch.tensor(first), torch.tensor(last))


def hand_alignment(seed: int = 0, groups=GROUPS) -> Alignment:
    g = torch.Generator().manual_seed(seed)
    student_ids = torch.randint(0, V_S, (B, T_S), generator=g)
    teacher_ids = torch.randint(0, V_T, (B, T_T), generator=g)
    rows, sf, sl, tf, tl = (list(column) for column in zip(*groups))
    return Alignment(side(student_ids, sf, sl), side(teacher_ids, tf, tl), torch.tensor(rows), ["", ""])


def logits(seed: int, dtype=torch.float64, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(B, T_S, V_S, generator=g, dtype=torch.float64)
    teacher = scale * torch.randn(B, T_T, V_T, generator=g, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype)


# ---------------------------------------------------------------- plain references


def ref_merged(logits_of_row: torch.Tensor, ids: torch.Tensor, first: int, last: int, temperature: float):
    """``p(. | context) * prod p(actual later token)``, one group, by a loop over its tokens."""
    log_p = torch.log_softmax(logits_of_row[first - 1].double() / temperature, dim=-1)
    continuation = torch.zeros((), dtype=torch.float64)
    for k in range(first + 1, last + 1):
        continuation = continuation + torch.log_softmax(logits_of_row[k - 1].double() / temperature, -1)[ids[k]]
    return log_p.exp() * continuation.exp()


def ref_sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    size = max(p.numel(), q.numel())
    p_sorted = torch.nn.functional.pad(torch.sort(p, descending=True).values, (0, size - p.numel()))
    q_sorted = torch.nn.functional.pad(torch.sort(q, descending=True).values, (0, size - q.numel()))
    return (p_sorted - q_sorted).abs().sum()


def merged_pairs(student, teacher, alignment, temperature):
    """(student q, teacher q) of each group, by :func:`ref_merged`."""
    for g in range(alignment.num_groups):
        b = int(alignment.batch[g])
        yield tuple(
            ref_merged(logits_[b], side_.input_ids[b], int(side_.first[g]), int(side_.last[g]), temperature)
            for logits_, side_ in ((student, alignment.student), (teacher, alignment.teacher))
        )


def ref_uld(student, teacher, alignment, temperature=1.0):
    total = sum(ref_sorted_l1(t, s) for s, t in merged_pairs(student, teacher, alignment, temperature))
    return temperature**2 * total


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    keep = p > 0
    return (p[keep] * (p[keep].log() - q[keep].log())).sum()


def ref_divergence(name: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D(p || q) of two bucket distributions: forward KL, reverse KL, or JSD with beta 0.5 (GKD eq. 3)."""
    if name == "forward_kl":
        return ref_kl(p, q)
    if name == "reverse_kl":
        return ref_kl(q, p)
    m = 0.5 * p + 0.5 * q
    return 0.5 * ref_kl(p, m) + 0.5 * ref_kl(q, m)


def ref_hybrid(
    student,
    teacher,
    alignment,
    vocab_map,
    temperature=1.0,
    matched_weight=1.0,
    unmatched_weight=1.0,
    divergence="forward_kl",
):
    t_ids, s_ids = vocab_map.teacher_ids, vocab_map.student_ids
    t_other = [i for i in range(teacher.shape[-1]) if i not in set(t_ids.tolist())]
    s_other = [i for i in range(student.shape[-1]) if i not in set(s_ids.tolist())]
    total = torch.zeros((), dtype=torch.float64)
    for s, t in merged_pairs(student, teacher, alignment, temperature):
        t_buckets = torch.cat([t[t_ids], (1 - t[t_ids].sum()).reshape(1)])
        s_buckets = torch.cat([s[s_ids], (1 - s[s_ids].sum()).reshape(1)])
        total = total + matched_weight * ref_divergence(divergence, t_buckets, s_buckets)
        total = total + unmatched_weight * ref_sorted_l1(t[t_other], s[s_other])
    return temperature**2 * total


def partial_map(seed: int = 3, shared: int = 12) -> VocabMap:
    g = torch.Generator().manual_seed(seed)
    teacher_ids = torch.randperm(V_T, generator=g)[:shared].sort().values
    student_ids = torch.randperm(V_S, generator=g)[:shared]
    return VocabMap(teacher_ids, student_ids)


def value_and_grad(fn, student, *args, **kwargs):
    leaf = student.clone().requires_grad_()
    out = fn(leaf, *args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out
    (grad,) = torch.autograd.grad(loss, leaf)
    return out, loss.detach(), grad


def close(actual, expected, rtol=1e-9, what=""):
    atol = rtol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=what)


# ---------------------------------------------------------------- tests


def test_sorted_l1_is_the_padded_sorted_l1_of_numpy():
    g = np.random.default_rng(0)
    p, q = g.dirichlet(np.ones(7), size=3), g.dirichlet(np.ones(4), size=3)
    expected = [np.abs(np.sort(p[i])[::-1] - np.pad(np.sort(q[i])[::-1], (0, 3))).sum() for i in range(3)]
    np.testing.assert_allclose(sorted_l1(torch.tensor(p), torch.tensor(q)).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sorted_l1(torch.tensor(q), torch.tensor(p)).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_equals_reference_value_and_gradient(temperature):
    alignment = hand_alignment()
    student, teacher = logits(1)
    out, loss, grad = value_and_grad(uld_loss, student, teacher, alignment, temperature=temperature)
    _, ref_loss, ref_grad = value_and_grad(ref_uld, student, teacher, alignment, temperature)
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")
    assert out.groups == len(GROUPS) and out.matched is None
    close(out.unmatched, ref_loss)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0)])
def test_hybrid_equals_reference_value_and_gradient(temperature, weights):
    alignment, vocab_map = hand_alignment(2), partial_map()
    student, teacher = logits(4)
    matched_weight, unmatched_weight = weights
    options = dict(temperature=temperature, matched_weight=matched_weight, unmatched_weight=unmatched_weight)
    out, loss, grad = value_and_grad(hybrid_loss, student, teacher, alignment, vocab_map, **options)
    _, ref_loss, ref_grad = value_and_grad(ref_hybrid, student, teacher, alignment, vocab_map, temperature, *weights)
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")
    _, ref_matched, _ = value_and_grad(ref_hybrid, student, teacher, alignment, vocab_map, temperature, 1.0, 0.0)
    close(out.matched, ref_matched, what="matched part")
    close(matched_weight * out.matched + unmatched_weight * out.unmatched, ref_loss, what="parts")


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_hybrid_with_other_divergences_equals_reference(divergence):
    alignment, vocab_map = hand_alignment(17), partial_map(18)
    student, teacher = logits(19)
    _, loss, grad = value_and_grad(hybrid_loss, student, teacher, alignment, vocab_map, divergence=divergence)
    _, ref_loss, ref_grad = value_and_grad(
        ref_hybrid, student, teacher, alignment, vocab_map, 1.0, 1.0, 1.0, divergence
    )
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")


def test_bfloat16_logits_are_computed_in_float32():
    alignment, vocab_map = hand_alignment(20), partial_map(21)
    student, teacher = logits(22, torch.bfloat16)
    out, loss, grad = value_and_grad(hybrid_loss, student, teacher, alignment, vocab_map, temperature=2.0)
    _, ref_loss, _ = value_and_grad(ref_hybrid, student.double(), teacher.double(), alignment, vocab_map, 2.0)
    assert grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    close(loss.double(), ref_loss, rtol=1e-5, what="value from the same bf16 logits")


def test_float32_logits_match_the_float64_reference():
    alignment, vocab_map = hand_alignment(5), partial_map(6)
    student, teacher = logits(7)
    for fn, ref, extra in ((uld_loss, ref_uld, ()), (hybrid_loss, ref_hybrid, (vocab_map,))):
        _, loss, grad = value_and_grad(fn, student.float(), teacher.float(), alignment, *extra)
        _, ref_loss, ref_grad = value_and_grad(ref, student, teacher, alignment, *extra)
        close(loss.double(), ref_loss, rtol=1e-5, what=fn.__name__)
        close(grad.double(), ref_grad, rtol=1e-5, what=fn.__name__)


@pytest.mark.parametrize("fn", ["uld", "hybrid"])
def test_chunked_equals_unchunked(fn):
    """Memory is bounded by the chunk; the value and gradient do not depend on it."""
    alignment, vocab_map = hand_alignment(8), partial_map(9)
    student, teacher = logits(10, torch.float32)

    def call(student_logits, **options):
        if fn == "uld":
            return uld_loss(student_logits, teacher, alignment, **options)
        return hybrid_loss(student_logits, teacher, alignment, vocab_map, **options)

    _, whole, whole_grad = value_and_grad(call, student, chunk_groups=len(GROUPS))
    for chunk in (1, 2, 4):
        _, loss, grad = value_and_grad(call, student, chunk_groups=chunk)
        close(loss, whole, rtol=1e-6, what=f"chunk {chunk}")
        close(grad, whole_grad, rtol=1e-6, what=f"chunk {chunk} gradient")


def test_large_vocabularies_never_meet_in_one_tensor():
    """64 groups of 50k x 60k vocabularies: a (groups, V_t, V_s) tensor would hold 1.9e11 entries."""
    g = torch.Generator().manual_seed(0)
    groups = [(0, k, k, k, k) for k in range(1, 65)]
    ids_s, ids_t = torch.randint(0, 50_000, (1, 66), generator=g), torch.randint(0, 60_000, (1, 66), generator=g)
    rows, sf, sl, tf, tl = (list(column) for column in zip(*groups))
    alignment = Alignment(side(ids_s, sf, sl), side(ids_t, tf, tl), torch.tensor(rows), [""])
    student = torch.randn(1, 66, 50_000, generator=g).requires_grad_()
    teacher = torch.randn(1, 66, 60_000, generator=g)
    out = uld_loss(student, teacher, alignment, chunk_groups=16)
    out.loss.backward()
    assert torch.isfinite(out.loss) and student.grad.abs().sum() > 0
    # The rows that predict no group's token get no gradient.
    assert student.grad[0, 64:].abs().sum() == 0 and student.grad[0, :64].abs().sum(-1).min() > 0


def test_mean_reduction_and_no_grad_evaluation():
    alignment, vocab_map = hand_alignment(11), partial_map(12)
    student, teacher = logits(13)
    total = hybrid_loss(student, teacher, alignment, vocab_map).loss
    mean = hybrid_loss(student, teacher, alignment, vocab_map, reduction="mean").loss
    close(mean, total / len(GROUPS))
    with torch.no_grad():
        evaluated = uld_loss(student.clone().requires_grad_(), teacher, alignment).loss
    close(evaluated, uld_loss(student, teacher, alignment).loss)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(student, teacher, alignment, reduction="avg")


def test_shifted_logits_and_a_bad_width_are_told_apart():
    alignment = hand_alignment(14)
    student, teacher = logits(15)
    # (B, T - 1, V): the row before a group's first token is the same index either way.
    full = uld_loss(student, teacher, alignment).loss
    close(uld_loss(student[:, :-1], teacher[:, :-1], alignment).loss, full)
    with pytest.raises(ValueError, match="positions"):
        uld_loss(student[:, :3], teacher, alignment)
    with pytest.raises(ValueError, match="vocabulary map"):
        hybrid_loss(student, teacher, alignment, VocabMap(torch.tensor([V_T + 5]), torch.tensor([0])))


# ---------------------------------------------------------------- same tokenizer on both sides


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py")]
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("bpe300"))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_is_plain_kd_when_the_tokenizers_are_the_same(tokenizer, divergence, temperature):
    text = (stdlib_root() / "keyword.py").read_text(encoding="utf-8")
    rows = [text[:300], text[300:500], text[500:900]]
    alignment = Aligner(tokenizer, tokenizer, student_seq_len=64, teacher_seq_len=64)(rows)
    vocab_map = build_vocab_map(tokenizer, tokenizer)
    assert torch.equal(vocab_map.teacher_ids, torch.arange(len(tokenizer)))
    assert torch.equal(vocab_map.student_ids, vocab_map.teacher_ids)
    assert torch.equal(alignment.student.first, alignment.student.last)  # every group is 1:1
    assert torch.equal(alignment.student.first, alignment.teacher.first)
    batch, width = alignment.student.input_ids.shape
    g = torch.Generator().manual_seed(16)
    student = 2 * torch.randn(batch, width, len(tokenizer), generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(batch, width, len(tokenizer), generator=g, dtype=torch.float64)
    _, loss, grad = value_and_grad(
        hybrid_loss, student, teacher, alignment, vocab_map, temperature=temperature, divergence=divergence
    )
    # The plain divergence of losses/logits.py on the rows that predict an aligned token.
    mask = torch.zeros(batch, width, dtype=torch.bool)
    mask[alignment.batch, alignment.student.first - 1] = True
    plain = forward_kl if divergence == "forward_kl" else generalized_jsd
    _, ref_loss, ref_grad = value_and_grad(plain, student, teacher, temperature=temperature, mask=mask)
    assert mask.sum() == alignment.num_groups > 100
    close(loss, ref_loss, rtol=1e-9, what="value")
    close(grad, ref_grad, rtol=1e-9, what="gradient")
    assert not math.isnan(float(loss))


# ---------------------------------------------------------------- a top-k teacher (the cross-tokenizer cache)


def topk_teacher(teacher: torch.Tensor, ids: torch.Tensor, k: int, temperature: float = 1.0) -> TopkTeacher:
    """A :class:`TopkTeacher` of dense teacher logits ``(B, T, V)`` whose row t predicts ``ids[:, t + 1]``."""
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    values, top = log_p.topk(k, dim=-1)
    following = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # the last row predicts nothing the groups read
    next_logprobs = log_p.gather(-1, following[..., None])[..., 0]
    return TopkTeacher(top, values, next_logprobs, temperature, teacher.shape[-1])


def ref_topk(student, teacher, alignment, vocab_map, k, temperature=1.0, hybrid=True):
    """The top-k losses by hand: the teacher's merged entries outside its k cached ids (at each group's
    first row) are unknown: zeros for ULD; for the hybrid, a shared id is a bucket only where cached."""
    t_ids, s_ids = vocab_map.teacher_ids.tolist(), vocab_map.student_ids.tolist()
    t_other = [i for i in range(teacher.shape[-1]) if i not in set(t_ids)]
    s_other = [i for i in range(student.shape[-1]) if i not in set(s_ids)]
    total = torch.zeros((), dtype=torch.float64)
    for g, (s, t) in enumerate(merged_pairs(student, teacher, alignment, temperature)):
        b, first = int(alignment.batch[g]), int(alignment.teacher.first[g])
        cached = set(torch.log_softmax(teacher[b, first - 1] / temperature, -1).topk(k).indices.tolist())
        t = torch.stack([t[i] if i in cached else torch.zeros((), dtype=t.dtype) for i in range(len(t))])
        if not hybrid:
            total = total + ref_sorted_l1(t, s)
            continue
        pairs = [(ti, si) for ti, si in zip(t_ids, s_ids) if ti in cached]
        t_buckets = torch.stack([t[ti] for ti, _ in pairs]) if pairs else torch.zeros(0, dtype=t.dtype)
        s_buckets = torch.stack([s[si] for _, si in pairs]) if pairs else torch.zeros(0, dtype=s.dtype)
        t_buckets = torch.cat([t_buckets, (1 - t_buckets.sum()).reshape(1)])
        s_buckets = torch.cat([s_buckets, (1 - s_buckets.sum()).reshape(1)])
        total = total + ref_kl(t_buckets, s_buckets) + ref_sorted_l1(t[t_other], s[s_other])
    return temperature**2 * total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_topk_teacher_with_every_id_cached_is_the_dense_teacher(temperature):
    alignment, vocab_map = hand_alignment(23), partial_map(24)
    student, teacher = logits(25)
    cached = topk_teacher(teacher, alignment.teacher.input_ids, V_T, temperature)
    for fn, extra in ((uld_loss, ()), (hybrid_loss, (vocab_map,))):
        _, loss, grad = value_and_grad(fn, student, cached, alignment, *extra, temperature=temperature)
        _, dense, dense_grad = value_and_grad(fn, student, teacher, alignment, *extra, temperature=temperature)
        close(loss, dense, rtol=1e-9, what=fn.__name__)
        close(grad, dense_grad, rtol=1e-9, what=fn.__name__)


@pytest.mark.parametrize("hybrid", [False, True])
def test_a_topk_teacher_equals_the_reference_with_the_tail_unknown(hybrid):
    alignment, vocab_map = hand_alignment(26), partial_map(27, shared=20)
    student, teacher = logits(28)
    k = 6
    cached = topk_teacher(teacher, alignment.teacher.input_ids, k)
    fn, extra = (hybrid_loss, (vocab_map,)) if hybrid else (uld_loss, ())
    _, loss, grad = value_and_grad(fn, student, cached, alignment, *extra)
    _, ref_loss, ref_grad = value_and_grad(ref_topk, student, teacher, alignment, vocab_map, k, hybrid=hybrid)
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")
    # Fewer cached ids is a different loss: the test can tell the tail apart.
    _, dense, _ = value_and_grad(fn, student, teacher, alignment, *extra)
    assert abs(float(loss - dense)) > 1e-3 * float(dense)


def test_a_topk_teacher_of_another_temperature_is_refused():
    alignment = hand_alignment(29)
    student, teacher = logits(30)
    cached = topk_teacher(teacher, alignment.teacher.input_ids, 4, temperature=2.0)
    with pytest.raises(UserError, match="written at temperature 2 but distill.temperature is 1"):
        uld_loss(student, cached, alignment, temperature=1.0)


# ---------------------------------------------------------------- the span buckets (hybrid_loss buckets="span")


def ref_span_buckets(log_p, cont, first, drop, ids, other):
    """One side's span buckets by hand, float64: [p(y) for shared y (a: p(a)(1 - c)), rest, p(a) c];
    the shared ids at bucket indices ``drop`` are moved into the rest."""
    c = cont.exp()
    span = log_p.exp()[first] * c
    p = torch.where(torch.arange(len(log_p)) == first, log_p.exp() * (1 - c), log_p.exp())
    shared = [p[i] for i in ids.tolist()]
    rest = sum((p[i] for i in other), torch.zeros((), dtype=torch.float64))
    for k in sorted(set(drop)):
        rest = rest + shared[k]
        shared[k] = torch.zeros((), dtype=torch.float64)
    return torch.stack([*shared, rest, span]), p[other]


def ref_span_hybrid(student, teacher, alignment, vocab_map, temperature=1.0, matched_weight=1.0, unmatched_weight=1.0):
    t_ids, s_ids = vocab_map.teacher_ids, vocab_map.student_ids
    t_other = [i for i in range(teacher.shape[-1]) if i not in set(t_ids.tolist())]
    s_other = [i for i in range(student.shape[-1]) if i not in set(s_ids.tolist())]
    total = torch.zeros((), dtype=torch.float64)
    for g in range(alignment.num_groups):
        b = int(alignment.batch[g])
        sides = []
        for logits_, side_ in ((student, alignment.student), (teacher, alignment.teacher)):
            first, last, ids = int(side_.first[g]), int(side_.last[g]), side_.input_ids[b]
            log_p = torch.log_softmax(logits_[b, first - 1].double() / temperature, -1)
            cont = sum(
                (
                    torch.log_softmax(logits_[b, k - 1].double() / temperature, -1)[ids[k]]
                    for k in range(first + 1, last + 1)
                ),
                torch.zeros((), dtype=torch.float64),
            )
            sides.append((log_p, cont, int(ids[first])))
        (s_log_p, s_cont, s_first), (t_log_p, t_cont, t_first) = sides
        drop = [s_ids.tolist().index(s_first)] if s_first in s_ids.tolist() else []
        drop += [t_ids.tolist().index(t_first)] if t_first in t_ids.tolist() else []
        s_buckets, s_rest = ref_span_buckets(s_log_p, s_cont, s_first, drop, s_ids, s_other)
        t_buckets, t_rest = ref_span_buckets(t_log_p, t_cont, t_first, drop, t_ids, t_other)
        assert float(s_buckets.detach().sum()) == pytest.approx(1.0) == float(t_buckets.detach().sum())
        total = total + matched_weight * ref_kl(t_buckets, s_buckets) + unmatched_weight * ref_sorted_l1(t_rest, s_rest)
    return temperature**2 * total


def shared_first_tokens(alignment: Alignment, vocab_map: VocabMap) -> Alignment:
    """The hand alignment with some groups' first tokens set to shared ids: a pair of each other's (the
    same text) in group 0, a student first token shared but another teacher token in group 3."""
    s_ids, t_ids = alignment.student.input_ids.clone(), alignment.teacher.input_ids.clone()
    s_ids[0, 1], t_ids[0, 1] = vocab_map.student_ids[0], vocab_map.teacher_ids[0]
    s_ids[0, 5], t_ids[0, 5] = vocab_map.student_ids[1], vocab_map.teacher_ids[2]
    student = AlignedSide(s_ids, *list(vars(alignment.student).values())[1:])
    teacher = AlignedSide(t_ids, *list(vars(alignment.teacher).values())[1:])
    return Alignment(student, teacher, alignment.batch, alignment.texts)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.0)])
def test_span_hybrid_equals_reference_value_and_gradient(temperature, weights):
    vocab_map = partial_map(30)
    alignment = shared_first_tokens(hand_alignment(31), vocab_map)
    student, teacher = logits(32)
    options = dict(temperature=temperature, matched_weight=weights[0], unmatched_weight=weights[1], buckets="span")
    out, loss, grad = value_and_grad(hybrid_loss, student, teacher, alignment, vocab_map, **options)
    _, ref_loss, ref_grad = value_and_grad(
        ref_span_hybrid, student, teacher, alignment, vocab_map, temperature, *weights
    )
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")
    chunked = hybrid_loss(student, teacher, alignment, vocab_map, chunk_groups=2, **options)
    close(chunked.loss, ref_loss, what="chunked")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_hybrid_is_plain_kd_when_the_tokenizers_are_the_same(tokenizer, temperature):
    text = (stdlib_root() / "keyword.py").read_text(encoding="utf-8")
    alignment = Aligner(tokenizer, tokenizer, student_seq_len=64, teacher_seq_len=64)([text[:300], text[300:700]])
    vocab_map = build_vocab_map(tokenizer, tokenizer)
    batch, width = alignment.student.input_ids.shape
    g = torch.Generator().manual_seed(33)
    student = 2 * torch.randn(batch, width, len(tokenizer), generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(batch, width, len(tokenizer), generator=g, dtype=torch.float64)
    options = dict(temperature=temperature, buckets="span")
    _, loss, grad = value_and_grad(hybrid_loss, student, teacher, alignment, vocab_map, **options)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    mask[alignment.batch, alignment.student.first - 1] = True
    _, ref_loss, ref_grad = value_and_grad(forward_kl, student, teacher, temperature=temperature, mask=mask)
    close(loss, ref_loss, what="value")
    close(grad, ref_grad, what="gradient")
    assert torch.isfinite(grad).all()


def test_span_buckets_do_not_punish_a_student_that_agrees_on_a_nested_span():
    """Student 'ab' (one token, unshared), teacher 'a' 'b' (a shared): both models sure of the text 'ab'.
    GOLD's merged buckets put the teacher's span mass on 'a' and ask the student to move its mass off its
    own token; the span buckets compare the span with the span."""
    v_s, v_t = 4, 3  # student: a, b, c, ab; teacher: a, b, c
    vocab_map = VocabMap(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    student_ids, teacher_ids = torch.tensor([[2, 3]]), torch.tensor([[2, 0, 1]])
    alignment = Alignment(side(student_ids, [1], [1]), side(teacher_ids, [1], [2]), torch.tensor([0]), [""])
    sure = 12.0
    student = torch.zeros(1, 2, v_s, dtype=torch.float64)
    student[0, 0, 3] = sure  # p('ab') ~ 1
    teacher = torch.zeros(1, 3, v_t, dtype=torch.float64)
    teacher[0, 0, 0] = teacher[0, 1, 1] = sure  # p('a') ~ 1, p('b' | 'a') ~ 1
    merged = hybrid_loss(student, teacher, alignment, vocab_map).loss
    span = hybrid_loss(student, teacher, alignment, vocab_map, buckets="span").loss
    assert float(merged) > 5.0  # the KL to a teacher that puts ~all the span's mass on the student's 'a'
    assert float(span) < 1e-3
