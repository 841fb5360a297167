"""What the bad-input cases point at besides their own files: built once per session in a temp folder.

Cases name these in their command lines as ``$tokenizer``, ``$lm``, ``$onnx``, ``$mnist_cache``,
``$run`` (and ``$dir``, ``$out``: the case's own folder and the output folder inside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distilflow.cli import main
from distilflow.data.arith import arith_tokenizer
from distilflow.data.stdlib_corpus import tiny_llama_config
from distilflow.models.hf import build_causal_lm

from .case import CACHED

ONNX_FEATURES, ONNX_CLASSES = 4, 3


@dataclass(frozen=True)
class Kit:
    mnist_cache: Path  # data.cache_dir shared with the tiny runs of tests/conftest.py
    tokenizer: Path  # the arithmetic task's character tokenizer (eos 0, pad 1, bos 2)
    lm: Path  # a saved tiny random Llama (64 positions) with that tokenizer
    onnx: Path  # an ONNX classifier: x (N, 4) -> logits (N, 3), one MatMul
    run: Path  # the tiny run of case.CACHED: its teacher trained and its teacher cache complete

    def names(self) -> dict[str, str]:
        paths = {"mnist_cache": self.mnist_cache, "tokenizer": self.tokenizer, "lm": self.lm, "onnx": self.onnx}
        return {key: str(value) for key, value in paths.items()} | {"run": str(self.run)}


def build_kit(root: Path, mnist_cache: Path) -> Kit:
    tokenizer = arith_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden=16, layers=1, heads=2, max_positions=64)
    lm = root / "lm"
    build_causal_lm(config).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    run = root / "run"
    overrides = [arg.replace("$out", str(run)).replace("$mnist_cache", str(mnist_cache)) for arg in CACHED]
    for command in ("train-teacher", "cache-teacher"):
        assert main([command, *overrides]) == 0
    return Kit(mnist_cache, root / "tokenizer", lm, _onnx_classifier(root / "classifier.onnx"), run)


def _onnx_classifier(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((ONNX_FEATURES, ONNX_CLASSES), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["logits"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", ONNX_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", ONNX_CLASSES])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime release here reads
    onnx.save(model, str(path))
    return path
