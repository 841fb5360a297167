"""The causal-LM path end to end through the CLI: the stdlib demo, local Hugging Face folders, vocabulary
checks and clean errors. Models and tokenizers are tiny and made in temp folders; nothing is downloaded."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.data.stdlib_corpus import load_stdlib_corpus, stdlib_root, train_tokenizer
from distilflow.models.hf import VocabNotice, build_causal_lm
from distilflow.models.layers import decoder_layers
from distilflow.tasks.causal_lm_workload import CausalLMWorkload

from .conftest import family_config

STAGES = ("teacher", "baseline", "student")
ERROR = "distilflow: error: "
CPU = torch.device("cpu")
PHASES = ("feature_alignment", "soft_label_pretrain", "joint_optimization")


def _llama_params(vocab: int, hidden: int, layers: int, intermediate: int | None = None) -> int:
    """Parameters of a tied Llama without grouped-query attention (intermediate default 2 x hidden), by hand."""
    intermediate = intermediate or 2 * hidden
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden  # q k v o, gate up down, 2 norms
    return vocab * hidden + layers * per_layer + hidden  # embedding (= lm_head), layers, final norm


def _nll_of_rows(model, rows: list[list[int]], scored_from: list[int], vocab: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens ``row[t]`` for ``t >= scored_from``, and how many, by hand."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, start in zip(rows, scored_from):
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
            log_probs = torch.log_softmax(logits[:, :vocab] if vocab else logits, dim=-1)
            for t in range(max(start, 1), len(ids)):
                nll -= float(log_probs[t - 1, ids[t]])
                count += 1
    return nll, count


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the built-in stdlib demo, made tiny


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory, tiny_lm_args) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("lm_stdlib")
    args = [
        *tiny_lm_args(root),
        "teacher.train.eval_every=3",
        "teacher.train.log_every=2",
        "teacher.train.checkpoint_every=3",
        "student.train.log_every=1",
        "student.train.checkpoint_every=5",
        "deploy.enabled=false",  # tests/deploy covers the deploy stage of this run
    ]
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return root / "run", args


def test_stdlib_run_results(stdlib_run):
    run_dir, _ = stdlib_run
    results = json.loads((run_dir / "results.json").read_text())
    vocab = len(AutoTokenizer.from_pretrained(run_dir / "student" / "hf", local_files_only=True))
    assert 259 < vocab <= 300  # 256 bytes + 3 specials + merges, at most data.stdlib.vocab_size
    for stage in STAGES:
        r = results[stage]
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, stage
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9), stage
        assert r["perplexity"] < vocab * 2, stage  # barely trained, but not worse than about uniform
        assert isinstance(r["macs_per_token"], int) and r["macs_per_token"] > 0, stage
    assert results["teacher"]["params"] == _llama_params(vocab, 32, 2)
    assert results["student"]["params"] == results["baseline"]["params"] == _llama_params(vocab, 16, 1)
    assert results["student"]["params_ratio_to_teacher"] == results["student"]["params"] / results["teacher"]["params"]
    # MACs per token: at least every linear layer (lm_head included); attention scores may add 2 * T * H a layer.
    for stage, hidden, layers in (("teacher", 32, 2), ("student", 16, 1)):
        linear = layers * (4 * hidden * hidden + 3 * hidden * 2 * hidden) + vocab * hidden
        assert linear <= results[stage]["macs_per_token"] <= linear + layers * 2 * 32 * hidden, stage
    assert (results["teacher"]["steps"], results["student"]["steps"]) == (6, 10)
    report = (run_dir / "report.md").read_text()
    assert "perplexity" in report.lower()
    for stage in STAGES:
        assert f"{results[stage]['perplexity']:.2f}" in report or f"{results[stage]['perplexity']:.1f}" in report


def test_stdlib_student_hf_folder_loads_and_matches_the_weights(stdlib_run):
    run_dir, _ = stdlib_run
    hf = run_dir / "student" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 16
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf, local_files_only=True)).eval()
    fresh.load_state_dict(load_file(run_dir / "student" / "model.safetensors"))
    ids = torch.tensor([tokenizer("def heappush(heap, item):\n    heap.append(item)")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=1e-6)

    # The perplexity in results.json, recomputed by hand: held-out documents, each ending in EOS, packed
    # into rows of seq_len tokens (the last partial row dropped); every token but a row's first is scored.
    corpus = load_stdlib_corpus(train_chars=20000, eval_chars=5000)
    stream = [i for text in corpus.eval for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    rows = [stream[start : start + 32] for start in range(0, len(stream) - 31, 32)]
    nll, count = _nll_of_rows(model, rows, [1] * len(rows))
    assert count == len(rows) * 31
    results = json.loads((run_dir / "results.json").read_text())
    assert results["student"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_stdlib_metrics_rows(stdlib_run):
    run_dir, _ = stdlib_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["stage"] == "student" and "loss" in r]
    assert [r["step"] for r in student] == list(range(1, 11))
    assert [r["phase"] for r in student] == [PHASES[0]] * 2 + [PHASES[1]] * 5 + [PHASES[2]] * 3
    parts = [sorted(k for k in ("feature", "kd", "ce") if k in r) for r in student]
    assert parts == [["feature"]] * 2 + [["kd"]] * 5 + [["ce", "kd"]] * 3
    for r in student:
        expected = {"feature": 1.0, "kd": r["kd_weight"], "ce": 0.3}
        total = sum(expected[k] * r[k] for k in ("feature", "kd", "ce") if k in r)
        assert r["loss"] == pytest.approx(total, rel=1e-6)
        assert r["tokens_per_s"] > 0
    evals = [r for r in rows if r["stage"] == "student" and "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [5, 10]
    final = json.loads((run_dir / "results.json").read_text())["student"]["perplexity"]
    assert evals[-1]["eval_perplexity"] == final
    assert {r["stage"] for r in rows} == set(STAGES)
    assert (run_dir / "student" / "heads.safetensors").is_file()
    # Diagnostics (issue 18): per decoder-layer pair similarity in the feature phase, per-token agreement after.
    for r in student[:2]:
        pairs = [k for k in r if k.startswith("feature_cos/model.layers.")]
        assert pairs and all(-1 <= r[k] <= 1 for k in pairs)
    assert all(0 <= r["agreement"] <= 1 for r in student[2:]) and all("grad_norm" in r for r in student)
    assert "diagnosis" in json.loads((run_dir / "results.json").read_text())


def test_stdlib_eval_prints_the_perplexities(stdlib_run, capsys):
    run_dir, args = stdlib_run
    code, out, err = _run(["eval", *args], capsys)
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    printed = json.loads(out.strip().splitlines()[-1])
    for stage in STAGES:
        assert printed[stage]["perplexity"] == pytest.approx(results[stage]["perplexity"], rel=1e-6), stage
        assert printed[stage]["params"] == results[stage]["params"]
        assert re.search(rf"^{stage}\s+{results[stage]['perplexity']:.4f}\s", out, re.M), out
    assert out.splitlines()[0].split()[:2] == ["model", "perplexity"]


# ---------------------------------------------------------------- local Hugging Face folders and JSONL data

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def _records() -> list[dict[str, str]]:
    """40 distinct prompt/completion pairs of different lengths."""
    return [
        {
            "prompt": f"#{i} " + " ".join(WORDS[: i % 3 + 1]),
            "completion": " " + " ".join(WORDS[i % 7 : i % 7 + i % 4 + 1]),
        }
        for i in range(40)
    ]


def _save(folder: Path, tokenizer, *, layers: int, hidden: int, extra_rows: int = 0) -> Path:
    torch.manual_seed(0)
    model = build_causal_lm(family_config("llama", len(tokenizer), layers=layers, hidden=hidden))
    if extra_rows:
        model.resize_token_embeddings(len(tokenizer) + extra_rows, mean_resizing=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Teacher (2 layers, width 32) and student (1 layer, width 16) folders, variants, and JSONL files."""
    root = tmp_path_factory.mktemp("lm_hf")
    paths = {
        "teacher": _save(root / "teacher", tokenizer, layers=2, hidden=32),
        "student": _save(root / "student", tokenizer, layers=1, hidden=16),
        "wide_student": _save(root / "wide_student", tokenizer, layers=1, hidden=16, extra_rows=64),
    }
    # Another tokenizer of the same size, trained on other text: it differs from ours at some ids.
    other = train_tokenizer([(stdlib_root() / "textwrap.py").read_text(encoding="utf-8")], 320, root / "other_tok")
    paths["foreign_student"] = _save(root / "foreign_student", other, layers=1, hidden=16)
    paths["data"] = root / "data.jsonl"
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return paths


