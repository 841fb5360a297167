"""Causal LMs shipped through ONNX Runtime GenAI: build, weights, greedy parity, perplexity, predict, fallback.

Tiny Llama and Qwen2 students (head size 16: ONNX Runtime's CPU GroupQueryAttention needs a multiple
of 16) with the tokenizer of tests/lm/conftest.py (a 320-token BPE on three stdlib files). References
are independent of the GenAI runtime: transformers' own greedy ``generate``, perplexity recomputed in
float64 from the eager logits, and int4 weights decoded by hand from the packed ONNX initializers.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilflow.cli import main
from distilflow.config import DeployConfig, GenaiConfig, load_config
from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer
from distilflow.deploy import genai
from distilflow.deploy.bench import quality
from distilflow.deploy.int8_kernels import kernel_report
from distilflow.deploy.lm_predict import StopFilter, complete, open_backend, predict_lm
from distilflow.deploy.stage import deploy, export_student, quantize_student
from distilflow.errors import UserError
from distilflow.generate.sampling import Sampling
from distilflow.models.hf import build_causal_lm

og = pytest.importorskip("onnxruntime_genai")

ERROR = "distilflow: error: "
TRAIN_FILES = ("bisect.py", "heapq.py", "keyword.py")  # as tests/lm/conftest.py
PROMPT = "def insort(a, x, lo=0):"


def family_config(family: str, vocab_size: int) -> dict:
    if family == "llama":
        return tiny_llama_config(vocab_size, hidden=64, layers=2, heads=4, max_positions=64, tie_word_embeddings=False)
    if family == "qwen2":
        return {
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
            "bos_token_id": 2,
            "eos_token_id": 0,
        }
    return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 48}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in TRAIN_FILES]
    train_tokenizer(texts, 320, out)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    dirs = {}
    for family in ("llama", "qwen2", "gpt2"):
        torch.manual_seed(0)
        model = build_causal_lm(family_config(family, len(tokenizer)))
        out = tmp_path_factory.mktemp(family)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.fixture(scope="module")
def builds(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """llama in every precision, qwen2 in fp32."""
    out = tmp_path_factory.mktemp("genai")
    cfg = GenaiConfig(block_size=32)
    folders = {p: genai.build(model_dirs["llama"], out / f"llama-{p}", p, cfg) for p in genai.PRECISIONS}
    folders["qwen2"] = genai.build(model_dirs["qwen2"], out / "qwen2-fp32", "fp32", cfg)
    return folders


def held_out_rows(tokenizer_dir: Path, rows: int = 4, seq: int = 32) -> dict[str, np.ndarray]:
    """Rows of a stdlib file the tokenizer was not trained on."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tokenizer((stdlib_root() / "colorsys.py").read_text(encoding="utf-8"))["input_ids"][: rows * seq]
    input_ids = np.array(ids, dtype=np.int64).reshape(rows, seq)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "labels": input_ids.copy()}


