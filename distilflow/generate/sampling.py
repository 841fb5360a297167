"""How tokens are drawn, for every generator in distilflow: ``distilflow generate`` (transformers or
vLLM), on-policy distillation, exact-match evaluation, and ``distilflow predict`` (transformers or ONNX
Runtime GenAI, streamed). No torch import: ``predict`` on a GenAI folder stays light."""

from __future__ import annotations

from dataclasses import dataclass

from distilflow.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy decoding (then ``top_p``, ``top_k`` and ``seed`` do not apply).

    ``top_p``: nucleus sampling, the smallest set of tokens with this total probability, in (0, 1];
    ``top_k``: keep the k likeliest tokens (0 = all); ``stop``: a completion ends before the first of
    these strings (as in vLLM); ``seed``: the streaming generators' own random stream (``generate``
    and on-policy sampling draw from torch's, seeded by the caller).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_from_flags(
    max_new_tokens: int, *, sample: bool, temperature: float, top_k: int, top_p: float, seed: int, stop: list[str]
) -> Sampling:
    """``distilflow predict``'s flags (greedy unless ``--sample``) as a :class:`Sampling`; a bad value is
    one line naming the flag (``--max-new-tokens`` is checked by the command, for every model kind)."""
    if temperature <= 0:
        raise UserError(f"--temperature {temperature} is not allowed; use a value > 0")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} is not allowed; use a value in (0, 1]")
    if top_k < 0:
        raise UserError(f"--top-k {top_k} is not allowed; use 0 (all tokens) or more")
    return Sampling(max_new_tokens, temperature if sample else 0.0, top_p, top_k, tuple(stop), seed)
