"""Teacher entropy and label NLL (losses/confidence.py) against hand computations and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distilflow.losses.confidence import (
    dense_confidence,
    expand_topk,
    signal_confidence,
    topk_confidence,
)
from distilflow.losses.fused import HiddenStates
from distilflow.losses.sparse import SparseTeacher

IGNORE = -100


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return 2.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def topk_of(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    values, ids = F.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)
    return SparseTeacher(ids, values, "topk", temperature)


def test_dense_entropy_and_nll_by_hand():
    logits = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]], dtype=torch.float64).log()
    out = dense_confidence(logits, labels=torch.tensor([2, IGNORE]))
    h0 = 0.5 * math.log(2) + 0.5 * math.log(4)
    h1 = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))
    np.testing.assert_allclose(out.entropy.numpy(), [h0, h1], rtol=1e-12)
    np.testing.assert_allclose(out.label_nll.numpy(), [math.log(4), 0.0], rtol=1e-12)
    assert out.labelled.tolist() == [True, False]
    np.testing.assert_allclose(out.nll_or_entropy().numpy(), [math.log(4), h1], rtol=1e-12)
    # At T = 2: softmax(z / 2) of the first row is sqrt(p) renormalised.
    root = np.sqrt([0.5, 0.25, 0.25])
    root = root / root.sum()
    at_two = dense_confidence(logits[:1], temperature=2.0)
    assert float(at_two.entropy) == pytest.approx(float(-(root * np.log(root)).sum()), rel=1e-12)


def test_minus_inf_logits_count_as_zero_probability():
    logits = torch.tensor([[0.0, 0.0, -math.inf]])
    out = dense_confidence(logits, labels=torch.tensor([2]))
    assert float(out.entropy) == pytest.approx(math.log(2), rel=1e-6)
    assert math.isfinite(float(out.label_nll))  # capped, not inf


@pytest.mark.parametrize("at", [1.0, 2.0, 0.5])
def test_topk_with_k_equal_to_v_is_the_dense_confidence(at):
    logits = seeded(0, 3, 4, 7)
    labels = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[0, 0] = IGNORE
    dense = dense_confidence(logits, labels=labels, temperature=at)
    cached = topk_confidence(topk_of(logits, 7, 2.0), vocab_size=7, labels=labels, temperature=at)
    torch.testing.assert_close(cached.entropy, dense.entropy, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cached.label_nll, dense.label_nll, rtol=1e-9, atol=1e-12)


def test_topk_tail_is_spread_uniformly_by_hand():
    """V = 5, K = 2 at T = 1: cached (0.5, 0.3), tail 0.2 over 3 ids. Re-tempered to T' = 1/2 (alpha = 2):
    unnormalised (0.25, 0.09) and 3 * (0.2 / 3) ** 2 for the tail."""
    cache = SparseTeacher(torch.tensor([[3, 0]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64).log(), "topk", 1.0)
    same = topk_confidence(cache, vocab_size=5, labels=torch.tensor([1]))
    p = [0.5, 0.3] + [0.2 / 3] * 3
    assert float(same.entropy) == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-12)
    assert float(same.label_nll) == pytest.approx(-math.log(0.2 / 3), rel=1e-12)  # label 1 is in the tail
    sharp = topk_confidence(cache, vocab_size=5, labels=torch.tensor([0]), temperature=0.5)
    r = [x * x for x in p]
    q = [x / sum(r) for x in r]
    assert float(sharp.entropy) == pytest.approx(-sum(x * math.log(x) for x in q), rel=1e-12)
    assert float(sharp.label_nll) == pytest.approx(-math.log(q[1]), rel=1e-12)  # id 0 holds 0.3 -> q[1]
    expanded = expand_topk(cache, 5).exp()
    np.testing.assert_allclose(expanded.numpy(), [[0.3, 0.2 / 3, 0.2 / 3, 0.5, 0.2 / 3]], rtol=1e-12)


def test_expand_topk_ignores_padding_slots_that_name_a_cached_id():
    cache = SparseTeacher(
        torch.tensor([[2, 2, 4]]), torch.tensor([[math.log(0.6), -math.inf, math.log(0.2)]]), "topk", 1.0
    )
    np.testing.assert_allclose(expand_topk(cache, 5).exp().numpy(), [[0.2 / 3, 0.2 / 3, 0.6, 0.2 / 3, 0.2]], rtol=1e-6)


def test_signal_confidence_in_chunks_equals_the_whole_for_logits_and_hidden_states():
    hidden, weight = seeded(2, 2, 5, 3), seeded(3, 11, 3)
    logits = hidden @ weight.T
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    labels[1, 3:] = IGNORE
    whole = dense_confidence(logits, labels=labels, temperature=1.5)
    for signal in (logits, HiddenStates(hidden, weight)):
        chunked = signal_confidence(signal, labels=labels, temperature=1.5, chunk_rows=2)
        torch.testing.assert_close(chunked.entropy, whole.entropy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(chunked.label_nll, whole.label_nll, rtol=1e-12, atol=1e-12)
        assert torch.equal(chunked.labelled, whole.labelled)
