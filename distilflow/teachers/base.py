"""The ``TeacherSignals`` seam: where the training loop's teacher outputs come from.

The loop (train/loop.py) calls ``teacher(batch, features=...)`` on every micro-batch of a phase
that needs the teacher and gets :class:`~distilflow.losses.objective.Outputs`: ``logits`` dense
``(B, [T,] V)``, :class:`~distilflow.losses.fused.HiddenStates` (the fused loss) or a
:class:`~distilflow.losses.sparse.SparseTeacher` (top-k or sampled ids), and ``features`` in the
order of the configured layer pairs when asked. The loop does not learn where they come from.

Implementations, one module each, chosen in the pipeline:

- :class:`distilflow.teachers.live.LiveTeacher`: a frozen model run on each batch;
- :class:`distilflow.teachers.cached.CachedTeacher`: a verified teacher-signal cache (``cache.use``);
- :class:`distilflow.teachers.sharded.ShardedTeacher`: another teacher run inside the FSDP2 root
  that holds the sharded teacher (``dist.shard_teacher`` under torchrun).

Several teachers, a served teacher, a teacher of another tokenizer are further implementations.
"""

from __future__ import annotations

from typing import Protocol

import torch

from distilflow.losses.objective import Outputs

Batch = dict[str, torch.Tensor]


class TeacherSignals(Protocol):
    """Teacher outputs for a micro-batch.

    ``batch`` is the micro-batch the student sees (it carries ``row``, the rows' indices in the
    training set, for implementations that look outputs up). ``features``: also return the teacher
    features of the configured layer pairs. An implementation that runs a model sets
    ``autocast = True`` to be called under the stage's ``train.precision`` autocast; others (a cache
    reader, which only moves stored tensors) are called outside it.
    """

    autocast: bool

    def __call__(self, batch: Batch, *, features: bool) -> Outputs: ...
