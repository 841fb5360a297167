"""One real vLLM CPU server for the whole session, serving a tiny Llama that the session saves.

The server runs from ``.vllm-venv`` (scripts/vllm_venv.sh). Without that venv the tests that need
the server skip, naming the script, except under ``DISTILFLOW_REQUIRE_VLLM=1`` (.ci/run sets it),
where a missing venv or a server that does not start fails them: CI never skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from required import unavailable
from transformers import AutoTokenizer

from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer
from distilflow.models.hf import build_causal_lm

from .launch import MAX_MODEL_LEN, VllmServer, vllm_python

TRAIN_FILES = ("bisect.py", "heapq.py", "keyword.py")


def served_config(vocab_size: int) -> dict:
    """Hidden 128 in 2 heads: head size 64 (the CPU attention kernel refuses 16). Weights drawn with
    std 0.2 instead of 0.02: distributions like a trained model's (top-1 ~0.2, top-20 mass 0.5-0.93)
    rather than near-uniform, so few top-k values lie within float32 rounding of each other."""
    config = tiny_llama_config(vocab_size, hidden=128, layers=2, heads=2, max_positions=MAX_MODEL_LEN)
    return {**config, "initializer_range": 0.2}


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (float32) with a 320-id byte-level BPE trained on three stdlib files."""
    out = tmp_path_factory.mktemp("served-llama")
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in TRAIN_FILES]
    tokenizer = train_tokenizer(texts, 320, out)
    torch.manual_seed(0)
    model = build_causal_lm(served_config(len(tokenizer)))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def served_tokenizer(served_dir):
    return AutoTokenizer.from_pretrained(served_dir, local_files_only=True)


@pytest.fixture(scope="session")
def reference_model(served_dir):
    """The same weights in this process (transformers, float32, eval mode): the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served_dir, local_files_only=True).eval()


def _unavailable(reason: str) -> None:
    unavailable(reason, "DISTILFLOW_REQUIRE_VLLM", "the vLLM tests")


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """The vLLM CPU venv's python (skip, or fail under DISTILFLOW_REQUIRE_VLLM=1, without it)."""
    if not vllm_python().is_file():
        _unavailable(f"no vLLM CPU venv at {vllm_python().parent.parent}; make it with scripts/vllm_venv.sh")
    return vllm_python()


@pytest.fixture(scope="session")
def _session_server(vllm_venv, served_dir, tmp_path_factory):
    """The session's server (started on first use); a test that stops it gets it restarted."""
    server = VllmServer(served_dir, tmp_path_factory.mktemp("vllm-log") / "server.log")
    yield server
    server.stop()


def running(server: VllmServer) -> VllmServer:
    """``server`` started if it is not running (skip, or fail under DISTILFLOW_REQUIRE_VLLM=1, if it cannot be)."""
    if server.failed:  # one failed start per session: the others would wait as long again
        _unavailable(server.failed)
    if not server.running:
        try:
            server.start()
        except RuntimeError as error:
            server.failed = str(error)
            _unavailable(server.failed)
        print(f"vllm server up in {server.start_seconds:.1f} s at {server.url}")
    return server


@pytest.fixture
def vllm_server(_session_server: VllmServer) -> VllmServer:
    """A running vLLM server: ``.url``, serving ``launch.MODEL_NAME`` from ``served_dir``."""
    return running(_session_server)


@pytest.fixture(scope="module")
def module_vllm_server(_session_server: VllmServer) -> VllmServer:
    """The same server for module-scoped fixtures (a module whose tests stop it must use ``vllm_server``)."""
    return running(_session_server)
