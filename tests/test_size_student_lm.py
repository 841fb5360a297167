"""distilflow size-student on causal-LM students (tiny Llama configs), and the memory budget."""

from __future__ import annotations

import json

import pytest

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.models.sizing_lm import lm_candidates, lm_shapes

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,  # ratio 2.6875, as the demo's 344 / 128
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # 2 query heads per KV head
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
VOCAB = 300


def test_lm_shapes_keep_the_head_size_the_grouping_and_the_ffn_ratio():
    shapes = lm_shapes(LLAMA)
    assert {s["num_hidden_layers"] for s in shapes} == {1, 2, 3}  # the depth, one less, one more
    for s in shapes:
        assert s["hidden_size"] == 16 * s["num_attention_heads"]  # head size 64 / 4 kept
        assert s["num_attention_heads"] == 2 * s["num_key_value_heads"]  # GQA group of 2 kept
        assert s["intermediate_size"] % 8 == 0 and abs(s["intermediate_size"] - 2.6875 * s["hidden_size"]) <= 4
        assert s["model_type"] == "llama" and s["max_position_embeddings"] == 64  # the rest as configured
    assert sorted({s["num_attention_heads"] for s in shapes}) == [2, 4, 6, 8, 12, 16, 24, 32]  # even counts only
    given = lm_shapes(LLAMA, widths=[32, 96], depths=[4])
    assert [(s["hidden_size"], s["num_attention_heads"], s["num_hidden_layers"]) for s in given] == [
        (32, 2, 4),
        (96, 6, 4),
    ]


