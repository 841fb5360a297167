"""Several teachers as one ``TeacherSignals``: each named teacher's signals, combined per position.

The pipeline (``pipeline.distill_stage``) builds one member per entry of ``teachers:``: a live
teacher (teachers/live.py) or a teacher-signal cache (teachers/cached.py), in the order of the
config. On every micro-batch :class:`MultiTeacher` asks each member for its signals and hands them
to teachers/combine.py, which mixes them into the one teacher distribution the KD term reads:

- the combination rule and its settings (``distill.combine``: teachers/weighting.Combination);
- the labels of the batch (``Targets.labels``: a classifier's class, an LM's next token; -100 where
  there is none) for the rules that read them (``correctness``, ``camkd``);
- the route of each row or token (``Targets.route``, from the data column ``data.teacher_column``;
  -1 where there is none), which sends it to one teacher alone;
- the features (feature phases) of one named teacher, ``distill.feature_teacher``.

Where the teachers live. Live members are all resident on the training device at once (their
models are frozen and evaluated one after the other per micro-batch). Teachers that do not fit
memory together are read from their caches instead (``cache.use``, or a teacher's own ``cache``
folder): a cached member holds no model at all, only its memory-mapped shards
(benchmarks/multi_teacher_lm.py measures the peak memory of two LM teachers live vs cached).

Autocast. The loop runs a ``TeacherSignals`` under the stage's autocast only when it says
``autocast = True``; a mixture of live and cached members says False and runs its live members
under ``autocast`` itself, so a cache's stored fp16 values are never "promoted" by autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from distilflow.losses.objective import Outputs, Targets
from distilflow.teachers.base import Batch, TeacherSignals
from distilflow.teachers.combine import combine_outputs
from distilflow.teachers.weighting import LABEL_RULES, Combination


@dataclass
class Member:
    """One named teacher of a :class:`MultiTeacher` and where its signals come from."""

    name: str
    signals: TeacherSignals


class MultiTeacher:
    """The combined signals of ``members`` (a :class:`~distilflow.teachers.base.TeacherSignals`).

    ``targets``: the task's :meth:`~distilflow.train.loop.Task.targets` (labels and route of a
    micro-batch); ``vocab_size``: the label space or vocabulary every member scores (checked at
    preflight, and again on the first micro-batch); ``feature_teacher``: the index of the member
    whose features the feature term aligns with (None: no feature term); ``autocast``: the stage's
    autocast context for the live members.
    """

    autocast = False  # live members are autocast here, cached ones never (see the module docstring)

    def __init__(
        self,
        members: Sequence[Member],
        *,
        combination: Combination,
        temperature: float,
        vocab_size: int,
        targets: Callable[[Batch], Targets],
        feature_teacher: int | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        chunk_rows: int = 0,
    ) -> None:
        self.members = list(members)
        self.names = [m.name for m in self.members]
        combination.check(len(self.members))
        self.combination, self.temperature, self.vocab_size = combination, temperature, vocab_size
        self.targets, self.feature_teacher = targets, feature_teacher
        self.live_autocast, self.chunk_rows = autocast, chunk_rows
        self.checked = False  # the first micro-batch is checked in full (shapes, ids, route), the rest trusted

    def member_outputs(self, batch: Batch, *, features: bool) -> list[Outputs]:
        """Each member's :class:`Outputs` on ``batch``, in order (features from the feature teacher only)."""
        outputs = []
        for index, member in enumerate(self.members):
            wants = features and index == self.feature_teacher
            with self.live_autocast() if getattr(member.signals, "autocast", False) else nullcontext():
                outputs.append(member.signals(batch, features=wants))
        return outputs

    def __call__(self, batch: Batch, *, features: bool) -> Outputs:
        target = self.targets(batch)
        labels = target.labels if self.combination.rule in LABEL_RULES else None
        combined = combine_outputs(
            self.member_outputs(batch, features=features),
            feature_teacher=self.feature_teacher if features else None,
            temperature=self.temperature,
            combination=self.combination,
            vocab_size=self.vocab_size,
            labels=labels,
            route=target.route,
            names=self.names,
            chunk_rows=self.chunk_rows,
            check=not self.checked,
        )
        self.checked = True
        return combined
