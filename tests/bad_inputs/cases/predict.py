"""``distilflow predict``: ONNX files, ONNX Runtime GenAI folders, Hugging Face folders and their inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np

from ..case import case
from .data_files import npz


def genai_folder(config, *, model: bytes | None = b"not an onnx model"):
    """A maker of a GenAI-looking folder: ``genai_config.json`` (a dict is dumped, a str written as is),
    the kit's tokenizer files, and ``model.onnx`` with ``model``'s bytes (None: none)."""

    def make(path, kit) -> None:
        shutil.copytree(kit.tokenizer, path)
        text = config if isinstance(config, str) else json.dumps(config)
        (path / "genai_config.json").write_text(text)
        if model is not None:
            (path / "model.onnx").write_bytes(model)

    return make


def genai_config(**decoder) -> dict:
    base = {"filename": "model.onnx", "head_size": 8, "hidden_size": 16, "num_attention_heads": 2}
    base |= {"num_hidden_layers": 1, "num_key_value_heads": 2, "inputs": {}, "outputs": {}}
    return {"model": {"type": "llama", "context_length": 64, "vocab_size": 18, "decoder": base | decoder}}


ONNX = ("predict", "$onnx")
GENAI = ("predict", "$dir/genai", "1+1=")

CASES = [
    # ONNX files and their inputs
    case("predict-onnx-missing", ("predict", "$dir/m.onnx", "$dir/x.npz"), "m.onnx' does not exist"),
    case(
        "predict-onnx-garbage",
        ("predict", "$dir/m.onnx", "$dir/x.npz"),
        "is not a loadable ONNX model",
        {"m.onnx": b"\x08\x07garbage"},
    ),
    case(
        "predict-onnx-empty", ("predict", "$dir/m.onnx", "$dir/x.npz"), "is not a loadable ONNX model", {"m.onnx": b""}
    ),
    case("predict-input-missing", (*ONNX, "$dir/x.npz"), "x.npz' does not exist"),
    case("predict-input-wrong-suffix", (*ONNX, "$dir/x.txt"), "must be .npz (array x) or .csv", {"x.txt": "1,2"}),
    case("predict-npz-no-x", (*ONNX, "$dir/x.npz"), "it needs 'x'", {"x.npz": npz(y=np.zeros(3))}),
    case(
        "predict-npz-object", (*ONNX, "$dir/x.npz"), "object arrays", {"x.npz": npz(x=np.zeros((2, 4)).astype(object))}
    ),
    case("predict-npz-strings", (*ONNX, "$dir/x.npz"), "must be numbers", {"x.npz": npz(x=np.array([["a"] * 4]))}),
    case(
        "predict-npz-wrong-shape",
        (*ONNX, "$dir/x.npz"),
        "has samples of shape (3,); the model expects (4,)",
        {"x.npz": npz(x=np.zeros((2, 3), np.float32))},
    ),
    case("predict-npz-nan", (*ONNX, "$dir/x.npz"), "NaN or inf", {"x.npz": npz(x=np.full((2, 4), np.nan))}),
    case("predict-csv-empty", (*ONNX, "$dir/x.csv"), "has no header", {"x.csv": ""}),
    case("predict-csv-ragged", (*ONNX, "$dir/x.csv"), "line 3 has 3 values", {"x.csv": "a,b,c,d\n1,2,3,4\n1,2,3\n"}),
    case(
        "predict-csv-non-numeric",
        (*ONNX, "$dir/x.csv"),
        "column 'c': 'x' is not a number",
        {"x.csv": "a,b,c,d\n1,2,x,4\n"},
    ),
    case("predict-csv-wrong-columns", (*ONNX, "$dir/x.csv"), "has samples of shape (2,)", {"x.csv": "a,b\n1,2\n"}),
    case("predict-max-new-tokens-zero", (*ONNX, "x", "--max-new-tokens", "0"), "--max-new-tokens 0 is not allowed"),
    case("predict-missing-arguments", ("predict",), "the following arguments are required"),
    # ONNX Runtime GenAI folders
    case("genai-config-not-json", GENAI, "genai_config.json' is not valid JSON", {"genai": genai_folder("{oops")}),
    case(
        "genai-config-a-list",
        GENAI,
        "genai_config.json' is not an ONNX Runtime GenAI config",
        {"genai": genai_folder("[]")},
    ),
    case(
        "genai-config-no-decoder",
        GENAI,
        "genai_config.json' is not an ONNX Runtime GenAI config",
        {"genai": genai_folder({"model": {"context_length": 64}})},
    ),
    case(
        "genai-config-bad-context",
        GENAI,
        "context_length",
        {"genai": genai_folder(genai_config() | {"model": {**genai_config()["model"], "context_length": "long"}})},
    ),
    case("genai-model-file-missing", GENAI, "model.onnx", {"genai": genai_folder(genai_config(), model=None)}),
    case(
        "genai-model-garbage",
        GENAI,
        "could not be loaded by ONNX Runtime GenAI",
        {"genai": genai_folder(genai_config())},
    ),
    case(
        "genai-config-unknown-type",
        GENAI,
        "could not be loaded by ONNX Runtime GenAI",
        {"genai": genai_folder({"model": {**genai_config()["model"], "type": "no-such-type"}})},
    ),
    # Hugging Face folders
    case("predict-folder-not-a-model", ("predict", "$dir/m", "1+1="), "is not a model folder", {"m/notes.txt": "x"}),
    case("predict-folder-missing", ("predict", "$dir/m", "1+1="), "m' does not exist"),
    case("predict-prompt-file-empty", ("predict", "$lm", "$dir/p.txt"), "is empty", {"p.txt": ""}),
    case(
        "predict-prompt-jsonl-no-prompt",
        ("predict", "$lm", "$dir/p.jsonl"),
        "has no string 'prompt'",
        {"p.jsonl": '{"text": "1+1="}\n'},
    ),
    case("predict-prompt-too-long", ("predict", "$lm", "1+" * 40, "--raw"), "the model has 64 positions"),
    case("predict-temperature-zero", ("predict", "$lm", "1+1=", "--sample", "--temperature", "0"), "temperature"),
]