def test_lm_candidates_cost_what_a_hand_count_says():
    found = lm_candidates(LLAMA, lambda c: {**c, "vocab_size": VOCAB}, widths=[32, 64], depths=[1, 2])
    assert len(found) == 4 and [c.macs for c in found] == sorted(c.macs for c in found)
    for c in found:
        hidden, inter, layers = (c.model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
        kv_width = c.model["num_key_value_heads"] * 16  # KV heads x head size
        # per layer: q and o (hidden x hidden), k and v (hidden x kv_width), gate/up/down (hidden x inter)
        layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter
        assert c.macs == layers * layer + hidden * VOCAB  # + the LM head; the embedding is a lookup
        norms = (2 * layers + 1) * hidden
        assert c.params == layers * layer + 2 * hidden * VOCAB + norms  # untied embedding and head
    with pytest.raises(Exception, match="multiple of the head size 16 x 2 query heads per KV head = 32"):
        lm_shapes(LLAMA, widths=[48])


def _lm_args(tiny_lm_args, root) -> list[str]:
    """The tiny stdlib LM demo with a 4-head student (head size 8 would not build for GenAI: 16 x 2)."""
    student = (
        "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"
    )
    args = [a for a in tiny_lm_args(root) if not a.startswith("student.model.hf.config=")]
    return [*args, f"student.model.hf.config={student}", "deploy.enabled=false"]


GEN = ["deploy.genai.prompt_tokens=16", "deploy.genai.new_tokens=6", "--repeats", "5"]


def test_an_lm_student_is_sized_and_the_written_config_runs(tmp_path, tiny_lm_args, capsys):
    out = tmp_path / "sizing"
    args = [*_lm_args(tiny_lm_args, tmp_path), *GEN, "--backend", "torch", "--widths", "16,32", "--depths", "1,2"]
    # A latency everything meets and a parameter budget between the candidates: the choice is the largest
    # by MACs under the parameter limit (with the tokenizer's 300 ids: 1x32 has 19,936, 2x32 30,240).
    assert main(["size-student", *args, "--latency-ms", "1000", "--max-params", "25000", "--out", str(out)]) == 0
    result = json.loads((out / "sizing.json").read_text())
    rows = {r["name"]: r for r in result["candidates"]}
    assert set(rows) == {"llama 1x16 h1/1 i32", "llama 2x16 h1/1 i32", "llama 1x32 h2/2 i64", "llama 2x32 h2/2 i64"}
    assert result["chosen"] == "llama 1x32 h2/2 i64"
    meeting = [r for r in rows.values() if r["params"] <= 25000]
    assert rows[result["chosen"]]["macs"] == max(r["macs"] for r in meeting)
    assert all(0 < r["p50_ms"] <= r["p90_ms"] and r["prefill_ms"] > 0 and r["size_bytes"] > 0 for r in rows.values())
    assert "per generated token" in (out / "report.md").read_text() and "distilflow run" in capsys.readouterr().out

    # 'run' on the written config trains the chosen shape: its parameters and MACs per token match.
    run = tmp_path / "sized-run"
    assert main(["run", str(out / "student.yaml"), f"output_dir={run}", "--no-tensorboard"]) == 0
    cfg = load_config(out / "student.yaml", [])
    assert cfg.student.model.hf.config["hidden_size"] == 32 and cfg.student.model.hf.config["num_hidden_layers"] == 1
    student = json.loads((run / "results.json").read_text())["student"]
    assert student["params"] == rows[result["chosen"]]["params"]
    assert student["macs_per_token"] == rows[result["chosen"]]["macs"]


@pytest.mark.parametrize("backend", ["ort-int8", "genai-int4"])
def test_the_shipped_lm_backends_build_each_candidate_and_memory_is_measured(tmp_path, tiny_lm_args, backend):
    out = tmp_path / "sizing"
    args = [*_lm_args(tiny_lm_args, tmp_path), *GEN, "--backend", backend, "--widths", "32", "--depths", "1,2"]
    assert main(["size-student", *args, "--latency-ms", "1000", "--max-memory-mb", "100000", "--out", str(out)]) == 0
    result = json.loads((out / "sizing.json").read_text())
    rows = result["candidates"]
    assert [r["name"] for r in rows] == ["llama 1x32 h2/2 i64", "llama 2x32 h2/2 i64"]
    # the choice rebuilt from its config (exported / built again) and timed alone, three times
    ((tried),) = result["confirmed"]
    assert tried["name"] == result["chosen"] == "llama 2x32 h2/2 i64" and tried["held"] and len(tried["p90_ms"]) == 3
    assert 0 < rows[0]["size_bytes"] < rows[1]["size_bytes"]  # the second decoder layer's weights are in the file
    for r in rows:
        assert r["peak_rss_mb"] > r["runtime_rss_mb"] > 10  # a real process: its runtime, then the model
        assert 0 < r["p50_ms"] <= r["p90_ms"]
    assert "peak RSS MB" in (out / "report.md").read_text()


def test_peak_memory_is_the_child_process_resident_set():
    """An independent reference: an MLP whose float32 weights are 32 MiB peaks at least that far above
    a 16-wide one in the same kind of child (weights loaded, one call)."""
    import tempfile

    from safetensors.torch import save_file

    from distilflow.deploy.memory import peak_memory_mb
    from distilflow.models.zoo import MLP

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for width in (16, 2048):
            model = {"arch": "mlp", "mlp": {"hidden": [width, width]}}
            save_file(MLP((40,), 10, [width, width], dropout=0.0).state_dict(), f"{tmp}/{width}.safetensors")
            spec = {"kind": "torch-classifier", "path": f"{tmp}/{width}.safetensors", "threads": 1, "batch": 4}
            peaks[width] = peak_memory_mb({**spec, "input_shape": [40], "num_classes": 10, "model": model})
    weights_mib = (40 * 2048 + 2048 * 2048 + 2048 * 10) * 4 / 2**20  # about 16.4 MiB, held once loaded
    assert peaks[2048]["peak_rss_mb"] - peaks[16]["peak_rss_mb"] >= 0.9 * weights_mib
    assert abs(peaks[2048]["runtime_rss_mb"] - peaks[16]["runtime_rss_mb"]) < 0.5 * weights_mib  # same runtime


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--latency-ms", "1000", "--max-memory-mb", "1"],
            "no candidate meets p90 <= 1000 ms per generated token at batch 1 with ort-fp32 (chosen at p90 <= 800 ms: "
            "a 20 % margin), peak RSS <= 1 MB",
        ),
        (["--latency-ms", "0.000001"], "the fastest, llama 1x16 h1/1 i32, takes"),
        (["--max-memory-mb", "1"], "the least memory, llama 1x16 h1/1 i32, peaks at"),
        (["--latency-ms", "1", "--widths", "24"], "--widths 24: an LM hidden size must be a multiple of the head size"),
        (["--latency-ms", "1", "deploy.genai.prompt_tokens=40"], "deploy.genai.prompt_tokens: held-out rows have 32"),
        (["--latency-ms", "1", "deploy.genai.new_tokens=60"], "exceeds the student's 64 positions"),
        (["--latency-ms", "1", "student.model.hf.init_layers=[0]"], "size-student changes the depth: remove it"),
        (
            ["--latency-ms", "1", "student.model.hf.config={model_type: gpt2, n_embd: 32, n_layer: 1, n_head: 2}"],
            "model_type 'gpt2' has no intermediate_size",
        ),
    ],
)
def test_lm_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_lm_args, capsys, extra, expected):
    out = tmp_path / "sizing"
    args = [*_lm_args(tiny_lm_args, tmp_path), *GEN, "--backend", "ort-fp32", "--widths", "16", "--depths", "1"]
    if "--widths" in extra:
        args = args[: args.index("--widths")] + args[args.index("--widths") + 2 :]
    assert main(["size-student", *args, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and expected in err, err
    assert not out.exists()
