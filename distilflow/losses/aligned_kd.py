"""The KD term across tokenizers as a run configures it (``distill.cross_tokenizer``): ULD or the hybrid.

The objective (losses/objective.py) calls it on batches whose targets carry an alignment; the loss
functions themselves are losses/uld.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distilflow.data.align import Alignment
from distilflow.data.vocab_map import VocabMap
from distilflow.losses.uld import AlignedParts, TopkTeacher, hybrid_loss, uld_loss

CROSS_TOKENIZER = ("auto", "off", "uld", "hybrid")
ALIGNED_LOSSES = ("uld", "hybrid")


@dataclass
class AlignedKD:
    """``loss`` ``uld`` or ``hybrid``; the hybrid's ``vocab_map`` (the ids of equal text), part weights and
    ``buckets`` (``merged`` or ``span``: losses/uld.py's ``hybrid_loss``)."""

    loss: str
    vocab_map: VocabMap | None = None
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0
    buckets: str = "merged"

    def __post_init__(self) -> None:
        if self.loss not in ALIGNED_LOSSES:
            raise ValueError(f"cross-tokenizer loss must be one of {', '.join(ALIGNED_LOSSES)}, got {self.loss!r}")
        if self.loss == "hybrid" and self.vocab_map is None:
            raise ValueError("the hybrid loss needs the vocabulary map of the two tokenizers")

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher: torch.Tensor | TopkTeacher,
        alignment: Alignment,
        *,
        temperature: float,
        divergence: str,
        beta: float,
    ) -> AlignedParts:
        """The term summed over the alignment's groups: ``student_logits`` ``(B, T_s, V_s)``, the
        teacher ``(B, T_t, V_t)`` logits or a :class:`TopkTeacher` (shifted alike)."""
        if self.loss == "uld":
            return uld_loss(student_logits, teacher, alignment, temperature=temperature)
        return hybrid_loss(
            student_logits,
            teacher,
            alignment,
            self.vocab_map,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            buckets=self.buckets,
        )
