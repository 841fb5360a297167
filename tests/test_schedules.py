"""Schedules against hand-computed values: KD weight, learning rate, phase plan."""

from __future__ import annotations

import pytest

from distilflow.config import DEFAULT_PHASES, KDWeightConfig, PhaseConfig
from distilflow.errors import UserError
from distilflow.schedules import Phase, article_kd_weight, kd_weight, lr_at, phase_at, phase_boundaries

# ---------------------------------------------------------------- KD weight


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (1, 0.07),
        (5, 0.35),  # 0.7 * 5 / 10
        (9, 0.63),
        (10, 0.7),  # end of warm-up: decay_rate ** 0
        (11, 0.63),  # 0.7 * 0.9
        (12, 0.567),  # 0.7 * 0.81
        (15, 0.413343),  # 0.7 * 0.59049
    ],
)
def test_article_kd_weight_hand_values(step, expected):
    got = article_kd_weight(step, base_weight=0.7, decay_rate=0.9, warmup_steps=10)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_article_kd_weight_without_warmup_or_decay():
    assert article_kd_weight(0, base_weight=0.7, decay_rate=1.0, warmup_steps=0) == 0.7
    assert article_kd_weight(5000, base_weight=0.7, decay_rate=1.0, warmup_steps=0) == 0.7
    assert article_kd_weight(2, base_weight=0.5, decay_rate=0.5, warmup_steps=0) == 0.125


def kd(schedule="article", base=0.7, warmup=0, decay=1.0, floor=0.0):
    return KDWeightConfig(schedule=schedule, base_weight=base, warmup_steps=warmup, decay_rate=decay, min_weight=floor)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (1, 0.175), (2, 0.35), (4, 0.7), (50, 0.7), (99, 0.7)])
def test_kd_weight_constant_with_warmup(step, expected):
    assert kd_weight(step, 100, kd("constant", warmup=4)) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.7),
        (1, 0.63),
        (3, 0.5103),  # 0.7 * 0.729, above the floor
        (4, 0.5),  # 0.7 * 0.6561 = 0.45927 -> floored
        (1000, 0.5),
    ],
)
def test_kd_weight_article_with_floor(step, expected):
    assert kd_weight(step, 2000, kd("article", decay=0.9, floor=0.5)) == pytest.approx(expected, rel=1e-12)


def test_kd_weight_article_equals_the_article_formula_with_warmup():
    cfg = kd("article", base=0.7, warmup=10, decay=0.9)
    assert kd_weight(5, 100, cfg) == pytest.approx(0.35)
    assert kd_weight(12, 100, cfg) == pytest.approx(0.7 * 0.81)


def test_kd_weight_warmup_ramp_starts_at_zero_even_with_a_floor():
    # The ramp goes 0 -> base (the article's semantics); the floor applies to the decay only.
    cfg = kd("article", base=0.8, warmup=4, decay=0.5, floor=0.2)
    assert [kd_weight(s, 100, cfg) for s in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.4])
    assert kd_weight(7, 100, cfg) == pytest.approx(0.2)  # 0.8 * 0.125 = 0.1 -> floor


@pytest.mark.parametrize(
    "step, expected",
    [
        (5, 0.5),  # ramp: 1.0 * 5 / 10
        (10, 1.0),  # start of the cosine
        (35, 0.8828427124746190),  # p = 1/4: 0.2 + 0.8 * (1 + cos(pi/4)) / 2
        (60, 0.6),  # p = 1/2: midpoint
        (85, 0.3171572875253810),  # p = 3/4
        (110, 0.2),  # last step (total 111): the floor
        (500, 0.2),  # past the end: stays at the floor
    ],
)
def test_kd_weight_cosine_hand_values(step, expected):
    cfg = kd("cosine", base=1.0, warmup=10, floor=0.2)
    assert kd_weight(step, 111, cfg) == pytest.approx(expected, rel=1e-12)


def test_kd_weight_unknown_schedule():
    with pytest.raises(UserError, match="'linear'.*constant, article or cosine"):
        kd_weight(3, 10, kd("linear"))


