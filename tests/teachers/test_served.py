"""The served-teacher client against a local stub of vLLM's API: parsing into the sparse top-k
representation (checked against torch.topk of the stub's own table), retries and their bounds, and
the one-line errors. tests/vllm/ runs the same client against a real vLLM server."""

from __future__ import annotations

import math
import time

import pytest
import torch
from vllm_stub import StubVllm

from distilflow.errors import UserError
from distilflow.serving import Server, check_tokenizer, check_vocab_size, served_model
from distilflow.teachers.served_client import TeacherClient

K = 5


@pytest.fixture
def stub():
    server = StubVllm()
    yield server
    server.close()


def teacher(stub: StubVllm, **kwargs) -> TeacherClient:
    options = {"model": stub.model, "top_k": K, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, **kwargs}
    return TeacherClient(stub.url, **options)


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded rows of lengths 6, 3 and 0 (width 6); pad id 1."""
    input_ids = torch.tensor([[3, 7, 7, 0, 12, 39], [5, 9, 2, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    attention_mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6])
    return input_ids, attention_mask


def expected_topk(stub: StubVllm, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: torch.topk of log_softmax(table[token t]) for every position t whose next token is real."""
    batch, width = input_ids.shape
    ids = torch.zeros(batch, width - 1, K, dtype=torch.long)
    values = torch.full((batch, width - 1, K), -math.inf)
    for row in range(batch):
        for position in range(width - 1):
            if attention_mask[row, position + 1]:
                top = stub.log_probs(int(input_ids[row, position])).topk(K)
                values[row, position], ids[row, position] = top.values, top.indices
    return ids, values


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_topk_matches_the_reference_and_marks_padding(stub):
    input_ids, attention_mask = rows()
    signals = teacher(stub).topk(input_ids, attention_mask)
    ids, values = expected_topk(stub, input_ids, attention_mask)
    assert signals.kind == "topk" and signals.temperature == 1.0
    assert signals.ids.shape == signals.values.shape == (3, 5, K)
    assert signals.values.dtype == torch.float32 and signals.ids.dtype == torch.int64
    torch.testing.assert_close(signals.ids, ids)
    # The stub's JSON carries Python floats of float32 values: exact after the round trip.
    torch.testing.assert_close(signals.values, values, rtol=0, atol=0)
    # The actual next token was outside the top k somewhere, so k + 1 entries were parsed there.
    sent = [hit for hit in stub.hits if hit == "/v1/completions"]
    assert len(sent) == 1  # one request for the batch; the empty row is not sent
    outside = any(
        int(input_ids[r, t + 1]) not in ids[r, t].tolist()
        for r in range(2)
        for t in range(5)
        if attention_mask[r, t + 1]
    )
    assert outside


def test_kd_loss_from_the_stub_equals_the_loss_from_its_table(stub):
    from distilflow.losses.sparse import SparseTeacher, topk_divergence

    input_ids, attention_mask = rows()
    signals = teacher(stub).topk(input_ids, attention_mask)
    ids, values = expected_topk(stub, input_ids, attention_mask)
    student_logits = torch.randn(3, 5, stub.vocab_size, generator=torch.Generator().manual_seed(1))
    mask = attention_mask[:, 1:].bool()
    served = topk_divergence(student_logits, signals, mask=mask)
    reference = topk_divergence(student_logits, SparseTeacher(ids, values, "topk", 1.0), mask=mask)
    assert torch.isfinite(served) and served > 0
    torch.testing.assert_close(served, reference)


def test_prefetch_runs_in_a_worker_thread(stub):
    input_ids, attention_mask = rows()
    with teacher(stub) as client:
        pending = client.prefetch(input_ids, attention_mask)
        input_ids.fill_(0)  # the caller may reuse its buffers: prefetch copied them
        signals = pending.result(timeout=10)
    ids, _ = expected_topk(stub, *rows())
    torch.testing.assert_close(signals.ids, ids)


@pytest.mark.parametrize("mode", ["500", "garbage", "drop"])
def test_failing_server_is_retried_a_bounded_number_of_times(stub, mode):
    stub.fail = mode
    input_ids, attention_mask = rows()
    client = teacher(stub)
    client.topk(input_ids[:0], attention_mask[:0])  # reads /v1/models (never failed by the stub)
    with pytest.raises(UserError) as excinfo:
        client.topk(input_ids, attention_mask)
    message = one_line_error(excinfo)
    assert stub.hits.count("/v1/completions") == 3  # 1 + max_retries
    assert f"{stub.url}/v1/completions" in message and "3 tries" in message
    expected = {"500": "HTTP 500: engine died", "garbage": "malformed response", "drop": "RemoteDisconnected"}[mode]
    assert expected in message


def test_transient_failures_then_success(stub):
    stub.fail, stub.fail_count = "500", 2
    input_ids, attention_mask = rows()
    signals = teacher(stub).topk(input_ids, attention_mask)
    assert stub.hits.count("/v1/completions") == 3
    torch.testing.assert_close(signals.ids, expected_topk(stub, input_ids, attention_mask)[0])


