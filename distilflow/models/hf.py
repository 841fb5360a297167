"""Hugging Face causal language models and tokenizers, loaded from local directories only.

Everything here reads local files (``local_files_only=True``): nothing is downloaded from a hub.
Layers are addressed by module path (``model.layers.3``) so that hidden states can be tapped with
:class:`distilflow.models.taps.Taps` without editing the model.
"""

from __future__ import annotations

import difflib
import inspect
import json
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import logging as hf_logging

from distilflow.errors import UserError
from distilflow.models.layers import decoder_layers

# What a tokenizer directory must hold (any one of them), besides tokenizer_config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Keys that are valid in a config dict although the config object does not expose them as attributes.
_CONFIG_METADATA = {"model_type", "transformers_version", "architectures", "torch_dtype", "dtype", "rope_theta"}


class VocabNotice(UserWarning):
    """Emitted by :func:`align_vocab` when teacher and student share a tokenizer but not an embedding size."""


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a bar on every load and save; our logs report progress instead."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, what: str = "tokenizer folder") -> Any:
    """A tokenizer from a local folder; a missing pad token is set to eos (padding is masked anyway).

    ``what`` names the folder in errors (e.g. "student model directory" when it comes from a model path).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{what} '{folder}' does not exist; give a folder written by save_pretrained")
    # Checked here because transformers' own error for a folder without one is cut off after one line.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{what} '{folder}' has no tokenizer; expected one of {', '.join(TOKENIZER_FILES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{what} '{folder}' could not be loaded: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# What loading a model folder raises for a bad one: OSError, ValueError, KeyError from transformers;
# SafetensorError (damaged weights) and pickle's UnpicklingError (a pytorch_model.bin that weights_only
# loading refuses: it holds more than tensors) from below it.
LOAD_ERRORS = (OSError, ValueError, KeyError, EOFError, SafetensorError, pickle.UnpicklingError)


def load_causal_lm(
    path: str | Path,
    *,
    role: str,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local directory written by ``save_pretrained``.

    ``role`` ("teacher", "student") names the model in error messages. ``torch_dtype`` is passed
    as transformers' ``dtype``; ``None`` keeps the transformers 5 default ``"auto"`` (the dtype
    stored in the checkpoint, e.g. bfloat16), not float32. ``trust_remote_code`` is passed through.

    If the tokenizer has no pad token, ``tokenizer.pad_token`` is set to its eos token; padded
    positions are identified by the attention mask, never by the pad id, so this is safe.
    """
    directory = Path(path)
    where = f"{role} model directory '{directory}'"
    if not directory.is_dir():
        raise UserError(f"{where} does not exist or is not a directory; give a local folder written by save_pretrained")
    if not (directory / "config.json").is_file():
        raise UserError(f"{where} has no config.json; give a folder written by save_pretrained")
    if not _weight_files(directory):
        raise UserError(f"{where} has no weights; expected *.safetensors or pytorch_model*.bin files")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where} has no tokenizer; expected one of {', '.join(TOKENIZER_FILES)}")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        with no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            dtype = torch_dtype if torch_dtype is not None else "auto"
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except LOAD_ERRORS as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{where} could not be loaded: {type(error).__name__}: {first_line[:200]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{role} tokenizer in '{directory}' has neither a pad nor an eos token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    embedding_rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embedding_rows:
        raise UserError(
            f"{role} tokenizer in '{directory}' has {len(tokenizer)} tokens but the model embeds only "
            f"{embedding_rows}; use the tokenizer the model was trained with"
        )
    return model, tokenizer


def hf_config_from_dict(values: dict[str, Any], role: str) -> PreTrainedConfig:
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=5)
        hint = f"closest: {', '.join(close)}" if close else "e.g. llama, qwen2, gpt2"
        raise UserError(f"{role} config model_type {model_type!r} is not a transformers model type; {hint}")
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    known = set(inspect.signature(config_class.__init__).parameters) | _CONFIG_METADATA
    for key in values:
        if key not in known and not hasattr(default, key):
            close = difflib.get_close_matches(key, sorted(default.to_dict()), n=3)
            hint = f"closest: {', '.join(close)}" if close else f"see {config_class.__name__}"
            raise UserError(f"{role} config key '{key}' is not a field of {model_type} configs; {hint}")
    return config_class.from_dict({k: v for k, v in values.items() if k != "model_type"})


