"""A local stand-in for vLLM's HTTP API (stdlib http.server in a thread), for the client's fault cases.

It answers like vLLM 0.32 (tests/vllm/ checks the real one): ``/v1/models``, ``/tokenize`` and
``/v1/completions`` with ``prompt_logprobs`` from a bigram table (the distribution after token a is
``log_softmax(table[a])``), the actual next token added beside the top k when it is not among them;
without ``prompt_logprobs``, ``n`` made-up completions per prompt (see ``_completions``).
Imported as ``vllm_stub`` (tests/ is on sys.path for its conftest) by tests/teachers and tests/generate.
``fail`` makes the next answers fail: ``500``, ``garbage`` (200 with a non-JSON body), ``hang``
(never answers until the server closes), ``drop`` (closes the connection), ``logits`` (raw values);
``fail_from = n`` answers 500 from the n-th scoring request on. With ``tokenizer``, ``/tokenize``
answers as a server of that tokenizer (for whole distillation runs against the stub).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class StubVllm:
    def __init__(
        self,
        *,
        vocab_size: int = 40,
        model: str = "stub-teacher",
        seed: int = 0,
        tokenizer: Any = None,
        max_model_len: int = 64,
        max_logprobs: int = 20,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, generator=generator) * 3.0  # (V, V) bigram logits
        self.vocab_size, self.model = vocab_size, model
        # ``tokenizer``: /tokenize answers with its ids (as a server of that tokenizer); else tokenize_ids.
        self.tokenizer, self.max_model_len, self.max_logprobs = tokenizer, max_model_len, max_logprobs
        self.scored_rows = 0  # prompts answered with prompt log-probs
        self.scoring_requests = 0  # /v1/completions requests asking for prompt log-probs
        self.fail_from: int | None = None  # scoring requests from this one on answer 500 (a server gone bad)
        self.fail: str | None = None
        self.fail_count = 10**9  # answers that fail before the stub answers well again
        self.hits: list[str] = []
        self.release = threading.Event()
        self.tokenize_ids: list[int] | str | None = (
            None  # what /tokenize answers ("skip": 400 as vLLM without tokenizer)
        )
        self.last_payload: Any = None
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                stub._handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                stub._handle(self, json.loads(self.rfile.read(length)))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def log_probs(self, previous: int) -> torch.Tensor:
        return torch.log_softmax(self.table[previous], dim=-1)  # (V,)

    # --- answers ---------------------------------------------------------------------------

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _handle(self, handler: BaseHTTPRequestHandler, payload: Any) -> None:
        self.hits.append(handler.path)
        if self.fail and self.fail_count > 0 and handler.path != "/v1/models":
            self.fail_count -= 1
            if self.fail == "500":
                return self._send(handler, 500, b'{"error": {"message": "engine died", "code": 500}}')
            if self.fail == "garbage":
                return self._send(handler, 200, b"<html>not json</html>")
            if self.fail == "hang":
                self.release.wait(30)
                return None
            if self.fail == "drop":
                handler.close_connection = True
                return None
        if handler.path == "/v1/models":
            card = {"id": self.model, "max_model_len": self.max_model_len}
            return self._send(handler, 200, json.dumps({"data": [card]}).encode())
        if handler.path == "/tokenize" and self.tokenize_ids == "skip":  # as vLLM --skip-tokenizer-init
            message = "Tokenizer not available when `skip_tokenizer_init=True`"
            return self._send(handler, 400, json.dumps({"error": {"message": message}}).encode())
        if handler.path == "/tokenize":
            tokens = self.tokenize_ids or []
            if self.tokenizer is not None:
                special = payload["add_special_tokens"]
                tokens = self.tokenizer(payload["prompt"], add_special_tokens=special)["input_ids"]
            return self._send(handler, 200, json.dumps({"tokens": tokens}).encode())
        if handler.path == "/v1/completions":
            return self._completions(handler, payload)
        return self._send(handler, 404, b'{"error": {"message": "no such route"}}')

    def _completions(self, handler: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
        self.last_payload = payload
        if payload.get("prompt_logprobs") is not None:
            self.scoring_requests += 1
            if self.fail_from is not None and self.scoring_requests >= self.fail_from:
                return self._send(handler, 500, b'{"error": {"message": "engine died", "code": 500}}')
        if payload.get("model") != self.model:
            return self._send(handler, 404, b'{"error": {"message": "The model does not exist."}}')
        k = payload.get("prompt_logprobs")
        if k is not None and k > self.max_logprobs:
            message = f"Requested prompt logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
            return self._send(handler, 400, json.dumps({"error": {"message": message}}).encode())
        prompts = payload["prompt"]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        choices = []
        for index, prompt in enumerate(prompts):
            if max(prompt) >= self.vocab_size:
                message = f"Token id {max(prompt)} is out of vocabulary"
                return self._send(handler, 400, json.dumps({"error": {"message": message}}).encode())
            entries: list[Any] | None = None
            if k is not None:
                entries = [None]
                for position in range(1, len(prompt)):
                    log_probs = self.log_probs(prompt[position - 1])
                    if self.fail == "logits":
                        log_probs = self.table[prompt[position - 1]]
                    actual = prompt[position]
                    rank = int((log_probs > log_probs[actual]).sum()) + 1
                    entry = {str(actual): {"logprob": float(log_probs[actual]), "rank": rank, "decoded_token": "x"}}
                    values, ids = log_probs.topk(k)
                    for r, (value, token) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
                        entry[str(token)] = {"logprob": value, "rank": r, "decoded_token": "x"}
                    entries.append(entry)
            if k is not None:
                self.scored_rows += 1
                choices.append({"index": index, "text": "", "finish_reason": "length", "prompt_logprobs": entries})
                continue
            # Generation: sample j of prompt i is j + 1 copies of the prompt's last id, text "i.j".
            for sample in range(payload.get("n", 1)):
                length = min(sample + 1, payload["max_tokens"])
                choices.append(
                    {
                        "index": len(choices),
                        "text": f"{index}.{sample}",
                        "token_ids": [prompt[-1]] * length,
                        "finish_reason": "length" if length == payload["max_tokens"] else "stop",
                    }
                )
        return self._send(handler, 200, json.dumps({"model": self.model, "choices": choices}).encode())