def test_hanging_server_times_out_each_try(stub):
    stub.fail = "hang"
    client = teacher(stub, timeout_s=0.3, max_retries=1)
    client.info = served_model(client.server, stub.model)
    began = time.monotonic()
    with pytest.raises(UserError) as excinfo:
        client.topk(*rows())
    elapsed = time.monotonic() - began
    message = one_line_error(excinfo)
    assert "timed out" in message and "2 tries" in message and "timeout 0.3 s" in message
    assert stub.hits.count("/v1/completions") == 2
    assert 0.6 <= elapsed < 5.0


def test_nothing_listening_is_one_line():
    server = StubVllm()
    url = server.url
    server.close()  # the port is free again: connections are refused
    client = TeacherClient(url, model="x", top_k=K, max_retries=1, backoff_s=0.01)
    with pytest.raises(UserError) as excinfo:
        client.topk(*rows())
    message = one_line_error(excinfo)
    assert f"{url}/v1/models" in message and "Connection refused" in message


def test_wrong_model_name_is_refused_without_retries(stub):
    client = TeacherClient(stub.url, model="llama-70b", top_k=K, max_retries=3, backoff_s=0.01)
    with pytest.raises(UserError) as excinfo:
        client.check()
    assert "serves ['stub-teacher'], not 'llama-70b'" in one_line_error(excinfo)
    assert stub.hits == ["/v1/models"]


def test_k_above_the_servers_max_logprobs_names_the_flag(stub):
    with pytest.raises(UserError) as excinfo:
        teacher(stub, top_k=21).topk(*rows())
    message = one_line_error(excinfo)
    assert "HTTP 400" in message and "--max-logprobs 21" in message
    assert stub.hits.count("/v1/completions") == 1  # a 4xx is not retried


def test_server_sending_logits_is_refused(stub):
    stub.fail = "logits"
    with pytest.raises(UserError) as excinfo:
        teacher(stub).topk(*rows())
    assert "not log-probabilities" in one_line_error(excinfo)


def test_temperature_other_than_one_is_refused(stub):
    with pytest.raises(UserError) as excinfo:
        teacher(stub, temperature=2.0)
    assert "temperature 1 only" in one_line_error(excinfo)


def test_mask_with_holes_is_refused(stub):
    input_ids, attention_mask = rows()
    attention_mask[0, 2] = 0
    with pytest.raises(UserError) as excinfo:
        teacher(stub).topk(input_ids, attention_mask)
    assert "holes" in one_line_error(excinfo)


def test_rows_longer_than_the_server_takes_are_refused_before_sending(stub):
    input_ids = torch.zeros(1, 64, dtype=torch.long)  # 64 tokens + 1 generated > max_model_len 64
    with pytest.raises(UserError) as excinfo:
        teacher(stub).topk(input_ids, torch.ones_like(input_ids))
    assert "lower data.seq_len to at most 63" in one_line_error(excinfo)
    assert "/v1/completions" not in stub.hits


def test_ids_outside_the_checked_vocabulary_are_refused_before_sending(stub):
    client = teacher(stub)
    client.check(vocab_size=stub.vocab_size)
    input_ids, attention_mask = rows()
    input_ids[1, 1] = stub.vocab_size
    sent = stub.hits.count("/v1/completions")
    with pytest.raises(UserError) as excinfo:
        client.topk(input_ids, attention_mask)
    assert "token id 40 is outside the teacher's 40-id vocabulary" in one_line_error(excinfo)
    assert stub.hits.count("/v1/completions") == sent


def test_vocabulary_size_check(stub):
    server = Server(stub.url, max_retries=0)
    check_vocab_size(server, stub.model, stub.vocab_size)
    for wrong, word in ((stub.vocab_size + 1, "fewer"), (stub.vocab_size - 1, "more")):
        with pytest.raises(UserError) as excinfo:
            check_vocab_size(server, stub.model, wrong)
        assert f"{word} than {wrong} vocabulary ids" in one_line_error(excinfo)
    stub.tokenize_ids = "skip"
    sent = stub.hits.count("/v1/completions")
    with pytest.raises(UserError) as excinfo:
        check_vocab_size(server, stub.model, stub.vocab_size)
    assert "--skip-tokenizer-init" in one_line_error(excinfo)
    assert stub.hits.count("/v1/completions") == sent  # no id probe sent to a server that would die of it


def test_tokenizer_check(stub):
    class Tokenizer:
        all_special_tokens = ["<eos>"]

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [4, 5, 6]}

    server = Server(stub.url, max_retries=0)
    stub.tokenize_ids = [4, 5, 6]
    check_tokenizer(server, stub.model, Tokenizer())
    stub.tokenize_ids = [4, 9, 6]
    with pytest.raises(UserError) as excinfo:
        check_tokenizer(server, stub.model, Tokenizer())
    assert "first difference at token 1 of 3: server [9, 6], local [5, 6]" in one_line_error(excinfo)
