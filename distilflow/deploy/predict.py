"""Inference with an exported (possibly int8) ONNX model through ONNX Runtime alone.

Classifiers read ``.npz`` (array ``x``) or ``.csv`` (numeric columns; a ``label`` column is
ignored) and print ``index, class, confidence`` per sample. Causal LMs read a text file (or take
the text itself) and print a greedy continuation; the tokenizer is read from the ONNX file's
folder (``distilflow run`` saves it there) unless another is named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distilflow.errors import UserError


def open_session(model_path: str | Path, threads: int = 0):
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise UserError(f"ONNX model '{path}' does not exist")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types for non-models
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"'{path}' is not a loadable ONNX model ({first})") from None


def _read_features(path: Path) -> np.ndarray:
    from distilflow.data.tabular import read_csv_table, read_npz_arrays

    if not path.is_file():
        raise UserError(f"input file '{path}' does not exist")
    where = f"input file '{path}'"
    if path.suffix == ".npz":
        x = read_npz_arrays(path, ("x",), where)["x"]
        if x.dtype == object or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise UserError(f"{where}: 'x' must be numbers, got dtype {x.dtype}")
    elif path.suffix == ".csv":
        header, x = read_csv_table(path, where)
        if "label" in header:
            x = np.delete(x, header.index("label"), axis=1)
    else:
        raise UserError(f"input file '{path}' must be .npz (array x) or .csv for a classifier")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
        x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise UserError(f"{where}: 'x' needs shape (samples, ...) with one or more samples, got {x.shape}")
    if not np.isfinite(x).all():
        raise UserError(f"{where}: the features hold NaN or inf values")
    return x


def predict_classes(session, path: Path, batch: int = 256) -> list[tuple[int, int, float]]:
    """``(index, class, softmax confidence)`` per sample of the input file."""
    spec = session.get_inputs()[0]
    x = _read_features(path)
    want = tuple(spec.shape[1:])
    if len(want) != x.ndim - 1 or any(isinstance(w, int) and w != g for w, g in zip(want, x.shape[1:])):
        raise UserError(f"input '{path}' has samples of shape {tuple(x.shape[1:])}; the model expects {want}")
    out = []
    for start in range(0, len(x), batch):
        logits = session.run(["logits"], {spec.name: x[start : start + batch]})[0]
        logits = logits - logits.max(-1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        for i, row in enumerate(probs):
            out.append((start + i, int(row.argmax()), float(row.max())))
    return out


def generate(session, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding; each step re-runs the whole sequence (the export has no KV cache)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty after tokenisation; give some text")
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        logits = session.run(["logits"], feeds)[0]
        token = int(logits[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return tokenizer.decode(ids)


def predict(model_path: str, source: str, *, tokenizer_path: str | None = None, max_new_tokens: int = 48) -> str:
    """What ``distilflow predict`` prints."""
    session = open_session(model_path)
    names = [i.name for i in session.get_inputs()]
    if names == ["x"]:
        rows = predict_classes(session, Path(source))
        return "\n".join(f"{i}\t{c}\t{p:.4f}" for i, c, p in rows)
    if names != ["input_ids", "attention_mask"]:
        raise UserError(
            f"'{model_path}' takes inputs {names}; distilflow exports take x, or input_ids and attention_mask"
        )
    from distilflow.models.hf import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path or Path(model_path).parent)
    text = Path(source).read_text() if Path(source).is_file() else source
    return generate(session, tokenizer, text, max_new_tokens)
