"""The served generation backend (``generate.backend=vllm`` + ``generate.server.url``) against a local
stub of vLLM's API: the request it sends, how answers map to completions, and the config checks.
tests/vllm/test_generate_served.py runs ``distilflow generate`` against a real vLLM server."""

from __future__ import annotations

import pytest
from vllm_stub import StubVllm

from distilflow.config import load_config
from distilflow.errors import UserError
from distilflow.generate.backends import Sampling
from distilflow.generate.served import ServedBackend
from distilflow.serving import PROBE_TEXT


class Tokenizer:
    """Ids of a text: its characters' codes mod 40 (the stub's vocabulary)."""

    all_special_tokens: list[str] = []

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) % 40 for c in text]}


@pytest.fixture
def stub():
    server = StubVllm()
    server.tokenize_ids = Tokenizer()(PROBE_TEXT, False)["input_ids"]
    yield server
    server.close()


def test_request_and_answers(stub):
    backend = ServedBackend(stub.url, Tokenizer(), seed=5)
    assert backend.model == "stub-teacher" and backend.max_positions == 64
    sampling = Sampling(max_new_tokens=2, temperature=0.5, top_p=0.9, stop=("##",))
    out = backend.generate(["ab", "c"], n=3, sampling=sampling, special_tokens=True)
    sent = stub.last_payload
    assert sent["prompt"] == [[ord("a") % 40, ord("b") % 40], [ord("c") % 40]]
    assert (sent["n"], sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"]) == (3, 0.5, 0.9, 2, ["##"])
    assert sent["seed"] == 5 and sent["return_token_ids"] is True
    # index = prompt * n + sample; tokens = len(token_ids); finish "length" at max_new_tokens.
    assert [[(c.text, c.tokens, c.finish) for c in row] for row in out] == [
        [("0.0", 1, "stop"), ("0.1", 2, "length"), ("0.2", 2, "length")],
        [("1.0", 1, "stop"), ("1.1", 2, "length"), ("1.2", 2, "length")],
    ]
    backend.generate(["ab"], n=1, sampling=sampling, special_tokens=True)
    assert stub.last_payload["seed"] == 6  # each call its own seed


def test_greedy_asks_once_and_repeats(stub):
    # vLLM refuses n > 1 with temperature 0; the n greedy samples are one completion n times.
    backend = ServedBackend(stub.url, Tokenizer())
    out = backend.generate(["ab"], n=3, sampling=Sampling(max_new_tokens=4, temperature=0.0), special_tokens=False)
    assert stub.last_payload["n"] == 1
    assert [c.text for c in out[0]] == ["0.0", "0.0", "0.0"]


def test_server_with_another_tokenizer_is_refused(stub):
    stub.tokenize_ids = [1, 2, 3]
    with pytest.raises(UserError, match="tokenizes a probe text differently"):
        ServedBackend(stub.url, Tokenizer())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["generate.server.url=http://127.0.0.1:8000"], "a served model needs generate.backend=vllm"),
        (["generate.backend=vllm", "generate.server.url=127.0.0.1:8000"], "http(s)://host:port"),
        (["generate.server.timeout_s=0"], "must be > 0"),
        (["generate.server.max_retries=-1"], "must be >= 0"),
    ],
)
def test_server_config_is_checked_at_load(overrides, message):
    with pytest.raises(UserError) as excinfo:
        load_config(None, overrides)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_server_config_loads():
    cfg = load_config(None, ["generate.backend=vllm", "generate.server.url=http://127.0.0.1:8000"])
    assert (cfg.generate.server.url, cfg.generate.server.max_retries) == ("http://127.0.0.1:8000", 3)
