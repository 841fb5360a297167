"""teachers/multi.py: several TeacherSignals as one, against numpy mixtures computed by hand; routing by
the targets' route, labels only for the label rules, features of the feature teacher alone, autocast
for live members only, the full check on the first micro-batch only."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX, Outputs, Targets
from distilflow.losses.sparse import SparseTeacher
from distilflow.teachers import combine
from distilflow.teachers.multi import Member, MultiTeacher
from distilflow.teachers.weighting import Combination

TEMPERATURE = 2.0


def np_softmax(row, temperature=1.0):
    z = np.asarray(row, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


class Fixed:
    """A TeacherSignals that returns fixed logits (and a feature) for the rows of a batch; records its calls."""

    def __init__(self, logits: torch.Tensor, *, autocast: bool, feature: float) -> None:
        self.logits, self.autocast, self.feature = logits, autocast, feature
        self.calls: list[tuple[bool, bool]] = []  # (features asked, called under the test's autocast)

    def __call__(self, batch, *, features: bool) -> Outputs:
        self.calls.append((features, ACTIVE["autocast"]))
        rows = self.logits[batch["row"]]
        return Outputs(rows, [torch.full((len(rows), 3), self.feature)] if features else [])


ACTIVE = {"autocast": False}


class Stored:
    """A cache reader stand-in: the same stored signal for every batch, outside autocast."""

    autocast = False

    def __init__(self, signal) -> None:
        self.signal = signal

    def __call__(self, batch, *, features: bool) -> Outputs:
        return Outputs(self.signal)


@contextmanager
def fake_autocast():
    ACTIVE["autocast"] = True
    try:
        yield
    finally:
        ACTIVE["autocast"] = False


def teachers(seed: int = 0, rows: int = 6, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [2.0 * torch.randn(rows, classes, generator=g, dtype=torch.float64) for _ in range(2)]


def multi(logits, combination, *, labels, route=None, feature_teacher=None):
    members = [
        Member("live", Fixed(logits[0], autocast=True, feature=1.0)),
        Member("cached", Fixed(logits[1], autocast=False, feature=2.0)),
    ]

    def targets(batch):
        rows = batch["row"]
        return Targets(
            labels=labels[rows],
            kd_mask=torch.ones(len(rows), dtype=torch.bool),
            route=None if route is None else route[rows],
        )

    teacher = MultiTeacher(
        members,
        combination=combination,
        temperature=TEMPERATURE,
        vocab_size=logits[0].shape[-1],
        targets=targets,
        feature_teacher=feature_teacher,
        autocast=fake_autocast,
    )
    return teacher, members


def hand_weights(rule, logits, labels, row, tau=1.0):
    """The weights of the two teachers at one sample, from numpy."""
    p = [np_softmax(z[row].numpy(), 1.0) for z in logits]
    if rule == "mean":
        return np.array([0.5, 0.5])
    entropy = np.array([-(q * np.log(q)).sum() for q in p])
    if rule == "entropy" or labels[row] == IGNORE_INDEX:
        score = -entropy / tau
    else:
        score = np.array([np.log(q[labels[row]]) for q in p]) / tau  # -NLL / tau
    e = np.exp(score - score.max())
    return e / e.sum()


@pytest.mark.parametrize("rule", ["mean", "entropy", "correctness"])
def test_the_combined_distribution_is_the_hand_mixture_of_tempered_teachers(rule):
    logits = teachers()
    labels = torch.tensor([0, 3, IGNORE_INDEX, 1, 4, IGNORE_INDEX])
    teacher, _ = multi(logits, Combination(rule), labels=labels)
    rows = torch.tensor([4, 0, 2, 5])
    got = teacher({"row": rows}, features=False).logits.log_probs_at().exp()
    for i, row in enumerate(rows.tolist()):
        w = hand_weights(rule, logits, labels, row)
        want = sum(w[k] * np_softmax(logits[k][row].numpy(), TEMPERATURE) for k in range(2))
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-10, atol=1e-12)


def test_routed_rows_take_their_teacher_alone_and_the_rest_the_rule():
    logits = teachers(1)
    labels = torch.full((6,), IGNORE_INDEX)
    route = torch.tensor([1, -1, 0, 1, -1, 0])
    teacher, _ = multi(logits, Combination("weights", weights=(1.0, 3.0)), labels=labels, route=route)
    rows = torch.arange(6)
    got = teacher({"row": rows}, features=False).logits.log_probs_at().exp().numpy()
    for row in range(6):
        p = [np_softmax(z[row].numpy(), TEMPERATURE) for z in logits]
        want = p[int(route[row])] if route[row] >= 0 else 0.25 * p[0] + 0.75 * p[1]
        np.testing.assert_allclose(got[row], want, rtol=1e-10, atol=1e-12)


def test_labels_reach_only_the_label_rules(monkeypatch):
    seen = []
    real = combine.combine_teachers

    def spy(signals, **options):
        seen.append(options["labels"])
        return real(signals, **options)

    monkeypatch.setattr(combine, "combine_teachers", spy)
    logits, labels = teachers(), torch.tensor([0, 1, 2, 3, 4, 0])
    for rule in ("mean", "entropy", "correctness", "camkd"):
        multi(logits, Combination(rule), labels=labels)[0]({"row": torch.arange(3)}, features=False)
    assert [s is None for s in seen] == [True, True, False, False]
    torch.testing.assert_close(seen[2], labels[:3])


def test_live_members_run_under_autocast_and_cached_ones_never():
    teacher, members = multi(teachers(), Combination("mean"), labels=torch.zeros(6, dtype=torch.long))
    assert teacher.autocast is False  # the loop must not wrap the whole call
    teacher({"row": torch.arange(2)}, features=False)
    assert members[0].signals.calls == [(False, True)] and members[1].signals.calls == [(False, False)]


def test_features_come_from_the_feature_teacher_only():
    teacher, members = multi(
        teachers(), Combination("mean"), labels=torch.zeros(6, dtype=torch.long), feature_teacher=1
    )
    out = teacher({"row": torch.arange(2)}, features=True)
    assert [c[0] for c in members[0].signals.calls] == [False] and [c[0] for c in members[1].signals.calls] == [True]
    assert len(out.features) == 1 and float(out.features[0][0, 0]) == 2.0
    assert teacher({"row": torch.arange(2)}, features=False).features == []


def test_the_first_micro_batch_is_checked_in_full_and_the_rest_trusted(monkeypatch):
    calls = []
    real = combine.check_signals
    monkeypatch.setattr(combine, "check_signals", lambda *a, **k: calls.append(1) or real(*a, **k))
    teacher, _ = multi(teachers(), Combination("mean"), labels=torch.zeros(6, dtype=torch.long))
    for _ in range(3):
        teacher({"row": torch.arange(2)}, features=False)
    assert calls == [1]


def test_a_teacher_of_another_label_space_is_one_line():
    logits = teachers()
    logits[1] = logits[1][:, :4]
    teacher, _ = multi(logits, Combination("mean"), labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(UserError, match="teacher 'cached' scores 4 classes/vocabulary ids but the student 5"):
        teacher({"row": torch.arange(2)}, features=False)


def test_top_k_members_combine_into_one_top_k_teacher():
    """Two caches holding every id (K = V): the union is a SparseTeacher equal to the dense mixture."""
    logits = teachers(2)
    members = []
    for i, z in enumerate(logits):
        log_p = torch.log_softmax(z / TEMPERATURE, -1)
        values, ids = log_p.sort(-1, descending=True)
        members.append(Member(f"c{i}", Stored(SparseTeacher(ids, values, "topk", TEMPERATURE))))
    teacher = MultiTeacher(
        members,
        combination=Combination("mean"),
        temperature=TEMPERATURE,
        vocab_size=5,
        targets=lambda batch: Targets(labels=torch.zeros(6, dtype=torch.long), kd_mask=torch.ones(6, dtype=torch.bool)),
    )
    out = teacher({"row": torch.arange(6)}, features=False).logits
    assert isinstance(out, SparseTeacher)
    dense = torch.full((6, 5), -math.inf, dtype=out.values.dtype).scatter(-1, out.ids, out.values).exp()
    want = 0.5 * (torch.softmax(logits[0] / TEMPERATURE, -1) + torch.softmax(logits[1] / TEMPERATURE, -1))
    torch.testing.assert_close(dense, want.to(dense.dtype), rtol=1e-6, atol=1e-9)
