"""Candidate causal-LM student shapes for ``distilflow size-student`` (the teacher's family, no training).

How candidates are generated, around the configured ``student.model.hf.config`` (its ``model_type``
kept, so every candidate is of the family the config names, and every field the grid does not
vary kept as given):

- **head size** fixed at the configured one (``head_dim``, else ``hidden_size / num_attention_heads``):
  attention kernels are built for a few head sizes, and ONNX Runtime's CPU GroupQueryAttention
  wants a multiple of 16;
- **heads** from :data:`HEADS` (a ~x1.4 grid, multiples of the configured query heads per KV head, so
  grouped-query attention keeps its grouping), **hidden size** = heads x head size (so it is always
  divisible by the heads), **KV heads** = heads / the configured group size;
- **intermediate size** = hidden x the configured ``intermediate_size / hidden_size`` ratio, rounded
  to a multiple of 8;
- **depth** (``num_hidden_layers``): the configured one, one less and one more (at least 1).

``--widths`` (hidden sizes, each a multiple of the head size) and ``--depths`` replace the grids.
Each candidate carries its parameters and its MACs per token: one per weight of every linear layer,
the LM head included (:func:`distilflow.models.hf.linear_macs_per_token`, what the results table's
FLOP counter reports for a decoder with SDPA attention); attention over the context and the
embedding lookup are not counted. "Largest" means most MACs per token, then most parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from distilflow.errors import UserError
from distilflow.models.sizing import Candidate

HEADS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
"""Query-head counts tried (x hidden size = heads x head size): a x1.33-x1.5 grid."""


def base_shape(config: dict[str, Any]) -> dict[str, int]:
    """The configured shape (a transformers config's defaults for keys the YAML leaves out)."""
    from distilflow.models.hf import hf_config_from_dict

    hf = hf_config_from_dict(config, "student")
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if not isinstance(getattr(hf, k, None), int)
    ]
    if missing:
        raise UserError(
            f"size-student varies hidden_size, num_hidden_layers, num_attention_heads and intermediate_size; "
            f"model_type {config.get('model_type')!r} has no {', '.join(missing)} (Llama-style families: llama, "
            "qwen2, qwen3, mistral, gemma, phi3, ...)"
        )
    heads = hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return {
        "hidden_size": hf.hidden_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": hf.intermediate_size,
        "head_dim": head_dim,
        "group": max(heads // max(kv, 1), 1),
    }


def lm_shapes(
    config: dict[str, Any], *, widths: list[int] | None = None, depths: list[int] | None = None
) -> list[dict[str, Any]]:
    """Candidate ``hf.config`` dicts: the configured one with hidden size, heads, KV heads, intermediate
    size and depth replaced (see the module docstring)."""
    base = base_shape(config)
    head_dim, group = base["head_dim"], base["group"]
    ratio = base["intermediate_size"] / base["hidden_size"]
    if widths:
        bad = [w for w in widths if w % (head_dim * group)]
        if bad:
            raise UserError(
                f"--widths {','.join(map(str, bad))}: an LM hidden size must be a multiple of the head size "
                f"{head_dim} x {group} query heads per KV head = {head_dim * group}"
            )
        head_counts = [w // head_dim for w in widths]
    else:
        head_counts = [h for h in HEADS if h % group == 0]
    layers = base["num_hidden_layers"]
    depth_list = depths or sorted({max(1, layers - 1), layers, layers + 1})
    shapes = []
    for depth in depth_list:
        for heads in head_counts:
            hidden = heads * head_dim
            shape = {
                "hidden_size": hidden,
                "intermediate_size": max(8, int(round(hidden * ratio / 8)) * 8),
                "num_hidden_layers": depth,
                "num_attention_heads": heads,
                "num_key_value_heads": heads // group,
            }
            if "head_dim" in config:  # an explicit head size stays; else hidden / heads gives it
                shape["head_dim"] = head_dim
            shapes.append({**config, **shape})
    return shapes


def lm_name(config: dict[str, Any]) -> str:
    """``llama 3x128 h4/4 i344``: depth x hidden, query/KV heads, intermediate size."""
    return (
        f"{config['model_type']} {config['num_hidden_layers']}x{config['hidden_size']} "
        f"h{config['num_attention_heads']}/{config['num_key_value_heads']} i{config['intermediate_size']}"
    )


def lm_candidates(
    config: dict[str, Any],
    filled: Any,
    *,
    widths: list[int] | None = None,
    depths: list[int] | None = None,
    seed: int = 0,
    max_macs: int | None = None,
) -> list[Candidate]:
    """The candidates (``Candidate.model``: the ``hf.config`` dict), costed on the meta device
    (``filled(config)``: the config with the tokenizer's vocabulary and special ids, as the workload
    builds students), those over ``max_macs`` per token dropped (the smallest kept if none is under),
    the rest built at random init from ``seed``; ordered by MACs, then params."""
    from distilflow.models.build import count_params
    from distilflow.models.hf import build_causal_lm, linear_macs_per_token

    found = []
    for shape in lm_shapes(config, widths=widths, depths=depths):
        with torch.device("meta"):  # shapes only, no memory
            outline = build_causal_lm(filled(shape), role="student")
        found.append(Candidate(lm_name(shape), shape, count_params(outline), linear_macs_per_token(outline)))
    found.sort(key=lambda c: (c.macs, c.params))
    if max_macs is not None:
        found = [c for c in found if c.macs <= max_macs] or found[:1]
    for c in found:
        torch.manual_seed(seed)
        c.module = build_causal_lm(filled(c.model), role="student").eval()
    return found
