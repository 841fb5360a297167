"""ONNX export of a trained student, followed by a parity check against the eager model.

Classifiers take ``x`` ``(batch, *input_shape)`` and return ``logits`` ``(batch, classes)``;
causal LMs take ``input_ids`` and ``attention_mask`` ``(batch, seq)`` and return ``logits``
``(batch, seq, vocab)``. Batch (and sequence) axes are dynamic.
"""

from __future__ import annotations

import re
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.deploy import quiet_logs
from distilflow.errors import UserError
from distilflow.storage import atomic_write


class _LogitsOnly(nn.Module):
    """A Hugging Face causal LM as ``(input_ids, attention_mask) -> logits``, without the KV cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def logits_module(model: nn.Module, kind: str) -> nn.Module:
    """The module whose inputs and output the export and the benchmark use: ``x -> logits`` for
    classifiers, ``(input_ids, attention_mask) -> logits`` for causal LMs."""
    return _LogitsOnly(model) if kind == "causal_lm" else model


def input_names(kind: str) -> list[str]:
    return ["input_ids", "attention_mask"] if kind == "causal_lm" else ["x"]


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, *, kind: str) -> Path:
    """Write ``model`` to ``path`` as ONNX (torch.export based exporter) with dynamic batch/sequence axes.

    A model whose operators cannot be exported is a UserError naming the operator when the
    exporter names one.
    """
    model = model.eval()
    names = input_names(kind)
    module = logits_module(model, kind)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if kind == "causal_lm":
        seq = torch.export.Dim("seq", min=2, max=65536)
        dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        dynamic = {"x": {0: batch}}
    args = tuple(example[n] for n in names)

    def write(tmp: str) -> None:
        torch.onnx.export(
            module,
            args,
            tmp,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=dynamic,
            dynamo=True,
            external_data=False,
            verbose=False,
        )

    try:
        # torch.export prints the partial graph of a failed export to stderr; the UserError says it in one line.
        with warnings.catch_warnings(), redirect_stdout(StringIO()), redirect_stderr(StringIO()), quiet_logs():
            warnings.simplefilter("ignore")
            atomic_write(path, write)  # a kill or a full disk leaves no half-written student.onnx
    except UserError:
        raise  # a full disk (WriteFailed)
    except Exception as exc:  # the exporter raises many types; name the operator if it does
        raise UserError(f"ONNX export of the {kind} model failed: {_export_failure(exc)}") from None
    return path


def _export_failure(exc: Exception) -> str:
    """One line out of the exporter's many: the operator, else the cause and the line of model code."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colours its messages
    op = re.search(r"\b((?:aten|prims)(?:::|\.)\w+(?:\.\w+)?)", text)
    if op:
        return f"operator {op.group(1)} cannot be exported"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The first lines are generic advice ("This is step 1/3 ..."); the cause follows "## Exception summary".
    summary = lines.index("## Exception summary") + 1 if "## Exception summary" in lines[:-1] else 0
    what = re.sub(r"^<class '[\w.]+'>: ", "", lines[summary]) if lines else type(exc).__name__
    where = re.search(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(\S.*)', text)
    if where:
        what += f" (at {Path(where[1]).name}:{where[2]}: {where[3].strip()})"
    return what[:300]


@dataclass
class Parity:
    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}"


def check_parity(
    model: nn.Module, onnx_path: Path, inputs: dict[str, torch.Tensor], *, kind: str, tolerance: float = 1e-3
) -> Parity:
    """Compare ONNX Runtime's logits with the eager model's on real inputs.

    The relative difference is measured against the largest eager logit magnitude (elementwise
    relative error is meaningless near zero). Above ``tolerance`` (on the relative difference) the
    export is a UserError.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {n: inputs[n].cpu().numpy() for n in input_names(kind)}
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        module = logits_module(model, kind)
        want = module.eval()(*(inputs[n] for n in input_names(kind))).float().cpu().numpy()
    if got.shape != want.shape:
        raise UserError(f"ONNX model returns logits of shape {got.shape}, the eager model {want.shape}")
    diff = np.abs(got - want)
    parity = Parity(float(diff.max()), float(diff.max() / max(np.abs(want).max(), 1e-12)))
    if not parity.max_rel <= tolerance:
        raise UserError(f"ONNX export does not match the eager model: {parity} (tolerance {tolerance:g} relative)")
    return parity