def _text_args(hf: dict[str, Path], out: Path, *, student: str = "student") -> list[str]:
    return [
        f"output_dir={out}",
        "data.source=text",
        f"data.text.path={hf['data']}",
        "data.text.test_fraction=0.25",
        "data.text.seq_len=48",
        "data.text.pack=false",
        "threads=1",
        "teacher.model.arch=hf",
        f"teacher.model.hf.path={hf['teacher']}",
        "student.model.arch=hf",
        f"student.model.hf.path={hf[student]}",
        "distill.layer_map=uniform",
        "distill.feature_layers=[]",
        "teacher.train.warmup_steps=0",
        "student.train.steps=6",
        "student.train.batch_size=4",
        "student.train.warmup_steps=1",
        "student.train.eval_every=3",
        "student.train.log_every=1",
        "student.train.checkpoint_every=3",
        "deploy.enabled=false",
    ]


@pytest.fixture(scope="module")
def text_run(hf, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("lm_text") / "run"
    args = _text_args(hf, out)
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return out, args


def _texts(tokenizer, rows: dict[str, torch.Tensor]) -> list[str]:
    """The text of each token row (its real tokens, special tokens left out)."""
    return [
        tokenizer.decode(ids[mask == 1], skip_special_tokens=True)
        for ids, mask in zip(rows["input_ids"], rows["attention_mask"])
    ]


def _held_out_by_hand(tokenizer, held_texts: set[str]) -> tuple[list[list[int]], list[int]]:
    """Token rows (prompt + completion + EOS) and where their completions start, of the held-out records."""
    rows, starts = [], []
    for record in _records():
        if record["prompt"] + record["completion"] in held_texts:
            prompt = tokenizer(record["prompt"])["input_ids"]
            rows.append(prompt + tokenizer(record["completion"])["input_ids"] + [tokenizer.eos_token_id])
            starts.append(len(prompt))
    return rows, starts


def test_text_run_with_local_folders(text_run, hf, tokenizer):
    out, args = text_run
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"]["steps"] == 0 and results["teacher"]["loaded_from"] == str(hf["teacher"])
    assert not (out / "teacher" / "model.safetensors").exists()  # a given teacher is used as it is
    intermediate = family_config("llama", len(tokenizer), hidden=16)["intermediate_size"]
    assert results["student"]["params"] == _llama_params(len(tokenizer), 16, 1, intermediate)

    # Held out by fraction: a quarter of the records, one padded row each, disjoint from training.
    work = CausalLMWorkload(load_config(None, args), CPU)
    held, train = _texts(tokenizer, work.held_out), _texts(tokenizer, work.train)
    everything = {r["prompt"] + r["completion"] for r in _records()}
    assert (len(held), len(train)) == (10, 30)
    assert set(held) | set(train) == everything and not set(held) & set(train)

    # The loaded teacher's perplexity on those records, by hand from its folder.
    teacher = AutoModelForCausalLM.from_pretrained(hf["teacher"], local_files_only=True).eval()
    rows, starts = _held_out_by_hand(tokenizer, set(held))
    assert max(map(len, rows)) <= 48  # nothing was truncated
    nll, count = _nll_of_rows(teacher, rows, starts)
    assert results["teacher"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)

    student = AutoModelForCausalLM.from_pretrained(out / "student" / "hf", local_files_only=True).eval()
    nll, count = _nll_of_rows(student, rows, starts)
    assert results["student"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in metrics if r["stage"] == "student" and "loss" in r]
    assert phases == [PHASES[0]] + [PHASES[1]] * 3 + [PHASES[2]] * 2


def test_text_run_student_from_hf_config_and_teacher_layers(hf, tokenizer, tmp_path):
    width = family_config("llama", len(tokenizer), hidden=32)
    student_config = {k: width[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads")}
    student_config |= {"num_hidden_layers": 1, "max_position_embeddings": 64, "tie_word_embeddings": True}
    args = [
        a for a in _text_args(hf, tmp_path / "run") if not a.startswith(("student.model.hf.path", "distill.layer_map"))
    ]
    args += [f"student.model.hf.config={json.dumps(student_config)}", "student.model.hf.init_layers=[1]"]
    args += ["distill.layer_map=[[0, 1]]"]
    assert main(["run", *args, "--no-tensorboard"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(hf["teacher"], local_files_only=True)
    layer = sum(p.numel() for p in teacher.model.layers[1].parameters())
    assert results["teacher"]["params"] - results["student"]["params"] == layer  # one of two equal layers fewer

    # The student starts as the teacher's embeddings, final norm and layer 1; vocab and ids from the tokenizer.
    work = CausalLMWorkload(load_config(None, args), CPU)
    student = work.new_model("student", work.new_model("teacher"))
    assert student.config.vocab_size == len(tokenizer) and student.config.eos_token_id == tokenizer.eos_token_id
    assert decoder_layers(student) == ["model.layers.0"]
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        source = name.replace("model.layers.0.", "model.layers.1.")
        assert torch.equal(param, teacher_params[source]), name


def test_bf16_teacher_runs_in_bf16_and_its_kd_matches_a_float_reference(hf, tmp_path):
    args = [*_text_args(hf, tmp_path / "run"), "teacher.model.dtype=bfloat16"]
    work = CausalLMWorkload(load_config(None, args), CPU)
    teacher = work.new_model("teacher")
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert main(["run", *args, "--no-tensorboard"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r.get("stage") == "student" and "kd" in r]
    assert kd and all(math.isfinite(v) and v >= 0 for v in kd)
    # The bf16 teacher's logits, upcast, differ from the float32 teacher's by bf16 rounding only.
    batch = {k: v[:2] for k, v in work.train.items()}
    with torch.no_grad():
        low = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        full = AutoModelForCausalLM.from_pretrained(hf["teacher"], local_files_only=True, dtype=torch.float32)
        high = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert low.dtype == torch.float32 and (low - high).abs().max() < 0.05 * high.abs().max()


def test_jsonl_line_that_is_not_json_can_be_skipped(hf, tmp_path, capsys):
    lines = [json.dumps(r) for r in _records()]
    lines.insert(3, '{"prompt": "a", "completion": ')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = [a for a in _text_args(hf, tmp_path / "run") if not a.startswith("data.text.path")] + [
        f"data.text.path={bad}"
    ]
    code, _, err = _run(["train-teacher", *args], capsys)
    assert (
        code == 2
        and err == f"{ERROR}{bad}: line 4 is not valid JSON (Expecting value) (set on_error=skip to skip bad lines)\n"
    )
    assert not (tmp_path / "run" / "config.yaml").exists()
    code, out, err = _run(["train-teacher", *args, "data.text.on_error=skip"], capsys)
    assert code == 0, err
    assert re.match(r"teacher perplexity \d+\.\d{4}; weights in ", out)
    work = CausalLMWorkload(load_config(None, [*args, "data.text.on_error=skip"]), CPU)
    assert work.skipped == 1 and len(work.train["input_ids"]) + len(work.held_out["input_ids"]) == 40


# ---------------------------------------------------------------- vocabularies


def test_wider_student_embedding_is_cut_to_the_shared_vocabulary(hf, text_run, tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    args = _text_args(hf, out, student="wide_student")
    with pytest.warns(VocabNotice) as notices:
        assert main(["run", *args, "--no-tensorboard"]) == 0
    vocab = len(tokenizer)
    messages = {str(w.message) for w in notices if issubclass(w.category, VocabNotice)}
    assert messages == {
        f"teacher and student share a tokenizer but have {vocab} and {vocab + 64} embedding rows; "
        f"distilling over the first {vocab} logits"
    }

    # The wide student equals the plain one on the first `vocab` rows and its extra rows never reach KD or
    # CE, so distillation sees exactly what it saw with the plain student.
    def student_rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["stage"] == "student" and "loss" in r]

    wide, plain = student_rows(out), student_rows(text_run[0])
    assert len(wide) == len(plain) == 6
    for w, p in zip(wide, plain):
        for key in ("loss", "feature", "kd", "ce", "grad_norm"):
            if key in p:
                assert w[key] == pytest.approx(p[key], rel=1e-5), (w["step"], key)
    # Scored like it was distilled: over the shared ids (renormalised), by `run` and by `eval` alike.
    results = json.loads((out / "results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "student" / "hf", local_files_only=True).eval()
    assert model.get_output_embeddings().out_features == vocab + 64
    work = CausalLMWorkload(load_config(None, args), CPU)
    rows, starts = _held_out_by_hand(tokenizer, set(_texts(tokenizer, work.held_out)))
    assert len(rows) == 10
    nll, count = _nll_of_rows(model, rows, starts, vocab=vocab)
    assert results["student"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.warns(VocabNotice):
        code, printed, err = _run(["eval", *args, "--model", "student"], capsys)
    assert code == 0, err
    evaluated = json.loads(printed.strip().splitlines()[-1])["student"]["perplexity"]
    assert evaluated == pytest.approx(results["student"]["perplexity"], rel=1e-6)


def test_student_tokenizer_that_differs_with_cross_tokenizer_off_is_refused_naming_the_id(hf, tmp_path, capsys):
    """(Left at auto, the two tokenizers are distilled across: tests/lm/test_cross_tokenizer.py.)"""
    ours = {i: t for t, i in AutoTokenizer.from_pretrained(hf["teacher"]).get_vocab().items()}
    theirs = {i: t for t, i in AutoTokenizer.from_pretrained(hf["foreign_student"]).get_vocab().items()}
    first = min(i for i in ours if ours[i] != theirs.get(i))
    args = [*_text_args(hf, tmp_path / "run", student="foreign_student"), "distill.cross_tokenizer=off"]
    code, _, err = _run(["run", *args], capsys)
    assert code == 2 and err.startswith(ERROR) and err.count("\n") == 1
    assert err.startswith(f"{ERROR}distill.cross_tokenizer off: teacher and student tokenizers differ at id {first}:")
    assert repr(ours[first]) in err and "set distill.cross_tokenizer to auto, uld or hybrid" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _copy_without(source: Path, target: Path, *names: str) -> Path:
    shutil.copytree(source, target)
    for name in names:
        (target / name).unlink()
    return target


def _bad_jsonl(tmp: Path) -> Path:
    path = tmp / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    return path


def _blank_jsonl(tmp: Path) -> Path:
    path = tmp / "blank.jsonl"
    path.write_text("\n  \n\n")
    return path


BAD_INPUT = {
    "missing teacher folder": (
        lambda hf, tmp: [f"teacher.model.hf.path={tmp / 'nowhere'}"],
        ["teacher model directory", "nowhere", "does not exist"],
    ),
    "missing student folder": (
        lambda hf, tmp: [f"student.model.hf.path={tmp / 'nowhere'}"],
        ["student model directory", "nowhere", "does not exist"],
    ),
    "student without weights": (
        lambda hf, tmp: [f"student.model.hf.path={_copy_without(hf['student'], tmp / 'bare', 'model.safetensors')}"],
        ["student model directory", "bare", "has no weights"],
    ),
    "student without tokenizer": (
        lambda hf, tmp: [
            "student.model.hf.path="
            + str(_copy_without(hf["student"], tmp / "notok", "tokenizer.json", "tokenizer_config.json"))
        ],
        ["student model directory", "notok", "has no tokenizer; expected one of tokenizer.json"],
    ),
    "teacher without tokenizer": (
        lambda hf, tmp: [f"teacher.model.hf.path={_copy_without(hf['teacher'], tmp / 'notok', 'tokenizer.json')}"],
        ["teacher model directory", "notok", "has no tokenizer"],
    ),
    "layer map beyond the teacher": (
        lambda hf, tmp: ["distill.layer_map=[[0, 99]]"],
        ["layer map teacher layer 99 is out of range; the teacher has 2"],
    ),
    "layer map beyond the student": (
        lambda hf, tmp: ["distill.layer_map=[[1, 0]]"],
        ["layer map student layer 1 is out of range; the student has 1"],
    ),
    "seq_len above max positions": (
        lambda hf, tmp: ["data.text.seq_len=100"],
        ["seq_len 100 is longer than the model's maximum of 64 positions"],
    ),
    "jsonl line not json": (
        lambda hf, tmp: [f"data.text.path={_bad_jsonl(tmp)}"],
        ["broken.jsonl: line 3 is not valid JSON", "on_error=skip"],
    ),
    "empty dataset": (
        lambda hf, tmp: [f"data.text.path={_blank_jsonl(tmp)}"],
        ["no usable records in", "blank.jsonl", "0 records"],
    ),
    "layer_map and feature_layers": (
        lambda hf, tmp: ["distill.feature_layers=[{student: model.layers.0, teacher: model.layers.1}]"],
        ["config key 'distill.layer_map'", "not both"],
    ),
    "a section of another data source": (
        lambda hf, tmp: ["data.source=mnist1d"],
        ["config key 'data.text'", "data.source 'mnist1d' reads data.mnist1d", "data.text=null"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, hf, tmp_path, capsys):
    make, expected = BAD_INPUT[case]
    out = tmp_path / "run"
    code, stdout, err = _run(["run", *_text_args(hf, out), *make(hf, tmp_path), "--no-tensorboard"], capsys)
    assert code == 2, (stdout, err)
    assert err.startswith(ERROR) and err.count("\n") == 1, err
    assert "Traceback" not in err + stdout
    for text in expected:
        assert text in err, (text, err)
    assert not (out / "config.yaml").exists()


def test_hf_arch_needs_a_text_source(tmp_path, capsys):
    """The classifier defaults with one model switched to 'hf', no layer_map involved."""
    for stage in ("teacher", "student"):
        code, _, err = _run(["run", f"output_dir={tmp_path / 'run'}", f"{stage}.model.arch=hf"], capsys)
        assert code == 2 and err == (
            f"{ERROR}config key '{stage}.model.arch': 'hf' is not allowed; "
            "'hf' models need data.source text or stdlib\n"
        )
        assert not (tmp_path / "run").exists()
