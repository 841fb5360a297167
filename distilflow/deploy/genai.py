"""Causal-LM students shipped for generation through ONNX Runtime GenAI.

ONNX Runtime GenAI's model builder (``python -m onnxruntime_genai.models.builder``) turns a Hugging
Face folder into an ONNX decoder with a KV cache (``GroupQueryAttention``), a ``genai_config.json``
and the tokenizer; its runtime (``onnxruntime_genai``) runs the generation loop. We call the builder
as a subprocess of the same interpreter: its Python entry points (``parse_extra_options`` +
``create_model``) changed between releases, it puts its own folder on ``sys.path`` (top-level
modules named ``builders``, ``quantization``), and a build holds the whole model in memory; the
command line is the documented interface.

Precisions (``deploy.genai.precisions``):

- ``fp32``: every weight in float32.
- ``int8`` / ``int4``: weight-only, round-to-nearest, symmetric, one float scale per
  ``block_size`` weights along the input axis (``MatMulNBits``: all projections and the LM head).
  With ``accuracy_level`` 4 the activations are quantized to int8 on the fly for the matmul.
  int4 also stores the embedding table in 4 bits (``GatherBlockQuantized``) when
  ``quantize_embeddings`` is on; the builder quantizes embeddings in 4 bits only, so in int8 the
  embedding table stays float32. What stays float in every precision: the RMSNorm weights, the
  rotary cos/sin caches and the quantization scales (see :func:`weight_summary`).

Which architectures the builder takes is decided by ``config.architectures[0]``;
:data:`SUPPORTED_ARCHITECTURES` is the text-decoder list of onnxruntime-genai 0.18. Others (GPT-2
among them) and shapes its CPU attention kernel refuses (a head size that is not a multiple of 16)
fall back to the full-sequence torch.export path of :mod:`distilflow.deploy.export`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from distilflow.errors import UserError
from distilflow.storage import atomic_write, errno_in_text, write_failure, write_text

INSTALL_HINT = "pip install 'distilflow[genai]' (onnxruntime-genai >= 0.18)"
MANIFEST = "distilflow_genai.json"
PRECISIONS = ("fp32", "int8", "int4")
# onnxruntime-genai 0.18, builder.py create_model: text decoders dispatched by config.architectures[0].
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "Phi3SmallForCausalLM": "phi3small",
    "GraniteForCausalLM": "granite",
    "NemotronForCausalLM": "nemotron",
    "OlmoForCausalLM": "olmo",
    "InternLM2ForCausalLM": "internlm2",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "SmolLM3ForCausalLM": "smollm3",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense",
    "GptOssForCausalLM": "gpt_oss",
    "Lfm2ForCausalLM": "lfm2",
    "ChatGLMModel": "chatglm",
}
# Files the runtime and the transformers fallback read besides the model (copied when the builder did not).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
NOT_WEIGHTS = ("_scales", "cos_cache", "sin_cache")  # float by design, not kept-float weights
SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's 2 GB limit: larger models keep model.onnx.data


def require_genai() -> Any:
    """The ``onnxruntime_genai`` module, or a one-line UserError saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserError(f"ONNX Runtime GenAI is not installed; {INSTALL_HINT}") from None
    return onnxruntime_genai


def is_genai_folder(path: str | Path) -> bool:
    return (Path(path) / "genai_config.json").is_file()


