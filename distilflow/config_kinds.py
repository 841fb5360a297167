"""The config sections of each model kind and data source (``model.mlp`` ... ``data.stdlib``).

A model (``teacher.model``, ``student.model``) names its kind in ``arch`` and reads the one section of
that kind (``mlp``, ``cnn``, ``factory`` or ``hf``); ``data`` names its ``source`` and reads the one
section of that source (``mnist1d``, ``files``, ``text`` or ``stdlib``; a ``module.path:factory``
source reads none). A section left out gets its kind's defaults; a saved config holds only the
sections in use, and a section of another kind is refused at load time (config_checks.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from distilflow.typed_config import help_field

_f = help_field


def _section(cls: type, help: str) -> Any:
    """A section of one model kind or data source: None unless that kind is the one in use, when it is
    filled with the kind's defaults (``__post_init__`` of the owner); a saved config holds only it."""
    return help_field(None, help, section=cls)


@dataclass
class MNIST1DConfig:
    num_samples: int = _f(5000, "Samples generated for train + test (paper default 5000).")
    train_split: float = _f(0.8, "Fraction of num_samples used for training (paper: 4000/1000).")
    transfer_size: int = _f(40000, "Unlabeled transfer samples generated with transfer_seed (0 = none).")
    transfer_seed: int = _f(1, "Generator seed of the transfer set (must differ from data.seed).")


@dataclass
class FilesConfig:
    path: str | None = _f(None, "Training file: .npz (arrays x, y) or .csv (one label column, the rest features).")
    test_path: str | None = _f(None, "Held-out file; without it test_fraction of path is held out.")
    test_fraction: float = _f(0.2, "Fraction of path held out for testing when test_path is not set.")
    label_column: str = _f("label", "CSV column holding the integer class label; every other column is a feature.")
    transfer_path: str | None = _f(None, "Optional unlabeled transfer set for distillation (.npz with x, or .csv).")


@dataclass
class TokenRowsConfig:
    """What every causal-LM source shares: how text becomes rows of token ids."""

    seq_len: int = _f(128, "Tokens per training row (must not exceed the models' maximum positions).")
    pack: bool = _f(True, "Pack plain documents into full rows (EOS between them); false pads each one.")
    tokenizer: str | None = _f(None, "Tokenizer folder; default the student's model folder, else the teacher's.")
    teacher_tokenizer: str | None = _f(
        None,
        "The teacher's tokenizer folder (cross-tokenizer distillation); default the teacher's model folder, else the "
        "student's tokenizer.",
    )
    teacher_seq_len: int = _f(
        0, "Teacher tokens per row when the tokenizers differ (rows are cut where both sides fit); 0 = seq_len."
    )


@dataclass
class TextConfig(TokenRowsConfig):
    path: str | None = _f(
        None, "Text file or folder of them: .txt, .jsonl (text, prompt + completion, or chat messages), .parquet, .csv."
    )
    test_path: str | None = _f(None, "Held-out file or folder; without it test_fraction of the records is held out.")
    test_fraction: float = _f(0.2, "Fraction of the records held out for testing when test_path is not set.")
    on_error: Literal["raise", "skip"] = _f(
        "raise", "A JSONL line that is not JSON or lacks the fields: 'raise' (name file and line) or 'skip'."
    )


@dataclass
class StdlibConfig(TokenRowsConfig):
    vocab_size: int = _f(2048, "Vocabulary of the byte-level BPE tokenizer trained on the corpus.")
    student_tokenizer: Literal["bpe", "unigram"] = _f(
        "bpe",
        "The student's tokenizer: bpe (the teacher's; a byte-level BPE of its own when student_vocab_size differs "
        "from vocab_size) or unigram (a SentencePiece-style unigram tokenizer trained on the corpus). A second "
        "tokenizer means distillation across tokenizers.",
    )
    student_vocab_size: int = _f(
        0,
        "The student tokenizer's vocabulary: 0 = vocab_size for bpe (the teacher's tokenizer), 4096 for unigram "
        "(4 specials, 256 bytes, pieces).",
    )
    train_chars: int = _f(8_000_000, "Characters of training text (held-out modules excluded).")
    eval_chars: int = _f(200_000, "Characters of held-out text (a fixed set of modules).")