# ---------------------------------------------------------------- learning rate


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),  # warm-up starts at lr / warmup, not 0
        (4, 0.5),
        (9, 1.0),
        (10, 1.0),  # cosine starts at the peak
        (35, 0.8681980515339464),  # p = 1/4: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
        (60, 0.55),  # p = 1/2: (lr + min_lr) / 2
        (110, 0.1),  # last step == min_lr
        (200, 0.1),
    ],
)
def test_lr_at_hand_values(step, expected):
    got = lr_at(step, lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=111)
    assert got == pytest.approx(expected, rel=1e-12)


def test_lr_last_step_is_exactly_min_lr():
    assert lr_at(1999, lr=3e-3, min_lr=3e-5, warmup_steps=100, total_steps=2000) == 3e-5
    assert lr_at(99999, lr=3e-5, min_lr=0.0, warmup_steps=5000, total_steps=100000) == 0.0


def test_lr_without_warmup_and_degenerate_lengths():
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=5) == 2.0
    assert lr_at(2, lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=5) == pytest.approx(1.0)
    assert lr_at(4, lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=5) == 0.0
    assert lr_at(0, lr=2.0, min_lr=0.5, warmup_steps=0, total_steps=1) == 2.0  # a single step
    assert lr_at(3, lr=2.0, min_lr=0.5, warmup_steps=4, total_steps=4) == 2.0  # all warm-up


def test_lr_is_monotone_after_warmup():
    values = [lr_at(s, lr=1.0, min_lr=0.01, warmup_steps=7, total_steps=50) for s in range(50)]
    assert all(a < b for a, b in zip(values[:6], values[1:7]))
    assert all(a >= b for a, b in zip(values[7:], values[8:]))


# ---------------------------------------------------------------- phase plan


def ph(name="p", fraction=None, steps=None, terms=("kd",)):
    return PhaseConfig(name=name, fraction=fraction, steps=steps, terms=list(terms))


def lengths(plan):
    return [p.end - p.start for p in plan]


def test_default_plan_of_the_article():
    plan = phase_boundaries(DEFAULT_PHASES, 100000)
    assert plan == [
        Phase("feature_alignment", 0, 20000, ("feature",)),
        Phase("soft_label_pretrain", 20000, 70000, ("kd",)),
        Phase("joint_optimization", 70000, 100000, ("kd", "ce")),
    ]
    assert [p.steps for p in plan] == [20000, 50000, 30000]


def test_plan_of_seven_steps():
    # Cumulative rounding: round(1.4) = 1, round(4.9) = 5, 7 -> lengths 1, 4, 2.
    plan = phase_boundaries(DEFAULT_PHASES, 7)
    assert [(p.start, p.end) for p in plan] == [(0, 1), (1, 5), (5, 7)]


@pytest.mark.parametrize("total", [1, 2, 3, 7, 11, 13, 99, 101, 997, 4001])
@pytest.mark.parametrize(
    "fractions", [(0.2, 0.5, 0.3), (0.7, 0.2, 0.1), (0.33, 0.33, 0.34), (0.125, 0.125, 0.25, 0.5), (1.0,)]
)
def test_plans_are_exact_contiguous_and_close_to_the_fractions(total, fractions):
    plan = phase_boundaries([ph(f"p{i}", fraction=f) for i, f in enumerate(fractions)], total)
    assert plan[0].start == 0 and plan[-1].end == total
    assert sum(lengths(plan)) == total
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    assert all(n >= 0 for n in lengths(plan))
    for p, f in zip(plan, fractions):
        assert abs(p.steps - f * total) <= 1
        assert isinstance(p.start, int) and isinstance(p.end, int)


def test_empty_phases_are_allowed():
    plan = phase_boundaries([ph("a", fraction=0.0), ph("b", fraction=1.0), ph("c", fraction=0.0)], 10)
    assert [(p.start, p.end) for p in plan] == [(0, 0), (0, 10), (10, 10)]
    assert [phase_at(plan, s).name for s in (0, 9, 10, 50)] == ["b", "b", "b", "b"]


def test_fixed_steps_mixed_with_fractions():
    # 1001 - 100 = 901 shared; round(450.5) = 450 (half to even), so 450 and 451.
    phases = [ph("warm", steps=100), ph("a", fraction=0.5), ph("b", fraction=0.5)]
    plan = phase_boundaries(phases, 1001)
    assert [(p.start, p.end) for p in plan] == [(0, 100), (100, 550), (550, 1001)]
    phases = [ph("a", fraction=0.25), ph("fixed", steps=3), ph("b", fraction=0.75)]
    assert [(p.start, p.end) for p in phase_boundaries(phases, 11)] == [(0, 2), (2, 5), (5, 11)]


