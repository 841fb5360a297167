"""Ship the student: ONNX export with a parity check, int8 quantization, benchmarks."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Mute library log noise (the ONNX exporter's torchvision notes, ONNX Runtime's pre-processing
    advice, torchao's missing-CUDA-kernel notes) for the duration of the block; errors still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
