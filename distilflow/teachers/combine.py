"""N teachers' signals combined into ONE teacher distribution that the existing KD term consumes.

The combined teacher is the mixture of the teachers' *tempered* distributions, per position (a
sample ``(B, C)`` or a token ``(B, T, V)``), with the weights of teachers/weighting.py:

    p_T(v) = sum_i w_i * softmax(z_i / T)(v)          (sum_i w_i = 1 at each position)

and the KD term then uses ``p_T`` as its target at the same ``T`` (and scales by ``T^2`` as for
one teacher). Why the tempered distributions are mixed, not the logits and not the ``T = 1``
distributions: for forward KL, ``KL(sum_i w_i p_i || q) = sum_i w_i KL(p_i || q) + const``, so
the student's gradient is exactly the weighted sum of the gradients it would get from each
teacher alone at ``T``: the weighted per-teacher losses of TextBrewer and CA-MKD, for the cost of
one KD term. Averaging logits (a product of experts) or tempering a ``T = 1`` mixture gives
targets whose gradient is not that sum (tests/teachers/test_combine.py checks both). For reverse
KL and JSD the KD term is the divergence to the mixture (not the mixture of divergences).

Representations. The KD term reads a dense teacher as logits it divides by ``T``; the mixture is
handed to it as ``T * log p_T``, whose ``log_softmax(. / T)`` is ``log p_T`` exactly
(:meth:`MixedTeacher.logits_at`). A top-k teacher is read as its K log-probabilities at ``T``;
the mixture of top-k teachers is again a top-k teacher over the union of their ids
(:func:`combine_topk`). ``sampled`` caches are refused (their ids estimate a distribution; the
weights of the adaptive rules cannot be read from them).

Memory. :class:`MixedTeacher` computes the rows a loss asks for (the chunked and fused losses: one
chunk at a time) in sub-chunks of ``chunk_rows_for((N + 2) * V)`` rows: per sub-chunk the N
tempered log-probabilities plus, for the teacher being read, its logits and one or two buffers of
its log_softmax and entropy, about one 32 MiB chunk of float32 in all; the N inputs are read as
they are (views, or logits made per sub-chunk from hidden states). No ``N x (B*T) x V`` float32
copy exists at any time. Materialised (``logits_at()`` for all rows) the result is one ``(..., V)``
float32 tensor, the size of one float32 teacher's logits. Measured: benchmarks/multi_teacher_memory.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distilflow.errors import UserError
from distilflow.losses.chunked import chunk_rows_for, row_slices
from distilflow.losses.confidence import (
    IGNORE_INDEX,
    Confidence,
    dense_confidence,
    entropy_of,
    expand_topk,
    topk_confidence,
)
from distilflow.losses.fused import HiddenStates
from distilflow.losses.objective import Outputs
from distilflow.losses.sparse import SparseTeacher, check_sparse, sparse_rows
from distilflow.teachers.topk import combine_topk
from distilflow.teachers.weighting import NO_ROUTE, Combination, route_per_position, teacher_weights

Signal = torch.Tensor | HiddenStates | SparseTeacher


def mix_log_probs(log_probs: Sequence[torch.Tensor], weights: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """``log sum_i w_i p_i`` in log space (exact where a ``p_i`` underflows float32).

    Shapes: each of ``log_probs`` ``(..., V)``, ``weights`` ``(..., N)``. A weight of 0 drops its
    teacher. ``overwrite``: the inputs are the caller's to lose; the sum is made in their buffers
    (no further ``(..., V)`` buffer), and the result is the first of them.
    """
    log_w = torch.log(weights.to(log_probs[0].dtype))  # (..., N); log 0 = -inf
    out = None
    for i, lp in enumerate(log_probs):
        term = lp.add_(log_w[..., i, None]) if overwrite else lp + log_w[..., i, None]
        if out is None:
            out = term
        else:
            out = torch.logaddexp(out, term, out=out) if overwrite else torch.logaddexp(out, term)
    return out


def _positions(signal: Signal) -> torch.Size:
    return signal.shape if isinstance(signal, SparseTeacher) else signal.shape[:-1]


def _region(signal: Signal, index: tuple) -> Signal:
    """The positions ``index`` of a signal without computing anything (views; hidden states stay hidden)."""
    if isinstance(signal, SparseTeacher):
        return sparse_rows(signal, index)
    if isinstance(signal, HiddenStates):
        return HiddenStates(signal.hidden[index], signal.weight, signal.bias, signal.vocab_size)
    return signal[index]


def _name(names: Sequence[str] | None, i: int) -> str:
    return f"'{names[i]}'" if names else f"{i}"


def check_signals(
    signals: Sequence[Signal],
    *,
    temperature: float,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> int:
    """One-line UserErrors for teacher signals that cannot be combined; returns the shared vocabulary size.

    All teachers must score the same positions and the same vocabulary (label space); top-k caches
    must be written at the distillation ``temperature``; ``route`` (one teacher index per row, or
    ``NO_ROUTE``) must name a teacher.
    """
    if not signals:
        raise ValueError("no teacher signals to combine")
    positions = _positions(signals[0])
    width_of = "the student" if vocab_size is not None else None  # who set vocab_size
    for i, signal in enumerate(signals):
        who = f"teacher {_name(names, i)}"
        if isinstance(signal, SparseTeacher) and signal.kind != "topk":
            raise UserError(
                f"{who} gives a '{signal.kind}' cache; several teachers combine dense logits or topk caches only "
                "(write its cache with cache.format=topk or full)"
            )
        if _positions(signal) != positions:
            raise UserError(
                f"teachers {_name(names, 0)} and {_name(names, i)} give signals for different positions "
                f"({tuple(positions)} and {tuple(_positions(signal))}); they must read the same batch"
            )
        if isinstance(signal, SparseTeacher):
            continue
        if width_of is None:
            vocab_size, width_of = signal.shape[-1], who
        elif signal.shape[-1] != vocab_size:
            raise UserError(
                f"{who} scores {signal.shape[-1]} classes/vocabulary ids but {width_of} {vocab_size}; "
                "all teachers must share one label space or vocabulary"
            )
    if vocab_size is None:
        raise ValueError("top-k teachers alone need vocab_size")
    for i, signal in enumerate(signals):
        if isinstance(signal, SparseTeacher):
            try:  # the one-teacher checks: cache temperature, ids within the vocabulary
                check_sparse(signal, divergence="forward_kl", temperature=temperature, vocab_size=vocab_size)
            except UserError as error:
                raise UserError(f"teacher {_name(names, i)}: {error}") from None
    if labels is not None and labels.shape != positions:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the teachers' positions {tuple(positions)}")
    if route is not None:
        if route.shape != positions[: route.dim()] or route.dim() == 0:
            raise ValueError(f"route {tuple(route.shape)} is not one index per row of {tuple(positions)}")
        bad = (route < NO_ROUTE) | (route >= len(signals))
        if bool(bad.any()):
            raise UserError(
                f"a route names teacher index {int(route[bad][0])}, but there are {len(signals)} teachers "
                f"(allowed: 0..{len(signals) - 1}, or {NO_ROUTE} for no route)"
            )
    return vocab_size


class MixedTeacher:
    """Dense teachers (and top-k caches, expanded) mixed on demand, rows at a time.

    A :class:`~distilflow.losses.chunked.LazyTeacher`, as the KD term consumes it: :meth:`logits_at`
    gives ``T * log p_T`` for any rows (the KD term's ``log_softmax(. / T)`` of it is ``log p_T``),
    :meth:`log_probs_at` ``log p_T``. The chunked and fused losses ask for one chunk of rows at a
    time (``losses/chunked.teacher_rows``), so the mixture is never held whole. Signals: dense
    logits ``(..., V)``, :class:`HiddenStates`, or ``topk`` :class:`SparseTeacher` (its tail spread
    uniformly; see losses/confidence.py).
    ``labels`` ``(...)`` for the label rules; ``route`` ``(B,)`` or ``(...)`` teacher indices.
    """

    def __init__(
        self,
        signals: Sequence[Signal],
        *,
        temperature: float,
        combination: Combination,
        vocab_size: int,
        labels: torch.Tensor | None = None,
        route: torch.Tensor | None = None,
        chunk_rows: int = 0,
    ) -> None:
        self.signals = list(signals)
        self.temperature = temperature
        self.combination = combination
        self.vocab_size = vocab_size
        self.positions = _positions(self.signals[0])
        self.labels = labels
        self.route = route_per_position(route, self.positions)
        # One sub-chunk's working set, N log-probabilities and about two more buffers, fits one chunk's budget.
        self.chunk_rows = chunk_rows_for(vocab_size * (len(self.signals) + 2), chunk_rows)
        dtypes = [s.values.dtype if isinstance(s, SparseTeacher) else _dense_dtype(s) for s in self.signals]
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32

    @property
    def shape(self) -> torch.Size:
        """The shape the logits have: ``(..., V)``."""
        return torch.Size((*self.positions, self.vocab_size))

    def _labels_at(self, index: tuple) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[index]

    def _route_at(self, index: tuple) -> torch.Tensor | None:
        return None if self.route is None else self.route[index]

    def _chunks(self, index: tuple):
        """Sub-chunks of the rows ``index``: (slice of the output, the signals' rows there, labels, route).

        The rows are views (hidden states stay hidden): :meth:`_mix` makes each teacher's logits
        in turn and drops them once its log-probabilities exist.
        """
        regions = [_region(s, index) for s in self.signals]
        labels, route = self._labels_at(index), self._route_at(index)
        for sub in row_slices(_positions(regions[0]), self.chunk_rows):
            yield (
                sub,
                [_region(r, sub) for r in regions],
                None if labels is None else labels[sub],
                None if route is None else route[sub],
            )

    def _mix(self, regions: list, labels, route, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's log-probabilities ``(n, V)`` at ``temperature`` and the weights ``(n, N)`` of one chunk.

        Held at once: the N teachers' log-probabilities and, for the teacher being read, its logits
        and the one or two buffers of its log_softmax and entropy.
        """
        combination = self.combination
        log_probs, confidences = [], []
        for region in regions:
            signal = _rows_of(region)  # (n, V) logits, or the top-k rows
            log_probs.append(_tempered(signal, temperature, self.vocab_size, self.dtype))
            if combination.adaptive:
                confidences.append(
                    _confidence(signal, log_probs[-1], labels, temperature, combination, self.vocab_size)
                )
            del signal
        weights = teacher_weights(
            combination,
            teachers=len(regions),
            positions=log_probs[0].shape[:-1],
            confidences=confidences or None,
            route=route,
            dtype=self.dtype,
            device=log_probs[0].device,
        )
        return mix_log_probs(log_probs, weights, overwrite=True), weights

    @torch.no_grad()
    def log_probs_at(self, index: tuple = (...,)) -> torch.Tensor:
        """``log p_T`` ``(..., V)`` of the rows ``index`` (any basic index over the positions)."""
        out = None
        for sub, signals, labels, route in self._chunks(index):
            mixed, _ = self._mix(signals, labels, route, self.temperature)
            if out is None:
                shape = _positions(_region(self.signals[0], index))
                out = torch.empty((*shape, self.vocab_size), dtype=mixed.dtype, device=mixed.device)
            out[sub] = mixed
        return out

    def logits_at(self, index: tuple = (...,)) -> torch.Tensor:
        """``T * log p_T`` ``(..., V)``: what the KD term reads as dense teacher logits at ``T``."""
        return self.log_probs_at(index).mul_(self.temperature)

    @torch.no_grad()
    def weights_at(self, index: tuple = (...,)) -> torch.Tensor:
        """The teachers' weights ``(..., N)`` at the rows ``index`` (for logging and checks)."""
        parts = [
            (sub, self._mix(signals, labels, route, self.temperature)[1])
            for sub, signals, labels, route in self._chunks(index)
        ]
        shape = _positions(_region(self.signals[0], index))
        out = torch.empty((*shape, len(self.signals)), dtype=parts[0][1].dtype, device=parts[0][1].device)
        for sub, weights in parts:
            out[sub] = weights
        return out

    @torch.no_grad()
    def confidence(self, *, labels: torch.Tensor | None = None, temperature: float = 1.0) -> Confidence:
        """Entropy (and label NLL) of the *combined* teacher at ``temperature``: the mixture, with the
        same weights, of the teachers' distributions at that temperature. For losses/adaptive.py."""
        entropy = nll = None
        for sub, signals, rule_labels, route in self._chunks((...,)):
            mixed, _ = self._mix(signals, rule_labels, route, temperature)
            if entropy is None:
                entropy = torch.empty(self.positions, dtype=mixed.dtype, device=mixed.device)
                nll = torch.zeros_like(entropy) if labels is not None else None
            entropy[sub] = entropy_of(mixed)
            if labels is not None:
                # mixed is normalised, so dense_confidence's log_softmax leaves it as it is
                nll[sub] = dense_confidence(mixed, labels=labels[sub]).label_nll
        out = Confidence(entropy)
        if labels is not None:
            out.label_nll, out.labelled = nll, labels != IGNORE_INDEX
        return out


def _rows_of(region: Signal) -> torch.Tensor | SparseTeacher:
    """A region's logits, made now for hidden states; top-k caches and logits as they are."""
    return region.logits_at() if isinstance(region, HiddenStates) else region


def _dense_dtype(signal) -> torch.dtype:
    return signal.weight.dtype if isinstance(signal, HiddenStates) else signal.dtype


def _tempered(signal, temperature: float, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A chunk's log-probabilities at ``temperature`` (a top-k cache re-tempered with its tail uniform)."""
    if isinstance(signal, SparseTeacher):
        log_p = expand_topk(signal, vocab_size).to(dtype) * (signal.temperature / temperature)
        return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return F.log_softmax(signal.to(dtype) / temperature, dim=-1)


def _confidence(signal, log_probs_at_t, labels, temperature, combination, vocab_size) -> Confidence:
    """A chunk's confidence at the combination's confidence temperature (reusing the T log-probs if equal)."""
    at = combination.confidence_temperature
    if isinstance(signal, SparseTeacher):
        return topk_confidence(signal, vocab_size=vocab_size, labels=labels, temperature=at)
    if math.isclose(at, temperature):
        return dense_confidence(log_probs_at_t, labels=labels)  # log_softmax of log-probs: themselves
    return dense_confidence(signal, labels=labels, temperature=at)


def combine_teachers(
    signals: Sequence[Signal],
    *,
    temperature: float,
    combination: Combination,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
    chunk_rows: int = 0,
    check: bool = True,
) -> SparseTeacher | MixedTeacher:
    """The one teacher distribution of N teachers' signals (checked): a top-k union when every teacher
    is a top-k cache, else a :class:`MixedTeacher`. One teacher without a route gives the same
    distribution as that teacher (not the same object). ``labels`` / ``route`` as :class:`MixedTeacher`.
    ``check=False`` skips :func:`check_signals` (``vocab_size`` must then be given): a caller that
    checked the first micro-batch of a run does not pay its device synchronisations on every one."""
    if check:
        combination.check(len(signals))
        vocab_size = check_signals(
            signals, temperature=temperature, vocab_size=vocab_size, labels=labels, route=route, names=names
        )
    elif vocab_size is None:
        raise ValueError("combine_teachers(check=False) needs vocab_size")
    if all(isinstance(s, SparseTeacher) for s in signals):
        return combine_topk(
            signals, temperature=temperature, combination=combination, vocab_size=vocab_size, labels=labels, route=route
        )
    return MixedTeacher(
        signals,
        temperature=temperature,
        combination=combination,
        vocab_size=vocab_size,
        labels=labels,
        route=route,
        chunk_rows=chunk_rows,
    )


def combine_outputs(outputs: Sequence[Outputs], *, feature_teacher: int | None = None, **options) -> Outputs:
    """:func:`combine_teachers` over the teachers' :class:`Outputs`; the features (feature phases)
    are those of one named teacher, ``feature_teacher`` (an index), or none."""
    combined = combine_teachers([o.logits for o in outputs], **options)
    features = list(outputs[feature_teacher].features) if feature_teacher is not None else []
    return Outputs(combined, features)
