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
    # One request per micro-batch (10 steps x 1), every one sent before its loss asked for it (step
    # 0's when the loop asked for its batches, each later one during the step before); none wasted.
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


def test_cache_teacher_from_a_failing_server_resumes_to_the_same_files(
    tiny_lm_args, tmp_path, teacher_folder, stub, capsys
):
    """A server that fails mid-cache stops cache-teacher with one line, its finished shards kept; called
    again, it asks only for the missing shards and ends with the files of an uninterrupted write."""
    small = "cache.shard_rows=64"
    whole = served_args(tiny_lm_args, tmp_path / "a", teacher_folder, stub, small, f"cache.path={tmp_path / 'whole'}")
    assert main(["cache-teacher", *whole]) == 0
    uninterrupted, stub.scoring_requests = stub.scoring_requests, 0
    listed = read_manifest(tmp_path / "whole")["shards"]
    assert len(listed) >= 4
    cut = served_args(tiny_lm_args, tmp_path / "b", teacher_folder, stub, small, f"cache.path={tmp_path / 'cut'}")
    stub.fail_from = uninterrupted - 12  # within the last shards (8 rows a request, 64 rows a shard)
    capsys.readouterr()
    assert main(["cache-teacher", *cut]) == 2
    line = one_error_line(capsys)
    assert f"teacher server at {stub.url}/v1/completions" in line and "HTTP 500: engine died" in line
    kept = read_manifest(tmp_path / "cut")
    assert not kept["complete"] and 0 < len(kept["shards"]) < len(listed)
    stub.fail_from, stub.scoring_requests = None, 0
    assert main(["cache-teacher", *cut]) == 0
    assert stub.scoring_requests == uninterrupted - 8 * len(kept["shards"])  # kept shards are not asked again
    resumed = read_manifest(tmp_path / "cut")
    assert resumed["complete"]
    assert [(s["file"], s["rows"], s["sha256"]) for s in resumed["shards"]] == [
        (s["file"], s["rows"], s["sha256"]) for s in listed
    ]


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


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("distill.temperature=2.0", "temperature 1 only"),
        ("distill.phases=[{name: f, fraction: 1.0, terms: [feature]}]", "'feature' term needs teacher features"),
        ("teacher.server.model=null", "name the served model"),
        ("cache.format=full", "top-k log-probs: topk"),
        ("student.model.hf.init_layers=[0]", "copies teacher weights"),
        ("teacher.server.url=localhost:8000", "http(s)://host:port"),
        ("teacher.model.checkpoint=x.safetensors", "not with teacher.server"),
    ],
)
def test_combinations_a_served_teacher_cannot_do_are_refused_at_load(
    tiny_lm_args, tmp_path, teacher_folder, stub, capsys, override, named
):
    args = served_args(tiny_lm_args, tmp_path, teacher_folder, stub, override)
    capsys.readouterr()
    assert main(["distill", *args]) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    assert stub.hits == []  # refused before the server is asked anything


def test_a_server_that_is_not_the_configured_teacher_is_refused_before_anything_is_written(
    tiny_lm_args, tmp_path, teacher_folder, tokenizer, capsys
):
    cases = [
        (StubVllm(vocab_size=len(tokenizer), tokenizer=tokenizer, model="other"), "not 'stub-teacher'"),
        (StubVllm(vocab_size=len(tokenizer) + 8, tokenizer=tokenizer), "more than 300 vocabulary ids"),
        (StubVllm(vocab_size=len(tokenizer), tokenizer=None), "tokenizes a probe text differently"),
        (StubVllm(vocab_size=len(tokenizer), tokenizer=tokenizer, max_logprobs=K - 1), f"--max-logprobs {K}"),
        (StubVllm(vocab_size=len(tokenizer), tokenizer=tokenizer, max_model_len=32), "lower it to at most 31"),
    ]
    for stub, named in cases:
        try:
            args = served_args(tiny_lm_args, tmp_path, teacher_folder, stub, "teacher.server.model=stub-teacher")
            capsys.readouterr()
            assert main(["run", *args]) == 2
            assert named in one_error_line(capsys)
            assert not (tmp_path / "run").exists()
        finally:
            stub.close()


def test_a_teacher_with_a_padded_vocabulary_is_cut_to_the_students_ids(
    tiny_lm_args, tmp_path, teacher_folder, tokenizer, never_loaded
):
    """Teacher config.json with 320 rows, student with the tokenizer's 300 (the Qwen 152064 / 151936 case):
    the served ids past 300 carry no mass here and move into the tail; distillation runs on 300 columns."""
    padded = make_teacher_folder(tmp_path / "padded", vocab_size=len(tokenizer) + 20)
    stub = StubVllm(vocab_size=len(tokenizer) + 20, tokenizer=tokenizer)
    # Five likely ids per row, every other real id far below the padding rows (which then fill the rest
    # of every top 20 with about 1e-8 of the mass): the cut must move them into the tail, else the loss
    # refuses ids past the student's 300 ("the teacher cache holds vocabulary id ...").
    real = len(tokenizer)
    stub.table[:, :real] = -20.0
    likely = torch.randint(0, real, (stub.vocab_size, 5), generator=torch.Generator().manual_seed(1))
    stub.table.scatter_(1, likely, 10.0)
    stub.table[:, real:] = -8.0
    assert int((stub.log_probs(0).topk(20).indices >= real).sum()) >= 15
    try:
        args = served_args(tiny_lm_args, tmp_path, padded, stub, "teacher.server.top_k=20")
        assert main(["distill", *args, "--no-tensorboard"]) == 0
        assert all(math.isfinite(r["kd"]) for r in student_rows(tmp_path / "run"))
    finally:
        stub.close()
    assert not never_loaded


