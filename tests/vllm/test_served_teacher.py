"""The served teacher against a real vLLM CPU server: its top-k log-probabilities and the KD loss
from them equal the same model's in this process (transformers), identity checks, and a server that
stops mid-run.

Tolerance: both sides compute in float32 from the same weights, with different kernels (vLLM's CPU
attention and GEMMs vs PyTorch's). A log-probability is a few dot products deep (hidden 128, MLP 344,
2 layers); float32 summation-order error of a length-n dot product is bounded by about n * 2^-24
relative to the sum of |terms| (344 * 6e-8 = 2e-5), compounded over the layers and the log-softmax
of values of magnitude ~10-50. ATOL = 1e-4 sits above that bound and far below the gaps the
test model's top-k values have (weights of std 0.5: peaked distributions); observed: ~1e-6.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import torch

from distilflow.data.cache_writer import encode
from distilflow.data.stdlib_corpus import stdlib_root, train_tokenizer
from distilflow.errors import UserError
from distilflow.losses.sparse import SparseTeacher, topk_divergence
from distilflow.teachers.served_client import TeacherClient

from .launch import MAX_LOGPROBS, MODEL_NAME

ATOL = 1e-4
K = 20
PAD = 1


@pytest.fixture(scope="module")
def batch(served_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Four right-padded rows of real text (lengths 48, 30, 17, 2) of width 48."""
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8")
    ids = served_tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.full((4, 48), PAD, dtype=torch.long)
    attention_mask = torch.zeros(4, 48, dtype=torch.long)
    for row, length in enumerate((48, 30, 17, 2)):
        input_ids[row, :length] = torch.tensor(ids[row * 50 : row * 50 + length])
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def local_log_probs(model, input_ids, attention_mask) -> torch.Tensor:
    """Shifted log-probabilities ``(B, T - 1, V)`` of the model in this process (position t predicts t + 1)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def served(vllm_server, **kwargs) -> TeacherClient:
    return TeacherClient(vllm_server.url, **{"model": MODEL_NAME, "top_k": K, "timeout_s": 60, **kwargs})


def test_served_topk_equals_local_log_softmax_topk(vllm_server, reference_model, batch):
    input_ids, attention_mask = batch
    signals = served(vllm_server).topk(input_ids, attention_mask)
    log_probs = local_log_probs(reference_model, input_ids, attention_mask)
    local_values, local_ids = log_probs.topk(K, dim=-1)  # (B, T - 1, K)
    real = attention_mask[:, 1:].bool()  # positions whose next token is real
    assert int(real.sum()) == 47 + 29 + 16 + 1
    # The served values are the local log-probabilities at the served ids, and they are the local top k.
    at_served = log_probs.gather(-1, signals.ids)
    print(f"served vs local log-probs: max |diff| {(at_served[real] - signals.values[real]).abs().max():.2e}")
    assert (at_served[real] - signals.values[real]).abs().max() < ATOL
    assert (local_values[real] - signals.values[real]).abs().max() < ATOL
    # The ids are the local top k wherever rounding cannot reorder them: as sets where the k-th and
    # (k+1)-th local values are apart, as ordered lists where all consecutive values are.
    ranked = log_probs.topk(K + 1, dim=-1).values
    boundary_clear = (ranked[..., K - 1] - ranked[..., K] > 2 * ATOL) & real
    order_clear = ((ranked[..., :-1] - ranked[..., 1:]).amin(-1) > 2 * ATOL) & real
    assert boundary_clear.sum() >= 0.9 * real.sum() and order_clear.sum() >= 0.5 * real.sum()
    assert torch.equal(signals.ids[boundary_clear].sort(-1).values, local_ids[boundary_clear].sort(-1).values)
    assert torch.equal(signals.ids[order_clear], local_ids[order_clear])
    assert (signals.values[real][..., :-1] >= signals.values[real][..., 1:]).all()  # largest first
    # Padding positions hold the empty distribution.
    assert torch.isneginf(signals.values[~real]).all() and (signals.ids[~real] == 0).all()


def test_kd_loss_from_served_signals_equals_the_local_teachers(vllm_server, reference_model, batch):
    input_ids, attention_mask = batch
    signals = served(vllm_server).topk(input_ids, attention_mask)
    log_probs = local_log_probs(reference_model, input_ids, attention_mask)
    values, ids = log_probs.topk(K, dim=-1)
    local = SparseTeacher(ids, values, "topk", 1.0)
    # The local top-k cache as cache-teacher writes it (float16 log-probs).
    cached = encode(log_probs, fmt="topk", k=K, samples=0, temperature=1.0, generator=None)
    cache = SparseTeacher(cached["ids"].long(), cached["logprobs"].float(), "topk", 1.0)
    student_logits = torch.randn(*log_probs.shape, generator=torch.Generator().manual_seed(0)) * 3
    mask = attention_mask[:, 1:].bool()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        from_server = topk_divergence(student_logits, signals, divergence=divergence, mask=mask)
        from_local = topk_divergence(student_logits, local, divergence=divergence, mask=mask)
        from_cache = topk_divergence(student_logits, cache, divergence=divergence, mask=mask)
        print(
            f"{divergence}: served {float(from_server):.6f} local {float(from_local):.6f} cache {float(from_cache):.6f}"
        )
        assert torch.isfinite(from_server) and from_server > 0
        # Log-probs ATOL apart move each position's divergence by about ATOL (the terms' derivatives in
        # the log-probs are probabilities times O(1) log-ratios): relative 1e-4 of the sum.
        torch.testing.assert_close(from_server, from_local, rtol=1e-4, atol=0)
        # float16 cache values are rounded by up to 2^-12 relative of |log p| (<= ~12 here): ~3e-3.
        torch.testing.assert_close(from_server, from_cache, rtol=1e-2, atol=0)


def test_identity_checks(vllm_server, served_tokenizer, tmp_path):
    info = served(vllm_server).check(tokenizer=served_tokenizer, vocab_size=len(served_tokenizer))
    assert (info.name, info.max_model_len) == (MODEL_NAME, 128)
    assert served(vllm_server, model=None).check().name == MODEL_NAME  # the only model served
    with pytest.raises(UserError, match=r"serves \['tiny-teacher'\], not 'tiny-student'"):
        TeacherClient(vllm_server.url, model="tiny-student", top_k=K).check()
    for wrong in (len(served_tokenizer) - 1, len(served_tokenizer) + 1):
        with pytest.raises(UserError, match="vocabulary ids"):
            served(vllm_server).check(vocab_size=wrong)
    # Another tokenizer (trained on other text): same size, different merges.
    other = train_tokenizer([(stdlib_root() / "shlex.py").read_text(encoding="utf-8")], 320, tmp_path / "other")
    with pytest.raises(UserError, match="tokenizes a probe text differently"):
        served(vllm_server).check(tokenizer=other)
    with pytest.raises(UserError, match=f"--max-logprobs {MAX_LOGPROBS + 1}"):
        TeacherClient(vllm_server.url, model=MODEL_NAME, top_k=MAX_LOGPROBS + 1).check()


def test_request_temperature_does_not_change_prompt_log_probs(vllm_server, batch):
    """The fact the temperature rule rests on: prompt log-probs are the raw log_softmax, the request's
    sampling settings are ignored for them."""
    input_ids, _ = batch

    def ask(**sampling) -> list:
        body = {"model": MODEL_NAME, "prompt": input_ids[0].tolist(), "max_tokens": 1, "prompt_logprobs": 3, **sampling}
        request = urllib.request.Request(
            vllm_server.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["prompt_logprobs"]

    plain = ask(temperature=1.0)
    assert ask(temperature=0.25, top_p=0.5, top_k=2) == plain
    assert plain[0] is None and len(plain) == 48


def test_prefetch_overlaps_local_work(vllm_server, reference_model, batch):
    input_ids, attention_mask = batch
    with served(vllm_server) as teacher:
        pending = teacher.prefetch(input_ids, attention_mask)
        local = local_log_probs(reference_model, input_ids, attention_mask)  # the "training step"
        signals = pending.result(timeout=120)
    real = attention_mask[:, 1:].bool()
    assert (local.gather(-1, signals.ids)[real] - signals.values[real]).abs().max() < ATOL


def test_server_stopped_mid_run_is_one_line(vllm_server, batch):
    """Kept last in this file: it stops the session's server (a later test would start it again)."""
    input_ids, attention_mask = batch
    teacher = served(vllm_server, max_retries=2, backoff_s=0.1)
    assert torch.isfinite(teacher.topk(input_ids, attention_mask).values).any()
    url = vllm_server.url
    vllm_server.stop()
    began = time.monotonic()
    with pytest.raises(UserError) as excinfo:
        teacher.topk(input_ids, attention_mask)
    message = str(excinfo.value)
    assert "\n" not in message and f"{url}/v1/completions" in message
    assert "3 tries" in message and "Connection refused" in message
    assert time.monotonic() - began < 10  # backoff 0.1 + 0.2 s, refused connections answer at once
