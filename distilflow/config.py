"""Typed configuration: dataclasses, YAML (safe_load only), dotted overrides, validation.

Every field carries a one-line ``help`` in its metadata; ``describe`` turns the resolved config
into commented YAML (``distilflow print-config``). Loading is strict: an unknown key or a value
of the wrong type fails at load time with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from distilflow.config_checks import validate
from distilflow.config_deploy import DeployConfig, GenaiConfig
from distilflow.config_diagnostics import DiagnosticsConfig, ReportConfig
from distilflow.config_generate import GenerateConfig, OnPolicyConfig, ReasoningConfig
from distilflow.config_kinds import (
    DATA_SECTIONS,
    CNNConfig,
    DataConfig,
    FactoryConfig,
    FilesConfig,
    HFConfig,
    MLPConfig,
    MNIST1DConfig,
    ModelConfig,
    ServerConfig,
    StdlibConfig,
    StudentHFConfig,
    StudentModelConfig,
    TeacherModelConfig,
    TeacherServerConfig,
    TextConfig,
    TokenRowsConfig,
    last_hidden_layer,
    model_section,
)
from distilflow.config_migrate import describe_migration, migrate
from distilflow.config_teachers import (
    AdaptiveConfig,
    CombineConfig,
    feature_teacher_section,
    resolve_spelling,
)
from distilflow.typed_config import build, describe, help_field, merge, parse_override, read_yaml, set_path, to_dict

__all__ = [
    "AdaptiveConfig",
    "CNNConfig",
    "CombineConfig",
    "Config",
    "DATA_SECTIONS",
    "DataConfig",
    "DeployConfig",
    "DiagnosticsConfig",
    "FactoryConfig",
    "FilesConfig",
    "GenaiConfig",
    "GenerateConfig",
    "HFConfig",
    "MLPConfig",
    "MNIST1DConfig",
    "NamedTeacherConfig",
    "OnPolicyConfig",
    "ReasoningConfig",
    "ModelConfig",
    "ServerConfig",
    "StdlibConfig",
    "StudentHFConfig",
    "StudentModelConfig",
    "TeacherModelConfig",
    "TeacherServerConfig",
    "TextConfig",
    "TokenRowsConfig",
    "config_from_dict",
    "describe",
    "load_config",
    "model_section",
    "read_yaml",
    "to_dict",
    "validate",
]

_f = help_field


@dataclass
class TrainConfig:
    steps: int = _f(2000, "Optimizer steps.")
    batch_size: int = _f(128, "Samples per optimizer step (split over grad_accum micro-batches).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step; the loss is normalised over the whole step.")
    lr: float = _f(3e-3, "Peak learning rate (AdamW).")
    min_lr: float = _f(3e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = _f(100, "Linear learning-rate warm-up steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value (0 = off).")
    eval_every: int = _f(500, "Evaluate on the test split every N steps (0 = only at the end).")
    log_every: int = _f(50, "Write metrics every N steps.")
    checkpoint_every: int = _f(500, "Write an atomic checkpoint every N steps (0 = only at the end).")
    keep_last: int = _f(
        2, "Checkpoints kept (the latest and keep_last - 1 older); a damaged latest one is replaced by the previous."
    )
    max_bad_steps: int = _f(
        10, "Steps with a NaN/inf loss or gradient are skipped and counted; this many in a row stop the run."
    )
    precision: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32",
        "Forward passes under autocast in bf16 or fp16 (fp16: GPU only, with a gradient scaler); weights, "
        "optimizer and loss math stay float32.",
    )
    gradient_checkpointing: bool = _f(
        False, "Hugging Face models: recompute activations in the backward pass (less memory, ~30% more compute)."
    )


@dataclass
class TeacherConfig:
    model: TeacherModelConfig = _f(TeacherModelConfig(arch="cnn1d"), "Architecture of the teacher.")
    train: TrainConfig = _f(TrainConfig(steps=2000), "Optimisation of the teacher.")
    server: TeacherServerConfig | None = help_field(
        None,
        "A teacher served by vLLM: its top-k log-probabilities come over HTTP and its weights are never loaded "
        "here (model.hf.path gives only its config.json and tokenizer). Left out: the teacher runs in this process.",
        section=TeacherServerConfig,
    )


@dataclass
class NamedTeacherConfig:
    name: str = _f("", "The teacher's name: in routes (data.teacher_column), distill.feature_teacher and its folder.")
    model: TeacherModelConfig = _f(TeacherModelConfig(), "Architecture of this teacher (arch: mlp unless given).")
    train: TrainConfig = _f(TrainConfig(steps=2000), "Optimisation of this teacher (when it is trained here).")
    seed: int | None = _f(
        None,
        "Seed of this teacher's initialisation and batch order when it is trained here (and of the projection "
        "heads when it is the feature teacher); unset: the run's seed, so two teachers of one architecture "
        "would be the same model.",
    )
    cache: str | None = _f(
        None,
        "Read this teacher's signals from its own teacher-signal cache in this folder instead of running it "
        "('distilflow cache-teacher' writes it); unset: live, or <run_dir>/teachers/<name>/teacher_cache with "
        "cache.use.",
    )

    def as_teacher(self) -> TeacherConfig:
        """This teacher in the one-teacher spelling (what a teacher's own view of the run reads)."""
        return TeacherConfig(model=self.model, train=self.train)


@dataclass
class StudentConfig:
    model: StudentModelConfig = _f(StudentModelConfig(arch="mlp"), "Architecture of the student.")
    train: TrainConfig = _f(TrainConfig(steps=4000), "Optimisation of the student (baseline and distilled alike).")


@dataclass
class KDWeightConfig:
    schedule: Literal["constant", "article", "cosine"] = _f(
        "article",
        "constant: base_weight; article: ramp 0->base over warmup_steps then base*decay_rate**(step-warmup); "
        "cosine: ramp then cosine from base to min_weight.",
    )
    base_weight: float = _f(0.7, "Peak KD-loss weight (the article's kl_weight 0.7).")
    warmup_steps: int = _f(200, "Steps of the linear ramp from 0 to base_weight.")
    decay_rate: float = _f(1.0, "article schedule: per-step multiplicative decay after warm-up (1.0 = none).")
    min_weight: float = _f(0.0, "Floor under the decayed weight.")


@dataclass
class FeatureLayerConfig:
    student: str = _f("", "Module path in the student whose output is aligned (e.g. 'layers.3').")
    teacher: str = _f("", "Module path in the teacher that it is aligned to (e.g. 'features.8').")
    weight: float = _f(1.0, "Weight of this layer pair in the feature loss.")


@dataclass
class PhaseConfig:
    name: str = _f("phase", "Name shown in logs and plots.")
    fraction: float | None = _f(None, "Share of total steps (fractions of all phases sum to 1).")
    steps: int | None = _f(None, "Fixed step count instead of a fraction.")
    terms: list[Literal["kd", "ce", "feature"]] = _f(["kd"], "Loss terms active in this phase.")


DEFAULT_PHASES = [
    PhaseConfig(name="feature_alignment", fraction=0.2, terms=["feature"]),
    PhaseConfig(name="soft_label_pretrain", fraction=0.5, terms=["kd"]),
    PhaseConfig(name="joint_optimization", fraction=0.3, terms=["kd", "ce"]),
]


@dataclass
class DistillConfig:
    temperature: float = _f(2.0, "Softmax temperature T of the KD term (> 0); the loss is scaled by T^2.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = _f(
        "forward_kl", "forward_kl = KL(teacher||student) (Hinton); reverse_kl; jsd = generalised JSD(beta)."
    )
    jsd_beta: float = _f(0.5, "jsd: interpolation beta in (0, 1).")
    kd_weight: KDWeightConfig = _f(KDWeightConfig(), "Schedule of the KD-loss weight.")
    ce_weight: float = _f(0.3, "Weight of the hard-label cross-entropy term.")
    feature_weight: float = _f(1.0, "Weight of the feature-alignment term.")
    feature_loss: Literal["normalized_mse", "cosine"] = _f(
        "normalized_mse", "normalized_mse: squared distance of L2-normalised features; cosine: 1 - cos."
    )
    layer_map: str | list[list[int]] | None = _f(
        None,
        "Causal LMs: 'uniform' or explicit [student, teacher] decoder-layer index pairs; builds feature_layers.",
    )
    feature_layers: list[FeatureLayerConfig] | None = _f(
        None,
        "Student/teacher layer pairs to align (projection heads are built from the observed shapes). Unset: when a "
        "phase uses the feature term, the built-in models' last hidden layers (mlp: layers.<2 x hidden - 1>, cnn: "
        "pool); Hugging Face models pair decoder layers with layer_map instead. Resolved when the config is loaded.",
    )
    phases: list[PhaseConfig] = _f(DEFAULT_PHASES, "Ordered phases of distillation and the loss terms of each.")
    loss_impl: Literal["auto", "plain", "chunked", "fused"] = _f(
        "auto",
        "KD + CE implementation of every stage: plain; chunked (rows in chunks, no full [tokens x vocab] softmax); "
        "fused (causal LMs: logits made chunk by chunk from hidden states and lm_head); auto: causal LMs fused from "
        "2^20 logit entries per micro-batch, classifiers chunked from 2^25, plain below (docs/BENCHMARKS.md).",
    )
    loss_chunk_rows: int = _f(0, "chunked/fused: rows (tokens) per chunk; 0 = about 8M logits per chunk.")
    cross_tokenizer: Literal["auto", "off", "uld", "hybrid"] = _f(
        "auto",
        "Causal LMs whose teacher and student tokenizers differ (docs/CROSS_TOKENIZER.md): hybrid (GOLD: the "
        "divergence on ids of equal text, ULD on the rest), uld (sorted-probability distance) or off (refused when "
        "they differ); auto = hybrid when they differ, plain KD when they are one tokenizer.",
    )
    hybrid_matched_weight: float = _f(1.0, "cross_tokenizer hybrid: weight of the divergence on the shared ids.")
    hybrid_unmatched_weight: float = _f(1.0, "cross_tokenizer hybrid: weight of ULD on the ids not shared.")
    hybrid_buckets: Literal["merged", "span"] = _f(
        "merged",
        "cross_tokenizer hybrid: merged (GOLD: each shared id's value times the span's continuation, one rest "
        "bucket) or span (the actual span a bucket of its own on both sides, every other bucket an event of each "
        "model; docs/CROSS_TOKENIZER.md).",
    )
    combine: CombineConfig | None = help_field(
        None,
        "teachers: how their signals mix into one teacher distribution (set with teachers:).",
        section=CombineConfig,
    )
    feature_teacher: str | None = _f(
        None, "teachers: the teacher whose features the feature pairs align with (needed with a feature phase)."
    )
    adaptive: AdaptiveConfig | None = help_field(
        None,
        "The input-adaptive KD weight: a weight per sample (per token for LMs) from the teacher's entropy or "
        "correctness, mean 1 over each optimizer step; unset = the plain schedule.",
        section=AdaptiveConfig,
    )
    label_free: bool = _f(
        False,
        "The student reads no label: KD (and features) only, every training label dropped; no phase may use 'ce'. "
        "Held-out labels still score it.",
    )


@dataclass
class CacheConfig:
    use: bool = _f(False, "distill/run read teacher signals from the cache instead of running the teacher each step.")
    path: str | None = _f(None, "Cache folder (default <run_dir>/teacher_cache): shards and manifest.json.")
    format: Literal["full", "topk", "sampled"] = _f(
        "topk",
        "full: logits (float32; classifiers, small vocabularies); topk: k log-probs at the temperature (fp16) + ids; "
        "sampled: ids drawn from the teacher (Sparse Logit Sampling) + counts.",
    )
    k: int = _f(32, "topk: ids kept per position (<= the vocabulary).")
    samples: int = _f(12, "sampled: draws per position (1-255; duplicates merged; ~12 matched full KD in the paper).")
    seed: int = _f(0, "sampled: seed of the draws (per shard, so a resumed write gives the same files).")
    shard_rows: int = _f(1024, "Rows (samples or sequences) per shard file; finished shards are skipped on resume.")
    features: bool = _f(False, "Also cache the teacher features of the feature-layer pairs ('feature' phases).")


@dataclass
class DistConfig:
    strategy: Literal["ddp", "fsdp2"] = _f(
        "ddp",
        "Under torchrun: ddp replicates the student (DistributedDataParallel); fsdp2 shards its parameters, "
        "gradients and optimizer state (fully_shard). A single process ignores this section.",
    )
    shard_teacher: bool = _f(False, "Under torchrun: shard the frozen teacher with FSDP2 (sharded inference).")
    timeout_s: float = _f(
        600.0, "Seconds a collective waits for the other ranks; a dead or stuck rank then stops the job with one line."
    )
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "Process-group backend: auto = nccl on GPU, gloo on CPU.")