def unsupported_reason(hf_config: dict[str, Any], execution_provider: str = "cpu") -> str | None:
    """None when the builder (and its runtime on ``execution_provider``) takes this model, else why not."""
    arch = (hf_config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        return f"ONNX Runtime GenAI's builder does not support {arch} (model_type {hf_config.get('model_type')!r})"
    heads = hf_config.get("num_attention_heads") or 1
    head_size = hf_config.get("head_dim") or hf_config.get("hidden_size", 0) // heads
    if execution_provider == "cpu" and head_size % 16:
        return f"head size {head_size} is not a multiple of 16, which ONNX Runtime's CPU GroupQueryAttention requires"
    return None


def builder_command(
    hf_dir: Path, out: Path, precision: str, cfg: Any, cache_dir: Path, *, trust_remote_code: bool = False
) -> list[str]:
    """The builder's command line for one precision (``cfg``: a :class:`~distilflow.config.GenaiConfig`)."""
    extra = ["hf_token=false", f"hf_remote={str(trust_remote_code).lower()}"]
    if precision in ("int8", "int4"):
        extra += [f"block_size={cfg.block_size}", f"accuracy_level={cfg.accuracy_level}", "is_symmetric=true"]
        if precision == "int4" and cfg.quantize_embeddings:
            extra.append("op_types_to_quantize=MatMul/Gather")
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        cfg.execution_provider,
        "-c",
        str(cache_dir),
        "--extra_options",
        *extra,
    ]


def _failure(log: str) -> str:
    """The line of the builder's output that says what went wrong."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def build(hf_dir: str | Path, out: str | Path, precision: str, cfg: Any, *, trust_remote_code: bool = False) -> Path:
    """Build ``out`` (model.onnx, genai_config.json, tokenizer, manifest) from the Hugging Face folder ``hf_dir``.

    The build goes to a sibling temporary folder first, so a failed build leaves an earlier ``out`` intact.
    """
    require_genai()
    hf_dir, out = Path(hf_dir), Path(out)
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not allowed; use one of {', '.join(PRECISIONS)}")
    config = read_hf_config(hf_dir)
    reason = unsupported_reason(config, cfg.execution_provider)
    if reason:
        raise UserError(reason)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="genai-cache-") as cache:
        command = builder_command(hf_dir, staging, precision, cfg, Path(cache), trust_remote_code=trust_remote_code)
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cache)
    if done.returncode != 0 or not (staging / "model.onnx").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        code = errno_in_text(done.stderr)  # the builder (a subprocess) ran out of disk: one line, as our writes
        if code is not None:
            raise write_failure(staging, code)
        raise UserError(f"ONNX Runtime GenAI's builder failed on '{hf_dir}' ({precision}): {_failure(done.stderr)}")
    for name in SIDE_FILES:
        if (hf_dir / name).is_file() and not (staging / name).is_file():
            shutil.copy2(hf_dir / name, staging / name)
    _inline_weights(staging / "model.onnx")
    summary = weight_summary(staging)
    manifest = {
        "precision": precision,
        "block_size": cfg.block_size if precision != "fp32" else None,
        "accuracy_level": cfg.accuracy_level if precision != "fp32" else None,
        "embeddings_quantized": precision == "int4" and cfg.quantize_embeddings,
        "execution_provider": cfg.execution_provider,
        "architecture": config.get("architectures", ["?"])[0],
        "onnxruntime_genai": _genai_version(),
        **summary,
    }
    write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _genai_version() -> str:
    return getattr(require_genai(), "__version__", "?")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"'{hf_dir}' is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _inline_weights(model_path: Path) -> None:
    """Store the weights inside model.onnx (one file per variant) when protobuf's 2 GB limit allows."""
    import onnx

    data = model_path.with_name(model_path.name + ".data")
    if not data.is_file() or data.stat().st_size > SINGLE_FILE_LIMIT:
        return
    model = onnx.load(str(model_path), load_external_data=True)
    atomic_write(model_path, lambda tmp: onnx.save(model, tmp))  # model.onnx + .data stay usable until then
    data.unlink()


