"""Fused-linear KD + CE: logits computed chunk by chunk from final hidden states and the lm_head.

A language model's logits are ``hidden @ weight.T (+ bias)`` with ``hidden`` ``(N, H)`` and the
lm_head ``weight`` ``(V, H)``; at V = 150k the ``[N, V]`` logits dwarf everything else. Here the
student's logits exist one chunk of rows at a time: for each chunk its logits are computed, the
loss of losses/logits.py (or losses/sparse.py) gives the value and the gradient with respect to
those logits, which goes straight into the gradients of ``hidden`` (``grad_logits @ weight``)
and ``weight`` (``grad_logits.T @ hidden``), and the chunk is dropped. One custom autograd
function holds only those two gradients for the backward pass. This is the idea of Liger-Kernel's
fused linear losses (Hsu et al. 2024) and Cut Cross-Entropy (Wijmans et al. 2025), in pure
PyTorch (CPU and GPU); their Triton kernels need a CUDA GPU and are not used here.

The teacher side is dense logits, hidden states with the teacher's own lm_head (its logits are
made per chunk too, without gradient), or a :class:`SparseTeacher` from a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distilflow.errors import UserError
from distilflow.losses.chunked import (
    LazyTeacher,
    LossParts,
    LossSpec,
    check_terms,
    chunk_rows_for,
    combine,
    row_slices,
    run_chunks,
)
from distilflow.losses.sparse import SparseTeacher


@dataclass
class HiddenStates:
    """What a causal LM gives the fused loss instead of logits.

    ``hidden`` ``(..., H)`` final hidden states (after the final norm) at the positions whose logits
    would be scored; ``weight`` ``(V_table, H)`` and ``bias`` ``(V_table,)`` or None: the lm_head;
    ``vocab_size`` the first ids that are scored (the shared-vocabulary cut), None for all.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    vocab_size: int | None = None

    @property
    def vocab(self) -> int:
        return self.vocab_size if self.vocab_size is not None else self.weight.shape[0]

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: ``(..., V)``."""
        return torch.Size((*self.hidden.shape[:-1], self.vocab))

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lm_head cut to the scored ids (views)."""
        bias = self.bias[: self.vocab] if self.bias is not None else None
        return self.weight[: self.vocab], bias

    def logits_at(self, index: tuple = (...,)) -> torch.Tensor:
        """Logits ``(..., V)`` of the positions ``index``, without gradient (teacher side, evaluation)."""
        weight, bias = self.head()
        with torch.no_grad():
            return F.linear(self.hidden[index], weight, bias)

    def anchor(self) -> torch.Tensor:
        """A zero that depends on the student's parameters (the objective's loss with no active term)."""
        return self.hidden.sum() * 0.0


class _FusedKDCE(torch.autograd.Function):
    """Value and gradients computed chunk by chunk in forward; backward scales the stored gradients.

    Under autocast the chunk matmuls run in the autocast dtype (as the model's own lm_head would);
    the loss math is float32 (losses/logits.py) and the weight gradient is accumulated in the
    weight's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, table, table_bias, vocab, teacher, labels, mask, spec, chunk_rows, grad_enabled):
        # The whole lm_head comes in and is cut here: slicing it outside would make autograd
        # allocate a second (V_table, H) gradient to scatter the cut one into.
        weight = table[:vocab]
        bias = table_bias[:vocab] if table_bias is not None else None
        # needs_input_grad is True under torch.no_grad too; evaluation must not pay for gradients.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        need_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        need_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_table = torch.zeros_like(table) if need_weight else None
        grad_table_bias = torch.zeros_like(table_bias) if need_bias else None
        grad_weight = grad_table[:vocab] if need_weight else None  # views: rows past the cut stay 0
        grad_bias = grad_table_bias[:vocab] if need_bias else None

        def student_at(index):
            return F.linear(hidden[index], weight, bias)  # (n, V) for this chunk only

        def spread(index, grad_logits):
            # grad_logits (n, V): d loss / d logits of the chunk.
            # It has the chunk logits' dtype, so these matmuls run as the forward one did.
            if need_hidden:
                grad_hidden[index] = grad_logits @ weight
            if need_weight:
                # In place (in-place ops are not autocast): no (V, H) temporary per chunk. Under
                # autocast the chunk (n, V) and (n, H) are upcast, the product summed in the weight's dtype.
                dtype = grad_weight.dtype
                grad_weight.addmm_(grad_logits.T.to(dtype), hidden[index].to(dtype))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0).to(grad_bias.dtype))

        slices = list(row_slices(hidden.shape[:-1], chunk_rows))
        kd, ce = run_chunks(student_at, teacher, labels, mask, spec, slices, need_grad, spread)
        ctx.grads = (grad_hidden, grad_table, grad_table_bias)
        ctx.mark_non_differentiable(kd, ce)
        return combine(kd, ce, spec), kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # Scaled in place: ctx owns these buffers and backward runs once (a second copy of the
        # (V, H) lm_head gradient would cost as much as the chunks saved).
        grads = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in ctx.grads]
        ctx.grads = None
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None


def _teacher_side(teacher, vocab: int):
    """The teacher as the chunk loop takes it, checked against the student's scored vocabulary."""
    if teacher is None or isinstance(teacher, SparseTeacher):
        return teacher
    width = teacher.shape[-1]  # HiddenStates: its vocabulary cut
    if not isinstance(teacher, LazyTeacher):  # dense logits (lazy teachers are made without gradient)
        teacher = teacher.detach()
    if width != vocab:
        raise UserError(
            f"teacher scores {width} vocabulary ids but the student {vocab}; set the shared vocabulary cut on both"
        )
    return teacher


def fused_kd_ce(
    student: HiddenStates,
    teacher: torch.Tensor | HiddenStates | SparseTeacher | None,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float | None = 1.0,
    ce_weight: float | None = None,
    chunk_rows: int = 0,
) -> LossParts:
    """``kd_weight * KD + ce_weight * CE`` (sums over rows) from the student's hidden states and lm_head.

    Shapes: ``student.hidden`` ``(..., H)``; ``teacher`` dense logits ``(..., V)``, hidden states of
    the teacher (any width, its own lm_head cut to the same V), a :class:`SparseTeacher`, or None
    (CE only); ``labels`` / ``mask`` ``(...)``. Equal in value and gradient (for the student's
    hidden states, lm_head weight and bias) to the plain losses on ``F.linear(hidden, weight, bias)``.
    """
    spec = LossSpec(divergence, temperature, beta, kd_weight, ce_weight)
    vocab = student.vocab
    teacher = _teacher_side(teacher, vocab)
    check_terms(teacher, labels, spec, vocab)
    rows = chunk_rows_for(vocab, chunk_rows)
    loss, kd, ce = _FusedKDCE.apply(
        student.hidden, student.weight, student.bias, vocab, teacher, labels, mask, spec, rows, torch.is_grad_enabled()
    )
    return LossParts(loss, kd if kd_weight is not None else None, ce if ce_weight is not None else None)
