"""Two teachers and the input-adaptive KD weight under torchrun (2 CPU processes, gloo): the losses and
the logged weight distribution of one process. The adaptive weight's step totals are all-reduced and
its summary gathered over the ranks, so the global step, not its split, decides every number."""

from __future__ import annotations

from pathlib import Path

import pytest

from distilflow.cli import main

from .test_dist import args as dist_args  # noqa: F401 - the fixture, as dist_args here
from .test_dist import assert_same_metrics, launch, metrics

MLP_TEACHER = (
    "model: {{arch: mlp, mlp: {{hidden: {hidden}, dropout: 0.0}}}}, "
    "train: {{steps: 6, batch_size: 32, warmup_steps: 1, log_every: 1}}"
)
TWO = (
    f"teachers=[{{name: narrow, {MLP_TEACHER.format(hidden='[16]')}}}, "
    f"{{name: wide, {MLP_TEACHER.format(hidden='[64, 64]')}}}]"
)


@pytest.fixture(scope="module")
def two(dist_args):  # noqa: F811 - the fixture imported above
    """test_dist's tiny MNIST-1D job (2 micro-batches of 16 per student step) with two MLP teachers (no
    dropout, no BatchNorm) instead of its one, entropy-weighted, with the adaptive KD weight; its feature
    phase aligns with teacher wide."""

    def make(output_dir: Path, *extra: str) -> list[str]:
        mine = [TWO, "distill.feature_teacher=wide", "distill.combine.rule=entropy", "distill.adaptive.tau=0.5", *extra]
        return [a for a in dist_args(output_dir, *mine) if not a.startswith(("teacher.", "distill.feature_layers"))]

    return make


def test_two_ranks_distill_from_two_teachers_with_the_adaptive_weight_as_one(two, tmp_path):
    reference = tmp_path / "one"
    assert main(["run", *two(reference)]) == 0
    given = [f"teachers.{n}.model.checkpoint={reference / 'teachers' / n / 'teacher'}" for n in ("narrow", "wide")]
    out = tmp_path / "two"
    ranks = launch(["distill", *two(out, *given)])
    assert all(rc == 0 for rc, _, _ in ranks), [err[-2000:] for _, _, err in ranks]
    want = metrics(reference, "student")
    assert any("kd_position_weight_p90" in r for r in want)
    assert_same_metrics(metrics(out, "student"), want)