def genai_greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    model = genai.open_model(folder, threads=1)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_every_precision_is_a_self_contained_folder(builds, tmp_path):
    for precision in genai.PRECISIONS:
        folder = builds[precision]
        names = {p.name for p in folder.iterdir()}
        assert {"model.onnx", "genai_config.json", "tokenizer.json", genai.MANIFEST} <= names
        assert "model.onnx.data" not in names  # weights inline: one file per variant
        assert json.loads((folder / genai.MANIFEST).read_text())["precision"] == precision
    # Moved elsewhere, the folder still loads and generates (nothing points back to the build).
    moved = shutil.copytree(builds["int4"], tmp_path / "moved")
    assert len(genai_greedy(moved, [5, 6, 7], 4)) == 4
    fp32, int8, int4 = (genai.model_size(builds[p]) for p in genai.PRECISIONS)
    assert fp32 > int8 > int4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp32_greedy_output_equals_transformers_generate(family, model_dirs, builds):
    folder = builds["fp32"] if family == "llama" else builds["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[family], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dirs[family], local_files_only=True).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        want = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    got = genai_greedy(folder, ids, 24)
    assert got == want


@pytest.mark.int8_kernels
def test_fp32_perplexity_equals_eager_reference(model_dirs, builds, tokenizer_dir):
    data = held_out_rows(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(data["input_ids"])).logits.double()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = torch.from_numpy(data["input_ids"][:, 1:])
    reference = math.exp(-float(logp.gather(-1, labels[..., None]).mean()))
    got = quality(genai.logits_function(builds["fp32"], threads=1), data, "causal_lm")["perplexity"]
    # Fused attention and layer norms sum in another order: logits agree to ~1e-6 relative, so the
    # mean log-likelihood (and log perplexity) to ~1e-6 absolute; 1e-4 leaves room on any CPU.
    assert got == pytest.approx(reference, rel=1e-4)
    # Weight-only int8 moves the perplexity of this random model by well under a percent.
    int8 = quality(genai.logits_function(builds["int8"], threads=1), data, "causal_lm")["perplexity"]
    assert int8 == pytest.approx(reference, rel=1e-2)


def unpack_int4(packed: np.ndarray, scales: np.ndarray, rows: int, cols: int, block: int) -> np.ndarray:
    """MatMulNBits' B (N, blocks, block/2 bytes; low nibble first; symmetric: zero point 8) -> (N, K) floats."""
    low, high = packed & 0x0F, packed >> 4
    values = np.stack([low, high], -1).reshape(rows, -1, block).astype(np.float32) - 8.0  # (N, blocks, block)
    return (values * scales.reshape(rows, -1, 1)).reshape(rows, -1)[:, :cols]


def test_int4_weights_really_are_four_bit(model_dirs, builds):
    model = onnx.load(str(builds["int4"] / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # 2 layers x (qkv, o, gate, up, down) + lm_head; no float MatMul on a stored weight is left.
    assert len(nbits) == 11
    for node in nbits:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32
    inits = {i.name: i for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and inits[gathers[0].input[0]].data_type == onnx.TensorProto.INT4  # the embedding
    # Decode the LM head by hand. Symmetric RTN with scale = absmax / 8: rounding errs by up to half a
    # step (uniform: a quarter step on average), the block's positive extreme is clipped to 7 steps
    # (one step off). A wrong layout or nibble order would be off by several steps on average.
    head = next(n for n in nbits if n.name.startswith("/lm_head"))
    packed, scales = (numpy_helper.to_array(inits[name]) for name in head.input[1:3])
    hf = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True)
    weight = hf.lm_head.weight.detach().numpy()  # (V, H)
    assert packed.dtype == np.uint8 and packed.nbytes == weight.size // 2
    decoded = unpack_int4(packed, scales, *weight.shape, block=32)
    step = np.repeat(np.abs(scales).reshape(weight.shape[0], -1), 32, axis=1)[:, : weight.shape[1]]
    error = np.abs(decoded - weight) / step
    assert error.max() <= 1 + 1e-5 and error.mean() < 0.3
    manifest = json.loads((builds["int4"] / genai.MANIFEST).read_text())
    assert manifest["float_matrices"] == [] and manifest["quantized_ops"]["MatMulNBits"] == {"4": 11}


def test_int8_keeps_the_embedding_table_float(builds):
    manifest = json.loads((builds["int8"] / genai.MANIFEST).read_text())
    assert manifest["quantized_ops"] == {"MatMulNBits": {"8": 11}}
    assert manifest["float_matrices"] == ["model.embed_tokens.weight"]


def test_stop_filter_holds_back_a_possible_stop_string():
    stop = StopFilter(["END"])
    assert stop.feed("abc E") == "abc "  # 'E' may begin END
    assert stop.feed("Nx") == "ENx"
    assert stop.feed("yEN") == "y"
    assert stop.feed("D tail") == "" and stop.stopped


@pytest.mark.parametrize("backend", ["genai", "transformers"])
def test_predict_streams_and_stops_on_a_stop_string(backend, builds, model_dirs):
    folder = builds["fp32"] if backend == "genai" else model_dirs["llama"]
    runner = open_backend(folder, threads=1)
    pieces = list(complete(runner, PROMPT, Sampling(max_new_tokens=24)))
    full = "".join(pieces)
    assert len(pieces) > 1  # streamed token by token, not returned at the end
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.index(stop)]
    out = io.StringIO()
    assert predict_lm(str(folder), PROMPT, Sampling(max_new_tokens=24, stop=(stop,)), threads=1, out=out) == 0
    assert out.getvalue() == expected + "\n"


def test_transformers_backend_greedy_text_equals_generate(model_dirs):
    """The fallback's own KV-cache loop against transformers' ``generate`` (greedy)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    want = tokenizer.decode(out, skip_special_tokens=True)
    got = "".join(complete(open_backend(model_dirs["llama"], 1), PROMPT, Sampling(max_new_tokens=16)))
    assert got == want


def test_sampling_is_seeded_and_prompts_come_from_jsonl(builds, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "import "}) + "\n")
    args = ["predict", str(builds["int4"]), str(prompts), "--sample", "--seed", "7", "--max-new-tokens", "8"]
    assert main(args) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["prompt"] for row in first] == [PROMPT, "import "]
    assert main(args) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == first


@pytest.mark.parametrize("which", ["genai", "transformers"])
def test_prompt_longer_than_the_positions_is_one_line(which, builds, model_dirs, capsys):
    folder = builds["fp32"] if which == "genai" else model_dirs["llama"]
    assert main(["predict", str(folder), "x = 1\n" * 60]) == 2  # also longer than a file name may be
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1 and "64 positions" in err


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["predict", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1 and "genai_config.json" in err


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "genai_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'distilflow\[genai\]'"):
        genai.require_genai()
    assert main(["predict", str(tmp_path), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distilflow[genai]" in err


class TinyWork:
    """What the deploy stage uses of a causal-LM workload (part of the Workload protocol)."""

    kind = "causal_lm"
    per_token = True

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.data = held_out_rows(tokenizer_dir, rows=8)

    def test_arrays(self) -> dict[str, np.ndarray]:
        return self.data

    def save_for_inference(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)


def genai_deploy_config(**genai_fields) -> DeployConfig:
    return DeployConfig(threads=1, genai=GenaiConfig(enabled=True, **genai_fields))


@pytest.fixture
def prebuilt(builds, monkeypatch):
    """The stage's builds served from the module's llama builds (each real build is a subprocess of
    many seconds); the stage still saves the student, checks the architecture and wires the variants."""
    calls = []

    def build(hf_dir, out, precision, cfg, **_):
        assert (Path(hf_dir) / "config.json").is_file() and (Path(hf_dir) / "tokenizer.json").is_file()
        calls.append(precision)
        return Path(shutil.copytree(builds[precision], out, dirs_exist_ok=True))

    monkeypatch.setattr(genai, "build", build)
    return calls


def test_unsupported_architecture_falls_back_to_torch_export(model_dirs, tokenizer_dir, tmp_path, capsys):
    gpt2 = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], local_files_only=True)
    capsys.readouterr()  # transformers' loading bar
    path, parity = export_student(TinyWork(tokenizer_dir), gpt2, genai_deploy_config(), tmp_path)
    assert path == tmp_path / "student.onnx" and parity.max_rel < 1e-3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPT2LMHeadModel" in err and "torch.export" in err
    narrow = tiny_llama_config(320, hidden=32, heads=4)  # head size 8
    assert "multiple of 16" in genai.unsupported_reason({**narrow, "architectures": ["LlamaForCausalLM"]})


def test_export_and_quantize_commands_build_genai_models(model_dirs, tokenizer_dir, tmp_path, prebuilt):
    work = TinyWork(tokenizer_dir)
    llama = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True)
    cfg = genai_deploy_config(precisions=["fp32", "int4"])
    path, parity = export_student(work, llama, cfg, tmp_path)
    assert path == tmp_path / "genai-fp32" / "model.onnx" and parity.max_rel < 1e-4
    assert quantize_student(work, path, cfg, tmp_path) == {"genai_int4": tmp_path / "genai-int4" / "model.onnx"}
    assert prebuilt == ["fp32", "int4"]


def test_deploy_stage_benchmarks_every_variant(model_dirs, tokenizer_dir, tmp_path, prebuilt):
    work = TinyWork(tokenizer_dir)
    llama = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], local_files_only=True)
    cfg = genai_deploy_config(precisions=["fp32", "int4"], prompt_tokens=8, new_tokens=4, repeats=1)
    info = deploy(work, llama, cfg, tmp_path)
    table = info["variants"]
    assert list(table) == ["torch_eager", "genai_fp32", "genai_int4"]
    for row in table.values():
        for key in ("decode_tokens_per_s_b1", "decode_tokens_per_s_b8", "prefill_ms_b1", "size_bytes", "peak_rss_mb"):
            assert row[key] > 0
    assert table["genai_fp32"]["perplexity"] == pytest.approx(table["torch_eager"]["perplexity"], rel=1e-4)
    assert table["genai_int4"]["size_bytes"] < table["genai_fp32"]["size_bytes"] / 4
    assert json.loads((tmp_path / "bench.json").read_text())["variants"] == table
    assert info["cpu"] == kernel_report()  # the CPU and kernel path the GenAI variants ran on


def test_genai_config_values_are_checked_at_load():
    with pytest.raises(UserError, match="deploy.genai.new_tokens"):
        load_config(None, ["deploy.genai.new_tokens=1"])
    with pytest.raises(UserError, match="deploy.genai.block_size"):
        load_config(None, ["deploy.genai.block_size=48"])


@pytest.mark.int8_kernels
def test_lm_run_deploy_stage_writes_genai_results_and_report(tiny_lm_args, tmp_path):
    """``distilflow run`` on the tiny stdlib LM (tied embeddings; head size 16) with deploy.genai on."""
    student = (
        "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, "
        "num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"
    )
    genai_args = ["deploy.genai.enabled=true", "deploy.genai.precisions=[int4]", "deploy.genai.repeats=1"]
    genai_args += ["deploy.genai.prompt_tokens=8", "deploy.genai.new_tokens=8", f"student.model.hf.config={student}"]
    assert main(["run", *tiny_lm_args(tmp_path), *genai_args, "--no-tensorboard"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert list(results["deploy"]) == ["torch_eager", "genai_int4"]
    for row in results["deploy"].values():
        assert row["decode_tokens_per_s_b1"] > 0 and row["decode_tokens_per_s_b8"] > 0 and row["size_bytes"] > 0
    eager, int4 = results["deploy"]["torch_eager"], results["deploy"]["genai_int4"]
    # Teacher-forced over the same rows; 4-bit weights of this 1-layer model move it by well under 5 %.
    assert int4["perplexity"] == pytest.approx(eager["perplexity"], rel=0.05)
    assert results["deploy_info"]["genai"]["genai_int4"]["quantized_ops"] == {
        "GatherBlockQuantized": {"4": 1},
        "MatMulNBits": {"4": 6},
    }
    assert "Deployment for generation (ONNX Runtime GenAI)" in (run / "report.md").read_text()
    assert (run / "deploy" / "genai-int4" / "genai_config.json").is_file()


@pytest.mark.parametrize("backend", ["genai", "transformers"])
def test_chat_template_is_applied_when_the_tokenizer_has_one(backend, builds, model_dirs, tmp_path):
    folder = Path(shutil.copytree(builds["fp32"] if backend == "genai" else model_dirs["llama"], tmp_path / "m"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<user> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"], local_files_only=True)
    runner = open_backend(folder, threads=1)
    assert runner.prompt_ids("hi", chat=True) == tokenizer("<user> hi\n<bot> ")["input_ids"]  # rendered by hand
    assert runner.prompt_ids("hi", chat=False) == tokenizer("hi")["input_ids"]  # --raw
