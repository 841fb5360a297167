"""What the loop measures about itself (train/diagnostics.py), against plain hand computations."""

from __future__ import annotations

import math

import torch
from torch import nn

from distilflow.losses.fused import HiddenStates
from distilflow.losses.objective import Outputs, Targets
from distilflow.losses.sparse import SparseTeacher
from distilflow.train.diagnostics import SpikeDetector, StepWatch, cosine_sum, top1_matches


def test_top1_agreement_counts_masked_rows_of_dense_sparse_and_hidden_signals():
    g = torch.Generator().manual_seed(0)
    student_logits = torch.randn(3, 5, 11, generator=g)  # (B, T, V)
    teacher_logits = torch.randn(3, 5, 11, generator=g)
    teacher_logits[0] = student_logits[0] * 2  # row 0: every token agrees
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False  # padding is not counted
    expected_hits = sum(
        int(student_logits[b, t].argmax() == teacher_logits[b, t].argmax())
        for b in range(3)
        for t in range(5)
        if mask[b, t]
    )
    assert top1_matches(student_logits, teacher_logits, mask) == (expected_hits, 13)
    assert expected_hits >= 5  # row 0 at least

    # A cache's top-k ids (descending order not assumed) name the same top-1 as the dense logits.
    values, ids = teacher_logits.log_softmax(-1).topk(4, dim=-1)
    flipped = SparseTeacher(ids.flip(-1), values.flip(-1), "topk", 1.0)
    assert top1_matches(student_logits, flipped, mask) == (expected_hits, 13)

    # The fused loss's hidden states: logits made from the lm_head give the same ids.
    hidden = torch.randn(3, 5, 7, generator=g)
    weight = torch.randn(13, 7, generator=g)  # a table of 13 rows, the first 11 scored
    states = HiddenStates(hidden, weight, None, vocab_size=11)
    dense = hidden @ weight[:11].T
    expected = int(((dense.argmax(-1) == teacher_logits.argmax(-1)) & mask).sum())
    assert top1_matches(states, teacher_logits, mask) == (expected, 13)


def test_cosine_per_sample_and_per_real_token():
    g = torch.Generator().manual_seed(1)
    student_feature = torch.randn(4, 3, 2, generator=g)  # (B, C, L): flattened per sample
    teacher_feature = torch.randn(4, 3, 2, generator=g)
    total, rows = cosine_sum(student_feature, teacher_feature, per_token=False)
    by_hand = 0.0
    for b in range(4):
        a, c = student_feature[b].flatten(), teacher_feature[b].flatten()
        by_hand += float(a @ c) / math.sqrt(float(a @ a) * float(c @ c))
    assert rows == 4 and math.isclose(total, by_hand, rel_tol=1e-5, abs_tol=1e-6)

    tokens_student, tokens_teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    total, rows = cosine_sum(tokens_student, tokens_teacher, per_token=True, mask=mask)
    by_hand = sum(
        float(torch.nn.functional.cosine_similarity(tokens_student[b, t], tokens_teacher[b, t], dim=0))
        for b, t in [(0, 0), (0, 1), (1, 0)]
    )
    assert rows == 3 and math.isclose(total, by_hand, rel_tol=1e-5, abs_tol=1e-6)


def test_spike_detector_flags_the_step_above_factor_times_the_running_median():
    detector = SpikeDetector(factor=3.0, window=10)
    values = [1.0, 0.9, 1.1, 1.0, 0.95, 1.05, 4.0, 1.0, 2.5]
    flagged = [(i, detector.update("kd", v)) for i, v in enumerate(values)]
    # The first 5 steps only fill the window; step 6's 4.0 is above 3 x median(1.0, 0.9, 1.1, 1.0, 0.95, 1.05).
    assert [i for i, m in flagged if m is not None] == [6]
    assert flagged[6][1] == 1.0
    # A new phase starts afresh: its first steps are never judged against the old level.
    assert detector.update("joint", 40.0) is None
    # Not finite: skipped, not part of the level.
    assert detector.update("joint", math.nan) is None and list(detector.history) == [40.0]

    # State round trip: a resumed detector flags the same next step.
    resumed = SpikeDetector(factor=3.0, window=10)
    original = SpikeDetector(factor=3.0, window=10)
    for v in values[:6]:
        original.update("kd", v)
    resumed.load_state_dict(original.state_dict())
    assert resumed.update("kd", 4.0) == original.update("kd", 4.0) == 1.0


def test_spike_median_is_floored_near_zero():
    # A loss falling from 1 to ~0.001: batch-to-batch swings of 3x there are noise, not spikes.
    detector = SpikeDetector(factor=3.0, window=10)
    for v in [1.0] * 5 + [0.001] * 10:
        detector.update("ce", v)
    assert detector.update("ce", 0.004) is None  # 4x the median, under 3 x (5% of 1.0)
    assert detector.update("ce", 0.2) == 0.05  # above 3 x the floored median


def test_watch_averages_over_micro_batches_and_skips_unlogged_steps():
    heads = nn.ModuleList([nn.Identity()])
    watch = StepWatch(pair_names=["feature_cos/a->b"], heads=heads)
    student_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    teacher_logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # agrees on row 0 only
    feature = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets = Targets(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool))
    watch.begin(False)
    watch.observe(Outputs(student_logits, [feature]), Outputs(teacher_logits, [feature]), targets)
    assert watch.sums() == {}
    watch.begin(True)
    watch.observe(Outputs(student_logits, [feature]), Outputs(teacher_logits, [feature]), targets)
    # second micro-batch: agrees on both rows, features orthogonal (cos 0)
    watch.observe(
        Outputs(torch.eye(2), [torch.eye(2)]),
        Outputs(torch.eye(2), [torch.eye(2).flip(0)]),
        Targets(torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)),
    )
    totals = {"loss": 1.0, **watch.sums()}
    row = watch.row(totals)
    assert totals == {"loss": 1.0}  # the sums are taken out of the logged row
    assert math.isclose(row["agreement"], 3 / 5)
    assert math.isclose(row["feature_cos/a->b"], 3 / 5, rel_tol=1e-6)  # cos 1, 1, 1 then 0, 0