DATA_SECTIONS = {"mnist1d": "mnist1d", "npz": "files", "csv": "files", "text": "text", "stdlib": "stdlib"}
"""The data section each source reads ('module.path:factory' sources read none)."""


@dataclass
class DataConfig:
    source: str = _f(
        "mnist1d",
        "Classifiers: built-in 'mnist1d', your 'npz' / 'csv' file (data.files), or 'module.path:factory' returning "
        "arrays x, y, x_test, y_test (and optional x_transfer). Causal LMs: 'text' (your .txt, .jsonl, .parquet, "
        ".csv files; data.text) or the built-in 'stdlib' corpus (the Python standard library's source; data.stdlib).",
    )
    seed: int = _f(
        42,
        "Seed of the data itself, not of training (that is the top-level seed): MNIST-1D's generator, the held-out "
        "split of a file without test_path (npz, csv, text), the reasoning demo's problem sets.",
    )
    cache_dir: str = _f("~/.cache/distilflow", "Where generated datasets and trained tokenizers are cached.")
    teacher_column: str | None = _f(
        None,
        "teachers: the column that routes each row to one named teacher: a field of text records (JSONL, parquet, "
        "csv) holding a teacher's name, or an npz array (csv column) of per-row teacher indices or names; rows "
        "without one (null, '' or -1) use distill.combine.",
    )
    mnist1d: MNIST1DConfig | None = _section(MNIST1DConfig, "source mnist1d: the generated MNIST-1D sets.")
    files: FilesConfig | None = _section(FilesConfig, "source npz / csv: your classification files.")
    text: TextConfig | None = _section(TextConfig, "source text: your text files, as token rows.")
    stdlib: StdlibConfig | None = _section(StdlibConfig, "source stdlib: the built-in corpus and its tokenizer.")

    def __post_init__(self) -> None:
        fill_section(self, DATA_SECTIONS.get(self.source))

    @property
    def token_rows(self) -> TokenRowsConfig | None:
        """The text or stdlib section (seq_len, pack, tokenizer), None for classifier sources."""
        return self.text if self.source == "text" else self.stdlib if self.source == "stdlib" else None


def fill_section(owner: Any, name: str | None) -> None:
    """Give ``owner``'s section ``name`` its defaults when it is not set (the kind in use)."""
    if name is not None and getattr(owner, name) is None:
        setattr(owner, name, _field_section(owner, name)())


def _field_section(owner: Any, name: str) -> type:
    return next(f.metadata["section"] for f in dataclasses.fields(owner) if f.name == name)


@dataclass
class MLPConfig:
    hidden: list[int] = _f([192, 192], "Widths of the hidden layers ([Linear, ReLU] each).")
    dropout: float = _f(0.0, "Dropout before the classifier layer.")


@dataclass
class CNNConfig:
    channels: list[int] = _f([32, 32, 32], "Channels of each conv block [Conv, BatchNorm, ReLU].")
    kernel_size: int = _f(5, "Convolution kernel size.")
    dropout: float = _f(0.0, "Dropout before the classifier layer.")


@dataclass
class FactoryConfig:
    kwargs: dict[str, Any] = _f({}, "Keyword arguments passed to the 'module.path:factory' model.")


@dataclass
class HFConfig:
    path: str | None = _f(None, "Local folder written by save_pretrained (weights, config, tokenizer).")
    config: dict[str, Any] = _f({}, "A transformers config (model_type plus fields) to build a fresh model instead.")
    trust_remote_code: bool = _f(False, "Allow code from the model folder to run (off unless you set it).")


@dataclass
class StudentHFConfig(HFConfig):
    init_layers: list[int] | None = _f(None, "Teacher decoder layers copied into the student's layers (one each).")


