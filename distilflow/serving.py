"""Client of a model served by vLLM's OpenAI-compatible HTTP API: JSON requests with bounded retries,
and the identity checks that a served model is the one the config names.

Stdlib only (``urllib``): no new dependency. Facts this relies on (vLLM 0.32, read in its serving code
and checked against a running server in tests/vllm/):

- ``GET /v1/models`` lists the served names (``--served-model-name``, default the model path) with
  ``max_model_len``; a request naming another model is answered 404.
- ``POST /tokenize`` ``{"model", "prompt", "add_special_tokens"}`` answers ``{"tokens": [...]}``.
- A prompt given as token ids is accepted when every id is at most
  ``max(tokenizer's largest id, model vocab_size - 1)``, else 400 "Token id N is out of vocabulary":
  two one-token requests pin the served vocabulary size.
- 4xx answers are the request's fault (retrying cannot help); 5xx, a refused or dropped connection,
  a timeout and a body that is not the expected JSON are retried.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distilflow.errors import UserError

# Text whose tokenization must agree between the local tokenizer and the server's: code, digits,
# whitespace runs, accents, CJK and an emoji (byte fallback), so that a different vocabulary, merge
# list or normaliser shows.
PROBE_TEXT = "def probe(x_1, y):\n    return {'naïve': x_1 ** 2}  # été 中文 🙂 0123456789\t\tend"


class MalformedResponse(ValueError):
    """A 2xx answer whose body is not what was asked for (retried like a 5xx)."""


class ClientError(UserError):
    """A 4xx answer: the request is wrong for this server (not retried)."""

    def __init__(self, message: str, *, code: int, detail: str) -> None:
        super().__init__(message)
        self.code, self.detail = code, detail


def one_line(text: str, limit: int = 300) -> str:
    """``text`` with its whitespace runs collapsed, cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _detail(raw: bytes) -> str:
    """The message of an error body (vLLM: ``{"error": {"message": ...}}``), else the raw text."""
    try:
        body = json.loads(raw)
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail", body)
    except (ValueError, AttributeError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")
    return one_line(message)


class Server:
    """JSON over HTTP to one server, each request tried ``1 + max_retries`` times.

    ``timeout_s`` bounds each wait of one try (connecting, and each read of the answer); between tries
    the client sleeps ``backoff_s * 2**i`` (capped at 30 s). After the last try: one :class:`UserError`
    line naming the URL and the last error. ``what`` names the server's role in messages.
    """

    def __init__(
        self, url: str, *, timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5, what: str = "server"
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"{what} url '{url}' must start with http:// or https://")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise UserError(
                f"{what}: timeout_s must be > 0, max_retries and backoff_s >= 0; "
                f"got {timeout_s}, {max_retries}, {backoff_s}"
            )
        self.url, self.what = url.rstrip("/"), what
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s

    def get(self, path: str, parse: Callable[[Any], Any] = lambda body: body) -> Any:
        return self._request(path, None, parse)

    def post(self, path: str, payload: dict[str, Any], parse: Callable[[Any], Any] = lambda body: body) -> Any:
        """POST ``payload`` as JSON; ``parse(body)`` turns the decoded answer into the result and raises
        :class:`MalformedResponse` (or KeyError / TypeError / IndexError / ValueError) on a wrong one."""
        return self._request(path, json.dumps(payload).encode(), parse)

    def _request(self, path: str, data: bytes | None, parse: Callable[[Any], Any]) -> Any:
        url = self.url + path
        last = "no try was made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:  # before URLError: HTTPError is one
                detail = _detail(error.read())
                if error.code >= 500 or error.code in (408, 429):
                    last = f"HTTP {error.code}: {detail}"
                    continue
                raise ClientError(
                    f"{self.what} at {url} refused the request: HTTP {error.code}: {detail}",
                    code=error.code,
                    detail=detail,
                ) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                # Refused / reset / dropped connections, timeouts (socket.timeout is an OSError).
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
                continue
            try:
                return parse(json.loads(raw))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
                last = f"malformed response: {type(error).__name__}: {error}"
        raise UserError(
            f"{self.what} at {url} gave no valid answer in {self.max_retries + 1} tries "
            f"(timeout {self.timeout_s:g} s each); last error: {one_line(last)}"
        )


@dataclass
class ServedModel:
    """What ``GET /v1/models`` says of the model that requests name."""

    name: str
    max_model_len: int | None


def served_model(server: Server, model: str | None) -> ServedModel:
    """The served model called ``model`` (or the only one served when ``model`` is None)."""

    def parse(body: Any) -> list[dict[str, Any]]:
        cards = body["data"]
        if not isinstance(cards, list) or not all(isinstance(c, dict) and isinstance(c["id"], str) for c in cards):
            raise MalformedResponse("'data' is not a list of models")
        return cards

    cards = server.get("/v1/models", parse)
    names = [card["id"] for card in cards]
    if model is None:
        if len(cards) != 1:
            raise UserError(f"{server.what} at {server.url} serves {names or 'no model'}; name one in the config")
        card = cards[0]
    else:
        matching = [card for card in cards if card["id"] == model]
        if not matching:
            raise UserError(f"{server.what} at {server.url} serves {names}, not '{model}'; fix the model name")
        card = matching[0]
    length = card.get("max_model_len")
    return ServedModel(card["id"], int(length) if isinstance(length, int) else None)


def check_tokenizer(server: Server, model: str, tokenizer: Any) -> None:
    """UserError unless the server tokenizes :data:`PROBE_TEXT` (plus the special tokens) as ``tokenizer`` does."""
    specials = "".join(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    text = PROBE_TEXT + specials
    local = list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def parse(body: Any) -> list[int]:
        tokens = body["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise MalformedResponse("'tokens' is not a list of ids")
        return tokens

    remote = server.post("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False}, parse)
    if remote != local:
        at = next((i for i, (a, b) in enumerate(zip(remote, local)) if a != b), min(len(remote), len(local)))
        raise UserError(
            f"{server.what} at {server.url} ('{model}') tokenizes a probe text differently from the local tokenizer "
            f"(first difference at token {at} of {len(local)}: server {remote[at : at + 3]}, "
            f"local {local[at : at + 3]}); "
            "teacher and student must share a tokenizer"
        )


def check_vocab_size(server: Server, model: str, vocab_size: int) -> None:
    """UserError unless the served model's vocabulary has exactly ``vocab_size`` ids.

    vLLM accepts a prompt id ``i`` iff ``i <= max(tokenizer's largest id, vocab_size - 1)``: id
    ``vocab_size - 1`` must be accepted and id ``vocab_size`` refused as out of vocabulary. A server
    started with ``--skip-tokenizer-init`` checks no ids (one past the vocabulary kills its engine):
    it is refused first (its ``/tokenize`` answers 400).
    """

    try:  # a server without its tokenizer does not validate ids: the probe past the end would kill it
        server.post("/tokenize", {"model": model, "prompt": "a", "add_special_tokens": False})
    except ClientError as error:
        if "skip_tokenizer_init" in error.detail:
            raise UserError(
                f"{server.what} at {server.url} runs without its tokenizer (--skip-tokenizer-init): it cannot "
                "check token ids or the vocabulary size; start it without that flag"
            ) from None
        raise

    def accepted(token_id: int) -> bool:
        try:
            server.post("/v1/completions", {"model": model, "prompt": [token_id], "max_tokens": 1, "temperature": 0})
        except ClientError as error:
            if error.code == 400 and "out of vocabulary" in error.detail:
                return False
            raise
        return True

    if not accepted(vocab_size - 1):
        raise UserError(
            f"{server.what} at {server.url} ('{model}') refuses token id {vocab_size - 1}: it has fewer than "
            f"{vocab_size} vocabulary ids (the local model has {vocab_size})"
        )
    if accepted(vocab_size):
        raise UserError(
            f"{server.what} at {server.url} ('{model}') accepts token id {vocab_size}: it has more than "
            f"{vocab_size} vocabulary ids (the local model has {vocab_size})"
        )
