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


def ort_session(path: str, threads: int, providers: list[str] | None = None):
    """An ONNX Runtime session with ``threads`` intra-op threads and one inter-op thread (every timed
    variant alike); imported here without torch, so a memory-measuring child stays torch-free."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