@dataclass
class Config:
    name: str = _f("mnist1d", "Run name; output goes to runs/<name> unless output_dir is set.")
    output_dir: str | None = _f(None, "Where results, checkpoints and the report are written.")
    seed: int = _f(0, "Seed of model init, batch order and dropout.")
    device: str = _f("cpu", "'cpu', 'cuda', 'cuda:N' or 'auto'.")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default).")
    data: DataConfig = _f(DataConfig(), "Where the data comes from.")
    teacher: TeacherConfig | None = _f(
        TeacherConfig(),
        "The teacher: trained first (or loaded from model.checkpoint or a model.hf.path folder); none with teachers:.",
    )
    teachers: list[NamedTeacherConfig] | None = _f(
        None,
        "Several named teachers instead of teacher: (each trained here, a checkpoint, a model.hf.path folder, or its "
        "own cache); their signals mix by distill.combine (docs/MULTI_TEACHER.md).",
    )
    student: StudentConfig = _f(
        StudentConfig(), "The student: trained once without a teacher (baseline) and once distilled, same budget."
    )
    distill: DistillConfig = _f(DistillConfig(), "How the student learns from the teacher.")
    deploy: DeployConfig = _f(DeployConfig(), "Shipping the student: ONNX export, int8 quantization, benchmark.")
    generate: GenerateConfig = _f(GenerateConfig(), "distilflow generate: teacher-written samples, filtered, verified.")
    on_policy: OnPolicyConfig = _f(OnPolicyConfig(), "On-policy distillation: continuations sampled from the student.")
    reasoning: ReasoningConfig = _f(ReasoningConfig(), "The built-in reasoning demo (off unless task is set).")
    cache: CacheConfig = _f(CacheConfig(), "Teacher-signal cache: distilflow cache-teacher, read when use is on.")
    dist: DistConfig = _f(DistConfig(), "torchrun: how the student (and teacher) are spread over processes.")
    diagnostics: DiagnosticsConfig = _f(
        DiagnosticsConfig(), "What a run measures about its own training and the Diagnosis it writes (report.md)."
    )
    report: ReportConfig = _f(ReportConfig(), "What report.md measures the student against beyond its own run.")

    @property
    def task(self) -> str:
        """'causal_lm' for text sources, else 'classification'."""
        return "causal_lm" if self.data.source in ("text", "stdlib") else "classification"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``dotted.key=value`` overrides, then validation.

    The defaults hold no model or data section: each comes from the file or the overrides, or, when
    neither sets it, from the defaults of the kind the config chooses (``arch``, ``data.source``)."""
    tree = to_dict(Config(), sections=False)
    given = read_yaml(path) if path is not None else {}
    tree = merge(tree, given)
    teacher_given = given.get("teacher") is not None
    for text in overrides:
        keys, value = parse_override(text)
        set_path(tree, keys, value)
        teacher_given = teacher_given or (keys[0] == "teacher" and (len(keys) > 1 or value is not None))
    resolve_spelling(tree, teacher_given)
    where = f"config '{path}'" if path is not None else "the overrides"
    return config_from_dict(tree, where=where)


def config_from_dict(tree: dict, *, where: str = "the config", quiet: bool = False) -> Config:
    """A complete config tree (a run folder's ``config.yaml``) as a checked Config. A tree in the 0.1
    layout is read in the sectioned one, said in one stderr line (unless ``quiet``)."""
    tree, notes = migrate(tree)
    if (notes["moved"] or notes["dropped"]) and not quiet:
        print(describe_migration(where, notes), file=sys.stderr)
    cfg = build(Config, tree)
    if cfg.teachers is not None and cfg.distill.combine is None:
        cfg.distill.combine = CombineConfig()  # saved with the run: the rule in use is on record
    if cfg.distill.feature_layers is None:
        cfg.distill.feature_layers = default_feature_layers(cfg)
    validate(cfg)
    return cfg


def default_feature_layers(cfg: Config) -> list[FeatureLayerConfig]:
    """``distill.feature_layers`` when unset: none unless a phase uses the feature term and there is no
    ``layer_map``; then the built-in models' last hidden layers (the MLP's last ReLU, the CNN's pooled
    features: ``layers.3 -> pool`` for the default MLP and CNN); none for other models (validation
    then asks for the pairs)."""
    d = cfg.distill
    if d.layer_map is not None or not any("feature" in p.terms for p in d.phases):
        return []
    section = feature_teacher_section(cfg)  # the teacher the pairs align with (None: refused by validation)
    if section is None:
        return []
    student, teacher = last_hidden_layer(cfg.student.model), last_hidden_layer(section.model)
    return [FeatureLayerConfig(student=student, teacher=teacher)] if student and teacher else []
