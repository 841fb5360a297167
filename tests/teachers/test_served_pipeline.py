"""A served teacher through the commands, against the local stub of vLLM's API (tests/vllm_stub.py): a
bigram teacher whose distribution after token a is log_softmax(table[a]), so every signal and score has
a reference computed from the table here. The teacher folder holds only config.json and a tokenizer
(no weights), and transformers' from_pretrained is made to raise: the teacher is never loaded.
tests/vllm/ runs the same commands against a real vLLM server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from vllm_stub import StubVllm

from distilflow.cli import main
from distilflow.data.cache import read_manifest
from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer
from distilflow.models.build import count_params, forward_macs
from distilflow.models.hf import build_causal_lm, load_tokenizer
from distilflow.teachers import served as served_module

ERROR = "distilflow: error: "
K = 8
KD_PHASES = "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]"


def teacher_config(vocab_size: int) -> dict:
    return tiny_llama_config(vocab_size, hidden=64, layers=2, heads=2, max_positions=64)


def make_teacher_folder(out: Path, *, vocab_size: int | None = None) -> Path:
    """config.json and a 300-id stdlib BPE, nothing else: what a served teacher is known by here."""
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py", "keyword.py")]
    tokenizer = train_tokenizer(texts, 300, out)
    with torch.device("meta"):
        build_causal_lm(teacher_config(vocab_size or len(tokenizer))).config.save_pretrained(out)
    assert not list(out.glob("*.safetensors"))
    return out


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return make_teacher_folder(tmp_path_factory.mktemp("served-teacher"))


@pytest.fixture(scope="module")
def tokenizer(teacher_folder):
    return load_tokenizer(teacher_folder)


@pytest.fixture
def stub(tokenizer):
    server = StubVllm(vocab_size=len(tokenizer), tokenizer=tokenizer, max_model_len=64)
    yield server
    server.close()


@pytest.fixture
def never_loaded(monkeypatch):
    """transformers' from_pretrained raises: any attempt to load teacher weights fails the test."""
    loads = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the served teacher's weights must never be loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    return loads


def served_args(tiny_lm_args, root: Path, folder: Path, stub: StubVllm, *extra: str) -> list[str]:
    return [
        *tiny_lm_args(root),
        f"teacher.model.hf.path={folder}",
        "teacher.model.hf.config={}",
        f"teacher.server.url={stub.url}",
        f"teacher.server.model={stub.model}",
        f"teacher.server.top_k={K}",
        "teacher.server.timeout_s=5",
        "teacher.server.max_retries=1",
        "distill.layer_map=null",
        KD_PHASES,
        "student.train.checkpoint_every=2",
        "deploy.enabled=false",
        "cache.k=6",
        *extra,
    ]


def student_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "student" and "loss" in r]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR), err
    return err[0]


def table_perplexity(stub: StubVllm, rows: dict[str, torch.Tensor]) -> float:
    """The stub teacher's perplexity on rows, from its table: exp(mean -log p(token t+1 | token t))."""
    total, count = 0.0, 0
    for input_ids, labels in zip(rows["input_ids"], rows["labels"]):
        for t in range(len(input_ids) - 1):
            if labels[t + 1] != -100:
                total -= float(stub.log_probs(int(input_ids[t]))[int(input_ids[t + 1])])
                count += 1
    return math.exp(total / count)


def test_distill_from_the_server_never_loads_the_teacher_and_sends_requests_ahead(
    tiny_lm_args, tmp_path, teacher_folder, stub, never_loaded, monkeypatch
):
    made = []
    real_init = served_module.ServedTeacher.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(served_module.ServedTeacher, "__init__", keep)
    args = served_args(tiny_lm_args, tmp_path, teacher_folder, stub, "student.train.log_every=1")
    assert main(["distill", *args, "--no-tensorboard"]) == 0
    assert not never_loaded
    rows = student_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)
    (teacher,) = made
    # One request per micro-batch (10 steps x 1), every one sent ahead of the step that used it
    # except the first; none wasted.
    assert (teacher.requests, teacher.ahead_hits) == (10, 10)
    assert stub.scoring_requests == 10 + 1  # + the preflight's probe of k
    assert stub.last_payload["prompt_logprobs"] == K