def _load_config(config_source: dict[str, Any] | str | Path, role: str) -> PreTrainedConfig:
    if isinstance(config_source, dict):
        return hf_config_from_dict(config_source, role)
    path = Path(config_source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{role} config '{path}' not found; give a config.json file, its folder, or a dict")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{role} config '{file}' is not valid JSON: {error}") from error
    if not isinstance(values, dict) or values.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{role} config '{file}' has no known model_type; expected e.g. llama, qwen2, gpt2")
    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def build_causal_lm(
    config_source: dict[str, Any] | str | Path,
    *,
    role: str = "student",
    teacher: nn.Module | None = None,
    init_layers: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A freshly initialised causal LM (teacher or student: ``role`` names it in errors) from a transformers config.

    ``config_source``: a dict with ``model_type`` (llama, qwen2, gpt2, ...) and config fields, where
    an unknown field is an error; or a path to a ``config.json`` or its folder. The model is built
    in ``dtype`` (float32 by default, whatever dtype the config names).

    With ``teacher`` and ``init_layers`` (DistilBERT-style init, Sanh et al. 2019): every tensor
    outside the decoder stack (embeddings, final norm, lm_head) is copied from the teacher, and
    teacher layer ``init_layers[i]`` is copied into student layer ``i``. Both models must be of the
    same family, and ``len(init_layers)`` must equal the student's layer count.
    """
    config = _load_config(config_source, role)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if init_layers is not None:
        if teacher is None:
            raise UserError(f"{role} init_layers {init_layers} need a teacher to copy from; give a teacher or drop it")
        copy_from_teacher(model, teacher, init_layers, role=role)
    return model


def causal_lm_outline(folder: str | Path, *, role: str = "teacher") -> nn.Module:
    """The architecture of a local folder's ``config.json`` without its weights: a model on the meta
    device (parameter shapes, layer names, the vocabulary size), nothing read but config.json. What a
    teacher served elsewhere is known by in this process."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{role} model directory '{path}' has no config.json; give the folder the model was saved to")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return build_causal_lm(path, role=role).eval()


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of a model's linear layers (sum of in x out): what the FLOP counter
    finds for a Hugging Face decoder with SDPA attention on CPU (it does not count SDPA); no forward pass,
    so it works on a :func:`causal_lm_outline`."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def copy_from_teacher(student: nn.Module, teacher: nn.Module, init_layers: list[int], *, role: str = "student") -> None:
    """Copy the teacher's non-layer tensors and layers ``init_layers`` into ``student`` in place."""
    student_paths, teacher_paths = decoder_layers(student), decoder_layers(teacher)
    if len(init_layers) != len(student_paths):
        raise UserError(
            f"{role} init_layers has {len(init_layers)} entries but the {role} has {len(student_paths)} layers; "
            "give one teacher layer per student layer"
        )
    for index in init_layers:
        if not 0 <= index < len(teacher_paths):
            raise UserError(
                f"{role} init_layers entry {index} is out of range; the teacher has {len(teacher_paths)} layers"
            )
    if getattr(student.config, "tie_word_embeddings", False) != getattr(teacher.config, "tie_word_embeddings", False):
        raise UserError(f"{role} and teacher differ in tie_word_embeddings; set it to the teacher's value to copy")
    stack = student_paths[0].rsplit(".", 1)[0] + "."  # e.g. "model.layers."
    teacher_stack = teacher_paths[0].rsplit(".", 1)[0] + "."
    teacher_params = dict(teacher.named_parameters())
    pairs = []
    for name, param in student.named_parameters():
        source = name
        if name.startswith(stack):
            layer, rest = name[len(stack) :].split(".", 1)
            source = f"{teacher_stack}{init_layers[int(layer)]}.{rest}"
        if source not in teacher_params:
            raise UserError(
                f"{role} tensor '{name}' has no teacher counterpart '{source}'; init_layers needs one family"
            )
        if teacher_params[source].shape != param.shape:
            raise UserError(
                f"{role} tensor '{name}' {tuple(param.shape)} does not match teacher '{source}' "
                f"{tuple(teacher_params[source].shape)}; init_layers needs equal widths"
            )
        pairs.append((param, teacher_params[source]))
    with torch.no_grad():  # check everything first, so a failure leaves the student untouched
        for param, source_param in pairs:
            param.copy_(source_param.to(param.dtype))


def tokenizer_difference(teacher_tok: Any, student_tok: Any) -> str | None:
    """Where two tokenizers differ ("teacher and student tokenizers differ at id 7: ..."), or None when they
    agree on every id and on the bos/eos/unk tokens (one tokenizer, as far as distillation is concerned)."""
    for name in ("bos_token", "eos_token", "unk_token"):
        teacher_special, student_special = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if teacher_special != student_special:
            return f"teacher and student tokenizers differ in {name}: {teacher_special!r} vs {student_special!r}"
    teacher_ids = {i: token for token, i in teacher_tok.get_vocab().items()}
    student_ids = {i: token for token, i in student_tok.get_vocab().items()}
    for i in range(max(len(teacher_ids), len(student_ids))):
        if teacher_ids.get(i) != student_ids.get(i):
            return (
                f"teacher and student tokenizers differ at id {i}: teacher {teacher_ids.get(i)!r}, "
                f"student {student_ids.get(i)!r}"
            )
    return None


def align_vocab(teacher_tok: Any, student_tok: Any, teacher_vocab_size: int, student_vocab_size: int) -> int:
    """The number of logit columns teacher and student share.

    The tokenizers must agree on every id (same token for each id, same number of tokens) and on
    the bos/eos/unk tokens; otherwise a :class:`UserError` names the first id where they differ.
    When only the embedding sizes differ (Qwen2: 151936 vs 152064 rows for the same tokenizer),
    the shared size ``min(teacher_vocab_size, student_vocab_size)`` is returned and one
    :class:`VocabNotice` warning (``warnings.warn``) says so; slice both logits with
    :func:`truncate_vocab`. The extra rows belong to no token, so nothing is lost.
    """
    difference = tokenizer_difference(teacher_tok, student_tok)
    if difference:
        raise UserError(f"{difference}; same-vocabulary distillation needs one tokenizer")
    teacher_ids = teacher_tok.get_vocab()
    shared = min(teacher_vocab_size, student_vocab_size)
    if shared < len(teacher_ids):
        raise UserError(f"a model embeds only {shared} tokens but the tokenizer has {len(teacher_ids)}")
    if teacher_vocab_size != student_vocab_size:
        warnings.warn(
            f"teacher and student share a tokenizer but have {teacher_vocab_size} and {student_vocab_size} "
            f"embedding rows; distilling over the first {shared} logits",
            VocabNotice,
            stacklevel=2,
        )
    return shared


def truncate_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., V)`` -> ``(..., size)``: the first ``size`` logits (a view, no copy)."""
    if size > logits.shape[-1]:
        raise UserError(f"cannot keep {size} logits of a vocabulary of {logits.shape[-1]}")
    return logits[..., :size]


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (max_position_embeddings / n_positions), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None