def test_only_fixed_steps():
    plan = phase_boundaries([ph("a", steps=3), ph("b", steps=0), ph("c", steps=4)], 7)
    assert [(p.start, p.end) for p in plan] == [(0, 3), (3, 3), (3, 7)]


def test_fixed_steps_fill_the_run_and_fractions_get_nothing():
    plan = phase_boundaries([ph("a", steps=5), ph("b", fraction=1.0)], 5)
    assert lengths(plan) == [5, 0]


@pytest.mark.parametrize(
    "phases, total, message",
    [
        ([ph(fraction=0.2), ph(fraction=0.5), ph(fraction=0.2)], 10, "fractions sum to 0.9; they must sum to 1"),
        ([ph(fraction=0.6), ph(fraction=0.6)], 10, "fractions sum to 1.2; they must sum to 1"),
        ([ph(steps=3), ph(steps=3)], 7, "steps sum to 6; they must sum to the 7 total steps"),
        ([ph(steps=8), ph(fraction=1.0)], 7, "fixed phase steps sum to 8, more than the 7 total steps"),
        ([ph(fraction=0.5, steps=3)], 7, r"distill\.phases\[0\].*exactly one of fraction or steps"),
        ([ph(fraction=1.0), ph()], 7, r"distill\.phases\[1\].*exactly one of fraction or steps"),
        ([ph(steps=-1), ph(fraction=1.0)], 7, r"distill\.phases\[0\]\.steps': -1"),
        ([ph(fraction=1.5), ph(fraction=-0.5)], 7, r"distill\.phases\[0\]\.fraction': 1\.5"),
        ([ph(fraction=1.0, terms=())], 7, r"distill\.phases\[0\]\.terms"),
    ],
)
def test_bad_plans(phases, total, message):
    with pytest.raises(UserError, match=message):
        phase_boundaries(phases, total)


def test_phase_at_boundaries():
    plan = phase_boundaries(DEFAULT_PHASES, 100000)
    assert phase_at(plan, 0).name == "feature_alignment"
    assert phase_at(plan, 19999).name == "feature_alignment"
    assert phase_at(plan, 20000).name == "soft_label_pretrain"
    assert phase_at(plan, 69999).name == "soft_label_pretrain"
    assert phase_at(plan, 70000).name == "joint_optimization"
    assert phase_at(plan, 99999).name == "joint_optimization"
    assert phase_at(plan, 100000).name == "joint_optimization"  # past the end: the last phase
    counts = {}
    for step in range(0, 100000, 1):
        name = phase_at(plan, step).name
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"feature_alignment": 20000, "soft_label_pretrain": 50000, "joint_optimization": 30000}


def test_phase_at_past_the_end_skips_an_empty_last_phase():
    plan = phase_boundaries([ph("a", fraction=0.5), ph("b", fraction=0.5), ph("c", fraction=0.0)], 4)
    assert phase_at(plan, 4).name == "b"


def _article_phase_steps(total_steps: int) -> list[int]:
    """The article's ``DistillationPhaseController`` replayed: steps spent in each phase."""
    phase_steps = [total_steps * 0.2, total_steps * 0.5, total_steps * 0.3]
    thresholds = [phase_steps[0], phase_steps[0] + phase_steps[1]]
    counts = [0, 0, 0]
    step_counter = 0
    while True:
        step_counter += 1
        if step_counter >= sum(phase_steps):
            return counts  # "training finished"
        if step_counter <= thresholds[0]:
            counts[0] += 1
        elif step_counter <= thresholds[1]:
            counts[1] += 1
        else:
            counts[2] += 1


@pytest.mark.parametrize(
    "total, article, ours",
    [
        (10, [2, 5, 2], [2, 5, 3]),  # the article trains total - 1 steps
        (7, [1, 3, 2], [1, 4, 2]),  # float thresholds 1.4 and 4.9 compared with <=
        (100000, [20000, 50000, 29999], [20000, 50000, 30000]),
    ],
)
def test_contrast_with_the_articles_float_thresholds(total, article, ours):
    assert _article_phase_steps(total) == article
    plan = phase_boundaries(DEFAULT_PHASES, total)
    assert lengths(plan) == ours
    assert sum(ours) == total and sum(article) == total - 1