def test_run_scores_the_served_teacher_from_the_server(tiny_lm_args, tmp_path, teacher_folder, stub, never_loaded):
    args = served_args(tiny_lm_args, tmp_path, teacher_folder, stub)
    assert main(["run", *args, "--no-tensorboard"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    teacher = results["teacher"]
    assert teacher["loaded_from"] == f"model 'stub-teacher' served at {stub.url}"
    # The reference: the stub's table on the held-out rows the workload scores.
    from distilflow.config import load_config
    from distilflow.workload import make_workload

    work = make_workload(load_config(args[0], args[1:]), torch.device("cpu"))
    expected = table_perplexity(stub, work.held_out)
    assert teacher["perplexity"] == pytest.approx(expected, rel=1e-5)
    # Cost from config.json alone, equal to what the same model with weights gives.
    real = build_causal_lm(teacher_config(len(work.tokenizer)))
    row = {k: v[:1] for k, v in work.probe().items()}
    assert teacher["params"] == count_params(real)
    assert (
        teacher["macs_per_token"]
        == forward_macs(real, lambda m: m(**row, use_cache=False)) // row["input_ids"].shape[1]
    )
    assert results["student"]["params_ratio_to_teacher"] == pytest.approx(
        results["student"]["params"] / teacher["params"]
    )
    assert "served at" in (tmp_path / "run" / "report.md").read_text()
    assert not never_loaded


def test_cache_teacher_from_the_server_holds_the_tables_top_k(tiny_lm_args, tmp_path, teacher_folder, stub):
    args = served_args(tiny_lm_args, tmp_path, teacher_folder, stub, f"cache.path={tmp_path / 'cache'}")
    assert main(["cache-teacher", *args]) == 0
    manifest = read_manifest(tmp_path / "cache")
    ident = manifest["identity"]
    assert manifest["complete"] and ident["teacher_served"] == "stub-teacher" and ident["k"] == 6
    assert ident["tokenizer_sha256"] and ident["teacher_dtype"] is None
    assert manifest["teacher_result"]["perplexity"] > 1
    from distilflow.config import load_config
    from distilflow.workload import make_workload

    rows = make_workload(load_config(args[0], args[1:]), torch.device("cpu")).cache_source().rows
    shard = load_file(tmp_path / "cache" / manifest["shards"][0]["file"])
    count = shard["ids"].shape[0]
    for row in range(count):
        ids, mask = rows["input_ids"][row], rows["attention_mask"][row]
        for t in range(len(ids) - 1):
            if mask[t + 1] and mask[t]:
                top = stub.log_probs(int(ids[t])).topk(6)
                assert torch.equal(shard["ids"][row, t].long(), top.indices)
                torch.testing.assert_close(shard["logprobs"][row, t], top.values.half(), rtol=0, atol=0)
    # A second cache-teacher finds it complete: only the preflight's probe of k is sent.
    sent = stub.scoring_requests
    assert main(["cache-teacher", *args]) == 0
    assert stub.scoring_requests - sent == 1


def test_failing_server_stops_at_the_last_checkpoint_and_the_run_resumes(
    tiny_lm_args, tmp_path, teacher_folder, stub, capsys
):
    reference = served_args(tiny_lm_args, tmp_path / "whole", teacher_folder, stub)
    assert main(["distill", *reference, "--no-tensorboard"]) == 0
    stub.scoring_requests = 0
    # Request 1 is the preflight's probe of k, request n + 1 step n's: steps 1-6 are answered, step 7's fails.
    stub.fail_from = 1 + 7
    args = served_args(tiny_lm_args, tmp_path / "cut", teacher_folder, stub)
    capsys.readouterr()
    assert main(["distill", *args, "--no-tensorboard"]) == 2
    line = one_error_line(capsys)
    checkpoint = tmp_path / "cut" / "run" / "student" / "checkpoint.pt"
    assert f"teacher server at {stub.url}/v1/completions" in line and "HTTP 500: engine died" in line
    assert f"last checkpoint {checkpoint} is kept" in line
    assert checkpoint.is_file() and not (tmp_path / "cut" / "run" / "student" / "result.json").exists()
    assert torch.load(checkpoint, weights_only=True)["step"] == 6  # checkpoint_every 2: steps 2, 4, 6
    stub.fail_from = None
    assert main(["distill", *args, "--no-tensorboard"]) == 0  # called again: resumes at step 7
    whole = load_file(tmp_path / "whole" / "run" / "student" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "run" / "student" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