def test_checked_signals_moves_ids_the_student_lacks_into_the_tail_and_refuses_mass_there():
    from distilflow.errors import UserError
    from distilflow.losses.sparse import SparseTeacher

    probs = torch.tensor([[[0.5, 0.3, 0.0005], [0.6, 0.2, 0.1]]])  # (1, 2, 3): two positions, k = 3
    ids = torch.tensor([[[4, 2, 9], [1, 3, 8]]])
    signals = SparseTeacher(ids, probs.log(), "topk", 1.0)
    whole = torch.ones(1, 3, dtype=torch.long)

    def check(vocab_size: int, mask: torch.Tensor = whole) -> SparseTeacher:
        return served_module.checked_signals(signals, mask, vocab_size=vocab_size, where="teacher server at U")

    same = check(10)  # every id within the student's vocabulary: unchanged
    assert torch.equal(same.ids, ids) and torch.equal(same.values, signals.values)
    cut = check(9)  # id 9 holds 0.0005 <= DROPPED_MASS: moved into the tail (empty slot)
    assert cut.ids.tolist() == [[[4, 2, 0], [1, 3, 8]]]
    assert torch.isneginf(cut.values[0, 0, 2]) and torch.equal(cut.values[0, 1], signals.values[0, 1])
    with pytest.raises(UserError, match=r"probability 0.1 on ids the student lacks \(>= 8\)"):
        check(8)  # id 8 holds 0.1 at a real position
    # Position 1 predicts a padding token: not scored, so its mass does not matter.
    assert check(8, torch.tensor([[1, 1, 0]])).ids[0, 1].tolist() == [1, 3, 0]
    empty = SparseTeacher(ids, torch.full_like(signals.values, -math.inf), "topk", 1.0)
    with pytest.raises(UserError, match="no log-probabilities at 2 positions of real tokens"):
        served_module.checked_signals(empty, whole, vocab_size=10, where="teacher server at U")


class FakeClient:
    """Answers topk from a function of the rows; records the rows of each request in order."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        from distilflow.serving import Server

        self.server, self.model, self.sent = Server("http://fake"), "fake", []
        self._pool = ThreadPoolExecutor(max_workers=1)

    def topk(self, input_ids, attention_mask):
        from distilflow.losses.sparse import SparseTeacher

        self.sent.append(input_ids[:, 0].tolist())
        values = torch.log_softmax(input_ids[:, :-1, None].float().expand(-1, -1, 2) * torch.tensor([1.0, 0.0]), -1)
        return SparseTeacher(torch.stack([input_ids[:, 1:], input_ids[:, 1:] + 1], -1), values, "topk", 1.0)

    def prefetch(self, input_ids, attention_mask):
        return self._pool.submit(self.topk, input_ids, attention_mask)

    def close(self):
        self._pool.shutdown(wait=True)


class Steps:
    """A task whose step s has micro-batches whose first tokens are 10 s + i (i < micro)."""

    per_token, primary_metric, unit = True, "perplexity", "tokens"

    def __init__(self, micro: int):
        self.micro, self.asked = micro, []

    def micro_batches(self, step):
        self.asked.append(step)
        rows = [torch.tensor([[10 * step + i, 3, 4]]) for i in range(self.micro)]
        return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def test_lookahead_sends_the_next_steps_requests_before_the_loop_asks_and_never_answers_wrongly():
    client = FakeClient()
    teacher = served_module.ServedTeacher(client, vocab_size=100, device=torch.device("cpu"))
    task = served_module.Lookahead(Steps(2), teacher, next_step=True, total_steps=3, wanted=lambda step: step != 1)
    batches = task.micro_batches(0)
    # Step 0's two micro-batches and (step 1 uses no teacher) nothing of step 1.
    first = teacher(batches[0], features=False).logits
    assert first.ids[0, :, 0].tolist() == [3, 4] and teacher.ahead_hits == 1
    teacher(batches[1], features=False)
    assert client.sent == [[0], [1]]
    task.micro_batches(1)  # no teacher in this phase; step 2's requests go out now
    client._pool.submit(lambda: None).result()  # let the worker finish what was sent
    assert client.sent == [[0], [1], [20], [21]]
    step2 = task.micro_batches(2)
    assert task.task.asked == [0, 1, 2]  # step 2's batches were made once, ahead, and reused
    # A batch other than the one sent ahead (e.g. changed by the caller) is asked for again.
    other = {"input_ids": torch.tensor([[7, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert teacher(other, features=False).logits.ids[0, :, 0].tolist() == [5, 6]
    assert client.sent[-1] == [7] and teacher.requests == 5
    teacher(step2[0], features=False)  # its request was dropped above (sent before the other batch)
    assert client.sent[-1] == [20] and teacher.requests == 6
    teacher.close()
