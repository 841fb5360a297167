"""The fitted MLP and its data, shared by the int8 tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from distilflow.deploy.int8_kernels import resolve_reduce_range

from . import int8_reference


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
