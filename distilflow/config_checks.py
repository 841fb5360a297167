"""Value checks of a resolved config that types alone cannot express (ranges, combinations).

Kept apart from the dataclasses of distilflow/config.py, which say what the keys are; this says
which values are allowed together. Each failure names the key, the value and the rule.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from distilflow.config_teachers import check_teachers, trained_sections
from distilflow.errors import UserError

if TYPE_CHECKING:
    from distilflow.config import Config


def _check_sections(owner: Any, prefix: str, wanted: str | None, kind: str, need: Any) -> None:
    """Only the section of the kind in use may be given (a section of another kind is read by nothing)."""
    for f in dataclasses.fields(owner):
        if "section" in f.metadata and f.name != wanted and getattr(owner, f.name) is not None:
            rule = f"{kind} reads {prefix}.{wanted}" if wanted else f"{kind} reads no {prefix} section"
            drop = f"drop {prefix}.{f.name} (on the command line: {prefix}.{f.name}=null)"
            need(False, f"{prefix}.{f.name}", "given", f"{rule}; {drop}")


def _check_models(cfg: Config, need: Any) -> None:
    """Each model's kind: its section only, and what the kind needs (checked first: the other rules
    read the kinds)."""
    from distilflow.config import model_section

    lm = cfg.task == "causal_lm"
    for stage, section in trained_sections(cfg):
        m = section.model
        _check_sections(m, f"{stage}.model", model_section(m.arch), f"arch {m.arch!r}", need)
        if lm:
            need(m.arch == "hf", f"{stage}.model.arch", m.arch, f"data.source '{cfg.data.source}' needs arch 'hf'")
            need(
                (m.hf.path is None) != (not m.hf.config),
                f"{stage}.model.hf.path",
                m.hf.path,
                "an hf model needs exactly one of path (a local save_pretrained folder) or config",
            )
        else:
            need(m.arch != "hf", f"{stage}.model.arch", m.arch, "'hf' models need data.source text or stdlib")
        if m.mlp is not None:
            need(all(h >= 1 for h in m.mlp.hidden), f"{stage}.model.mlp.hidden", m.mlp.hidden, "widths must be >= 1")
        for section in (m.mlp, m.cnn):
            if section is not None:
                key = f"{stage}.model.{'mlp' if section is m.mlp else 'cnn'}.dropout"
                need(0 <= section.dropout < 1, key, section.dropout, "must be in [0, 1)")
        if m.cnn is not None:
            need(
                len(m.cnn.channels) >= 1 and all(c >= 1 for c in m.cnn.channels),
                f"{stage}.model.cnn.channels",
                m.cnn.channels,
                "one or more channel counts >= 1",
            )
            need(m.cnn.kernel_size >= 1, f"{stage}.model.cnn.kernel_size", m.cnn.kernel_size, "must be >= 1")


def _check_data(cfg: Config, need: Any) -> None:
    """The data source: its section only, and the ranges of its keys."""
    from distilflow.config import DATA_SECTIONS

    data = cfg.data
    sources = ("mnist1d", "npz", "csv", "text", "stdlib")
    need(
        data.source in sources or ":" in data.source,
        "data.source",
        data.source,
        f"use one of {', '.join(sources)} or 'module.path:factory'",
    )
    _check_sections(data, "data", DATA_SECTIONS.get(data.source), f"data.source {data.source!r}", need)
    for name in ("files", "text"):
        section = getattr(data, name)
        if section is not None:
            need(section.path is not None, f"data.{name}.path", section.path, f"source '{data.source}' needs a file")
            need(
                0 < section.test_fraction < 1, f"data.{name}.test_fraction", section.test_fraction, "must be in (0, 1)"
            )
    rows = data.token_rows
    if rows is not None:
        key = f"data.{data.source}"
        need(rows.seq_len >= 2, f"{key}.seq_len", rows.seq_len, "must be >= 2")
        need(
            rows.teacher_seq_len == 0 or rows.teacher_seq_len >= 2,
            f"{key}.teacher_seq_len",
            rows.teacher_seq_len,
            "must be 0 (= seq_len) or >= 2",
        )
    if data.stdlib is not None:
        corpus = data.stdlib
        need(
            corpus.vocab_size >= 300, "data.stdlib.vocab_size", corpus.vocab_size, "must be >= 300 (256 bytes + merges)"
        )
        need(corpus.train_chars > 0, "data.stdlib.train_chars", corpus.train_chars, "must be > 0")
        need(corpus.eval_chars > 0, "data.stdlib.eval_chars", corpus.eval_chars, "must be > 0")
        need(
            corpus.student_vocab_size == 0 or corpus.student_vocab_size >= 292,
            "data.stdlib.student_vocab_size",
            corpus.student_vocab_size,
            "must be 0 (the default of student_tokenizer) or >= 292 (specials, 256 bytes, pieces or merges)",
        )
    if data.mnist1d is not None:
        gen = data.mnist1d
        need(0 < gen.train_split < 1, "data.mnist1d.train_split", gen.train_split, "must be in (0, 1)")
        need(gen.num_samples >= 20, "data.mnist1d.num_samples", gen.num_samples, "must be >= 20")
        need(gen.transfer_size >= 0, "data.mnist1d.transfer_size", gen.transfer_size, "must be >= 0")
        need(
            gen.transfer_size == 0 or gen.transfer_seed != data.seed,
            "data.mnist1d.transfer_seed",
            gen.transfer_seed,
            "must differ from data.seed, or the transfer set repeats the labeled samples",
        )


def _first_changed(section: Any, prefix: str) -> tuple[str, Any] | None:
    """``(dotted key, value)`` of the first field of ``section`` that differs from its default."""
    default = type(section)()
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if value != getattr(default, f.name):
            return f"{prefix}.{f.name}", value
    return None


def _check_kind_settings(cfg: Config, need: Any) -> None:
    """Settings read by one kind of model or data only: given for another they would be ignored
    without a word, so they are refused (a saved config holds their defaults, which pass)."""
    from distilflow.config import GenaiConfig, OnPolicyConfig

    if cfg.task != "causal_lm":
        lm_only = "only causal LMs (data.source text or stdlib) read it"
        changed = _first_changed(cfg.deploy.genai, "deploy.genai")
        if changed:
            rule = f"{lm_only}; a classifier ships through deploy's ONNX export and int8 quantization"
            need(cfg.deploy.genai == GenaiConfig(), changed[0], changed[1], f"{rule}; drop deploy.genai")
        changed = _first_changed(cfg.on_policy, "on_policy")
        if changed:
            rule = "on-policy distillation needs a causal LM (data.source text or stdlib); drop on_policy"
            need(cfg.on_policy == OnPolicyConfig(), changed[0], changed[1], rule)
        need(
            cfg.distill.loss_impl != "fused",
            "distill.loss_impl",
            cfg.distill.loss_impl,
            "fused makes the logits from hidden states and lm_head, which only causal LMs have; a classifier's "
            "logits are its output: use chunked, plain or auto",
        )
    elif cfg.deploy.enabled and cfg.deploy.genai.enabled:
        # The GenAI deploy path reads deploy.genai, threads and parity_tolerance; the ONNX Runtime int8
        # path's settings would be ignored.
        from distilflow.config import DeployConfig

        default = DeployConfig()
        for key in ("methods", "observe_steps", "calibration_batch", "per_channel", "reduce_range", "op_types",
                    "exclude", "torch_backend", "batch_sizes", "iterations", "tensorrt"):  # fmt: skip
            value = getattr(cfg.deploy, key)
            rule = (
                "deploy.genai.enabled ships the causal LM through ONNX Runtime GenAI, which does not read it (that "
                "path reads deploy.genai.*, deploy.threads, deploy.parity_tolerance); drop it or set "
                "deploy.genai.enabled=false"
            )
            need(value == getattr(default, key), f"deploy.{key}", value, rule)
    files = cfg.data.files
    if files is not None and cfg.data.source == "npz":
        need(
            files.label_column == "label",
            "data.files.label_column",
            files.label_column,
            "only csv files have columns; an .npz file holds its labels in array 'y'",
        )


def _check_served_teacher(cfg: Config, need: Any) -> None:
    """``teacher.server``: what a teacher that gives only top-k log-probabilities at T = 1 over HTTP can do
    (distilflow/teachers/served.py); combinations that would be silently wrong are refused."""
    if cfg.teacher is None:  # teachers: entries have no server key (refused at load, config_teachers.py)
        return
    server = cfg.teacher.server
    if server is None:
        return
    key = "teacher.server"
    need(
        server.url is not None and server.url.startswith(("http://", "https://")),
        f"{key}.url",
        server.url,
        "a served teacher needs its server's root URL, http(s)://host:port",
    )
    need(
        bool(server.model),
        f"{key}.model",
        server.model,
        "name the served model (vllm --served-model-name): the server is checked for it, and a cache records it",
    )
    need(server.top_k >= 1, f"{key}.top_k", server.top_k, "must be >= 1")
    need(server.timeout_s > 0, f"{key}.timeout_s", server.timeout_s, "must be > 0")
    need(server.max_retries >= 0, f"{key}.max_retries", server.max_retries, "must be >= 0")
    need(cfg.task == "causal_lm", key, "given", "a served teacher scores tokens: causal LMs (data.source text, stdlib)")
    need(cfg.reasoning.task == "off", key, "given", "the reasoning demo trains its own teacher; drop teacher.server")
    model = cfg.teacher.model
    need(
        model.hf is not None and model.hf.path is not None,
        "teacher.model.hf.path",
        model.hf.path if model.hf is not None else None,
        "a served teacher needs the folder of its config.json and tokenizer (its weights are not read)",
    )
    need(model.checkpoint is None, "teacher.model.checkpoint", model.checkpoint, "not with teacher.server")
    need(
        abs(cfg.distill.temperature - 1.0) < 1e-12,
        "distill.temperature",
        cfg.distill.temperature,
        "a served teacher gives log-probabilities at temperature 1 only (vLLM's prompt log-probs are the raw "
        "log_softmax, and a top-k slice cannot be re-tempered: its normaliser needs the whole vocabulary); use 1, "
        "or run the teacher in this process",
    )
    need(
        not any("feature" in p.terms for p in cfg.distill.phases),
        "distill.phases",
        [p.name for p in cfg.distill.phases],
        "the 'feature' term needs teacher features, which a served teacher does not give; drop it",
    )
    need(not cfg.cache.features, "cache.features", cfg.cache.features, "a served teacher gives no features")
    need(cfg.cache.format == "topk", "cache.format", cfg.cache.format, "a served teacher gives top-k log-probs: topk")
    need(
        not cfg.student.model.init_from_teacher,
        "student.model.hf.init_layers",
        cfg.student.model.init_from_teacher,
        "copies teacher weights, which a served teacher does not have here",
    )
    need(not cfg.dist.shard_teacher, "dist.shard_teacher", True, "the teacher is served: nothing to shard")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each failure names key, value and rule."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise UserError(f"config key '{key}': {value!r} is not allowed; {rule}")

    _check_data(cfg, need)
    check_teachers(cfg, need)  # teacher: or teachers:, combine, adaptive, label-free (first: the rest reads them)
    _check_models(cfg, need)
    _check_kind_settings(cfg, need)
    _check_served_teacher(cfg, need)
    d = cfg.distill
    need(d.temperature > 0, "distill.temperature", d.temperature, "must be > 0")
    need(0 < d.jsd_beta < 1, "distill.jsd_beta", d.jsd_beta, "must be in (0, 1)")
    off = "must be > 0 (to turn a term off, leave it out of distill.phases)"
    need(d.ce_weight > 0, "distill.ce_weight", d.ce_weight, off)
    need(d.feature_weight > 0, "distill.feature_weight", d.feature_weight, off)
    need(d.loss_chunk_rows >= 0, "distill.loss_chunk_rows", d.loss_chunk_rows, "must be >= 0 (0 = auto)")
    need(d.hybrid_matched_weight >= 0, "distill.hybrid_matched_weight", d.hybrid_matched_weight, "must be >= 0")
    need(d.hybrid_unmatched_weight >= 0, "distill.hybrid_unmatched_weight", d.hybrid_unmatched_weight, "must be >= 0")
    need(
        d.hybrid_matched_weight + d.hybrid_unmatched_weight > 0,
        "distill.hybrid_unmatched_weight",
        d.hybrid_unmatched_weight,
        "hybrid_matched_weight and hybrid_unmatched_weight cannot both be 0 (use cross_tokenizer uld or drop 'kd')",
    )
    need(
        d.cross_tokenizer in ("auto", "off") or cfg.task == "causal_lm",
        "distill.cross_tokenizer",
        d.cross_tokenizer,
        "only causal LMs (data.source text or stdlib) have tokenizers",
    )
    kw = d.kd_weight
    need(kw.base_weight > 0, "distill.kd_weight.base_weight", kw.base_weight, off)
    need(kw.warmup_steps >= 0, "distill.kd_weight.warmup_steps", kw.warmup_steps, "must be >= 0")
    need(0 < kw.decay_rate <= 1, "distill.kd_weight.decay_rate", kw.decay_rate, "must be in (0, 1]")
    need(
        0 <= kw.min_weight <= kw.base_weight,
        "distill.kd_weight.min_weight",
        kw.min_weight,
        "must be in [0, base_weight]",
    )
    need(len(d.phases) > 0, "distill.phases", d.phases, "at least one phase is needed")
    g = cfg.diagnostics
    need(g.spike_factor > 1, "diagnostics.spike_factor", g.spike_factor, "must be > 1")
    need(g.spike_window >= 6, "diagnostics.spike_window", g.spike_window, "must be >= 6 (a median of 5 steps or more)")
    for i, layer in enumerate(d.feature_layers):
        need(bool(layer.student), f"distill.feature_layers[{i}].student", layer.student, "name a student module path")
        need(bool(layer.teacher), f"distill.feature_layers[{i}].teacher", layer.teacher, "name a teacher module path")
        need(layer.weight > 0, f"distill.feature_layers[{i}].weight", layer.weight, "must be > 0 (or drop the pair)")
    uses_features = any("feature" in p.terms for p in d.phases)
    need(
        not uses_features or bool(d.feature_layers) or d.layer_map is not None,
        "distill.feature_layers",
        [],
        "a phase uses the 'feature' term, so name at least one student/teacher layer pair (or distill.layer_map)",
    )
    need(
        d.layer_map is None or not d.feature_layers,
        "distill.layer_map",
        d.layer_map,
        "give either layer_map or feature_layers, not both",
    )
    lm = cfg.task == "causal_lm"
    need(d.layer_map is None or lm, "distill.layer_map", d.layer_map, "only causal LMs (data.source text or stdlib)")
    need(
        d.layer_map is None or d.layer_map == "uniform" or isinstance(d.layer_map, list),
        "distill.layer_map",
        d.layer_map,
        "use 'uniform' or a list of [student, teacher] layer index pairs",
    )
    for stage, section in trained_sections(cfg):
        train = section.train
        pre = f"{stage}.train"
        need(train.steps >= 1, f"{pre}.steps", train.steps, "must be >= 1")
        need(train.batch_size >= 1, f"{pre}.batch_size", train.batch_size, "must be >= 1")
        need(train.grad_accum >= 1, f"{pre}.grad_accum", train.grad_accum, "must be >= 1")
        need(
            train.batch_size % train.grad_accum == 0,
            f"{pre}.batch_size",
            train.batch_size,
            f"must be divisible by grad_accum ({train.grad_accum})",
        )
        need(train.lr > 0, f"{pre}.lr", train.lr, "must be > 0")
        need(0 <= train.min_lr <= train.lr, f"{pre}.min_lr", train.min_lr, "must be in [0, lr]")
        need(0 <= train.warmup_steps <= train.steps, f"{pre}.warmup_steps", train.warmup_steps, "must be in [0, steps]")
        need(train.weight_decay >= 0, f"{pre}.weight_decay", train.weight_decay, "must be >= 0")
        need(train.grad_clip >= 0, f"{pre}.grad_clip", train.grad_clip, "must be >= 0 (0 = off)")
        for key in ("eval_every", "log_every", "checkpoint_every"):
            need(getattr(train, key) >= 0, f"{pre}.{key}", getattr(train, key), "must be >= 0")
        need(train.keep_last >= 1, f"{pre}.keep_last", train.keep_last, "must be >= 1 (checkpoints kept)")
        bad = train.max_bad_steps
        need(bad >= 1, f"{pre}.max_bad_steps", bad, "must be >= 1 (1: the first bad step stops the run)")
    need(cfg.threads >= 0, "threads", cfg.threads, "must be >= 0")
    dep = cfg.deploy
    need(dep.bits == 8, "deploy.bits", dep.bits, "only 8-bit integer quantization is supported")
    need(dep.observe_steps >= 1, "deploy.observe_steps", dep.observe_steps, "must be >= 1 (calibration batches)")
    need(dep.calibration_batch >= 1, "deploy.calibration_batch", dep.calibration_batch, "must be >= 1")
    need(
        bool(dep.batch_sizes) and all(b >= 1 for b in dep.batch_sizes),
        "deploy.batch_sizes",
        dep.batch_sizes,
        "one or more sizes >= 1",
    )
    need(dep.threads >= 1, "deploy.threads", dep.threads, "must be >= 1")
    need(dep.iterations >= 1, "deploy.iterations", dep.iterations, "must be >= 1")
    need(dep.parity_tolerance > 0, "deploy.parity_tolerance", dep.parity_tolerance, "must be > 0")
    gen = dep.genai
    need(bool(gen.precisions), "deploy.genai.precisions", gen.precisions, "name one or more of fp32, int8, int4")
    need(gen.prompt_tokens >= 1, "deploy.genai.prompt_tokens", gen.prompt_tokens, "must be >= 1")
    need(gen.new_tokens >= 2, "deploy.genai.new_tokens", gen.new_tokens, "must be >= 2 (decode = all but the first)")
    need(gen.repeats >= 1, "deploy.genai.repeats", gen.repeats, "must be >= 1")
    from distilflow.generate.settings import validate_generation  # generate, on_policy, reasoning sections

    validate_generation(cfg, need)
    c = cfg.cache
    need(
        not (c.use and cfg.on_policy.lmbda > 0),
        "cache.use",
        c.use,
        "not with on_policy.lmbda > 0; on-policy continuations are sampled during training, so their teacher "
        "outputs cannot be cached",
    )
    need(
        not (c.use and c.format == "sampled") or d.divergence == "forward_kl",
        "distill.divergence",
        d.divergence,
        "a sampled cache estimates forward KL only; use forward_kl or cache.format=topk",
    )
    need(
        not (c.use and uses_features and not c.features),
        "cache.features",
        c.features,
        "distill.phases use the 'feature' term while cache.use is on; set cache.features=true (and cache-teacher "
        "again) or drop the feature term",
    )
    need(c.k >= 1, "cache.k", c.k, "must be >= 1")
    need(1 <= c.samples <= 255, "cache.samples", c.samples, "must be in [1, 255] (counts are stored as uint8)")
    need(c.shard_rows >= 1, "cache.shard_rows", c.shard_rows, "must be >= 1")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", cfg.dist.timeout_s, "must be > 0 (seconds)")
    names = [p.name for p in d.phases]
    twice = sorted({n for n in names if names.count(n) > 1})
    # Metrics, plots and the report key on the phase name.
    need(not twice, "distill.phases", names, f"phase names must be unique ({', '.join(twice)} given twice)")
    from distilflow.schedules import phase_boundaries  # validates fractions and steps

    phase_boundaries(d.phases, cfg.student.train.steps)