def model_size(folder: str | Path) -> int:
    """Bytes of the model files of a GenAI folder (graph and weights; tokenizer and configs excluded)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def weight_summary(folder: str | Path) -> dict[str, Any]:
    """What is quantized in a GenAI model and what stays float.

    ``quantized_ops``: ``{op: {bits: count}}`` for ``MatMulNBits`` / ``GatherBlockQuantized``;
    ``float_matrices``: names of float initializers with two or more dimensions (weights kept float);
    ``bytes_by_type``: stored bytes per ONNX tensor type.
    """
    import onnx

    model = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    ops: dict[str, Counter] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            # 'bits' defaults to 4 in both ops (the builder writes it for MatMulNBits only); a
            # GatherBlockQuantized table is INT4, or uint8 packing two 4-bit values (tied embeddings).
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            ops.setdefault(node.op_type, Counter())[bits] += 1
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    size_of = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}
    size_of |= {onnx.TensorProto.INT4: 0.5, onnx.TensorProto.UINT4: 0.5}  # two 4-bit values per byte
    by_type: Counter = Counter()
    floats = []
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        name = onnx.TensorProto.DataType.Name(init.data_type)
        by_type[name] += int(count * size_of.get(init.data_type, 1))
        if init.data_type in float_types and len(init.dims) >= 2 and not init.name.endswith(NOT_WEIGHTS):
            floats.append(init.name)
    return {
        "quantized_ops": {op: dict(bits) for op, bits in ops.items()},
        "float_matrices": floats,
        "bytes_by_type": dict(by_type),
    }


def read_genai_config(folder: str | Path) -> dict[str, Any]:
    """``genai_config.json`` of a GenAI folder, checked before ONNX Runtime GenAI reads it: JSON with a
    ``model.decoder`` section and a positive ``model.context_length``, and every file it names a
    relative path inside the folder that exists (a config never points outside its folder)."""
    path = Path(folder) / "genai_config.json"
    if not path.is_file():
        raise UserError(f"'{folder}' is not an ONNX Runtime GenAI model folder (no genai_config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("decoder"), dict):
        raise UserError(f"'{path}' is not an ONNX Runtime GenAI config (it needs a 'model' with a 'decoder' section)")
    length = model.get("context_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise UserError(f"'{path}': model.context_length {length!r} is not allowed; it must be an integer >= 1")
    root = Path(folder).resolve()
    for key, name in _file_names(model, "model"):
        if not isinstance(name, str) or not name:
            raise UserError(f"'{path}': {key} {name!r} is not a file name")
        target = (root / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_relative_to(root):
            raise UserError(
                f"'{path}': {key} {name!r} is outside the model folder; a GenAI folder names its own files only"
            )
        if not target.is_file():
            raise UserError(f"'{path}': {key} names '{root / name}', which does not exist")
    return config


def _file_names(section: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``filename`` key in the config's nested sections."""
    found = []
    if isinstance(section, dict):
        for key, value in section.items():
            if key == "filename":
                found.append((f"{prefix}.{key}", value))
            else:
                found += _file_names(value, f"{prefix}.{key}")
    elif isinstance(section, list):
        for i, value in enumerate(section):
            found += _file_names(value, f"{prefix}[{i}]")
    return found


def open_model(folder: str | Path, threads: int = 0, execution_provider: str = "cpu") -> Any:
    """An ``onnxruntime_genai.Model`` with ``threads`` intra-op threads (0 = ONNX Runtime's default)."""
    og = require_genai()
    read_genai_config(folder)
    try:
        config = og.Config(str(folder))
        if execution_provider == "cpu":
            config.clear_providers()
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        return og.Model(config)
    except Exception as exc:  # the runtime raises RuntimeError with its own or ONNX Runtime's message
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"'{folder}' could not be loaded by ONNX Runtime GenAI ({first})") from None


def logits_function(folder: str | Path, threads: int) -> Any:
    """``feeds -> logits (B, T, V)`` over full sequences: onnxruntime on the GenAI decoder with an empty past.

    Teacher-forced quality (perplexity) is computed from these logits exactly as for the other variants.
    """
    import onnxruntime as ort

    decoder = read_genai_config(folder)["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(Path(folder) / decoder["filename"]), options, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    dtype = np.float16 if past and "float16" in past[0].type else np.float32

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        ids = feeds["input_ids"].astype(np.int64)
        inputs = {"input_ids": ids, "attention_mask": feeds["attention_mask"].astype(np.int64)}
        empty = (len(ids), decoder["num_key_value_heads"], 0, decoder["head_size"])  # (B, kv heads, 0, head)
        inputs.update({p.name: np.zeros(empty, dtype) for p in past})
        return session.run(["logits"], inputs)[0].astype(np.float32)

    return run
