"""Shared by the deploy tests: the fitted MLP and its data (built once per session, for the int8 tests), a
tiny Llama and its token feeds, and an ONNX Runtime session independent of distilflow's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from distilflow.data.stdlib_corpus import tiny_llama_config
from distilflow.deploy.int8_kernels import resolve_reduce_range
from distilflow.models.hf import build_causal_lm

from . import int8_reference

VOCAB = 64


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits from a fresh ONNX Runtime session, independent of distilflow's own sessions."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return build_causal_lm(tiny_llama_config(VOCAB, hidden=16, layers=1, heads=2, max_positions=64)).eval()


def lm_feeds(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def fitted_mlp(tmp_path_factory) -> tuple[nn.Module, Path]:
    return int8_reference.fitted_mlp(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="session")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    x, y = int8_reference.blobs(400, seed=2)
    return x.numpy(), y.numpy()


@pytest.fixture(scope="session")
def calibration() -> list[dict[str, np.ndarray]]:
    return int8_reference.calibration_feeds()


@pytest.fixture(scope="session")
def reduce_range() -> bool:
    """deploy.reduce_range 'auto' on this CPU: 7-bit weights where ONNX Runtime's U8S8 kernel saturates."""
    return resolve_reduce_range("auto")