def model_section(arch: str) -> str:
    """The model section ``arch`` reads: mlp, cnn (cnn1d, cnn2d), hf, or factory ('module.path:factory')."""
    return {"mlp": "mlp", "cnn1d": "cnn", "cnn2d": "cnn", "hf": "hf"}.get(arch, "factory")


MODEL_KIND_HELP = (
    "Built-in 'mlp' (model.mlp), 'cnn1d' / 'cnn2d' (model.cnn), your own 'module.path:factory' (model.factory), or "
    "'hf' (a Hugging Face causal LM from model.hf: a folder or a config)."
)


@dataclass
class ModelConfig:
    arch: str = _f("mlp", MODEL_KIND_HELP)
    checkpoint: str | None = _f(None, "Reuse trained weights (.safetensors or a stage checkpoint) instead of training.")
    mlp: MLPConfig | None = _section(MLPConfig, "arch mlp: the MLP's layers.")
    cnn: CNNConfig | None = _section(CNNConfig, "arch cnn1d / cnn2d: the CNN's conv blocks.")
    factory: FactoryConfig | None = _section(FactoryConfig, "arch 'module.path:factory': what the factory is given.")
    hf: HFConfig | None = _section(HFConfig, "arch hf: the Hugging Face causal LM.")

    def __post_init__(self) -> None:
        fill_section(self, model_section(self.arch))

    @property
    def folder(self) -> str | None:
        """A Hugging Face model folder (``hf.path``), or None."""
        return self.hf.path if self.hf is not None else None

    @property
    def pretrained(self) -> str | None:
        """Where given weights come from (``checkpoint``, else a Hugging Face folder), or None: trained here."""
        return self.checkpoint or self.folder


@dataclass
class TeacherModelConfig(ModelConfig):
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32",
        "Dtype of the teacher's weights in the distillation forward passes (a trained teacher is cast after "
        "training; a folder is loaded in it); float16 needs a GPU. Students train in float32 (see train.precision).",
    )


@dataclass
class StudentModelConfig(ModelConfig):
    hf: StudentHFConfig | None = _section(StudentHFConfig, "arch hf: the Hugging Face causal LM.")

    @property
    def init_from_teacher(self) -> list[int] | None:
        """``hf.init_layers``: the teacher layers a Hugging Face student starts from, or None."""
        return self.hf.init_layers if self.hf is not None else None


def last_hidden_layer(model: ModelConfig) -> str | None:
    """The module path of a built-in model's last hidden representation (models/zoo.py's stable names):
    the MLP's last ReLU (``layers.<2 x len(hidden) - 1>``), the CNN's pooled features (``pool``); None
    for other kinds (their layers are the user's to name)."""
    if model.arch == "mlp" and model.mlp is not None:
        return f"layers.{2 * len(model.mlp.hidden) - 1}" if model.mlp.hidden else None
    return "pool" if model.arch in ("cnn1d", "cnn2d") else None


@dataclass
class ServerConfig:
    url: str | None = _f(
        None, "Root URL of a vLLM OpenAI-compatible server (e.g. http://127.0.0.1:8000); None = not served."
    )
    model: str | None = _f(None, "Served model name (vllm --served-model-name); None = the only model served.")
    timeout_s: float = _f(600.0, "Seconds one try of a request may wait for the server (connecting, each read).")
    max_retries: int = _f(3, "Tries after the first on a refused/dropped connection, timeout, 5xx or malformed answer.")


@dataclass
class TeacherServerConfig(ServerConfig):
    """``teacher.server``: where a served teacher answers (distilflow/teachers/served.py)."""

    url: str | None = _f(None, "Root URL of the vLLM OpenAI-compatible server of the teacher (http://host:port).")
    top_k: int = _f(
        32,
        "Log-probabilities per position asked online (distill, run); cache-teacher asks cache.k. At most the "
        "server's --max-logprobs (vLLM's default is 20).",
    )
    timeout_s: float = _f(120.0, "Seconds one try of a request may wait for the server (connecting, each read).")
