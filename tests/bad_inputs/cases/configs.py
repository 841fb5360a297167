"""Config files and overrides: syntax, unknown keys, types, ranges, combinations, settings that cannot apply."""

from __future__ import annotations

from ..case import RUN, TINY, case, run_files, run_text

CASES = [
    # The file itself.
    case("config-missing-file", ["run", "$dir/nope.yaml"], "nope.yaml' does not exist"),
    case("config-bad-yaml", ["run", "$dir/c.yaml"], "is not valid YAML at line 2", {"c.yaml": "name: a\n  bad: [\n"}),
    case("config-not-a-mapping", ["run", "$dir/c.yaml"], "must hold a mapping of keys, not list", {"c.yaml": "- a\n"}),
    case("config-not-utf8", ["run", "$dir/c.yaml"], "is not UTF-8 text", {"c.yaml": b"name: \xff\xfe\n"}),
    case(
        "config-yaml-tag",
        ["run", "$dir/c.yaml"],
        "is not valid YAML",
        {"c.yaml": "name: !!python/object:os.system x\n"},
    ),
    case(
        "config-is-a-folder-without-config",
        ["run", "$dir/empty"],
        "is a folder without config.yaml",
        {"empty/notes.txt": "x"},
    ),
    # Keys and types.
    case("config-unknown-key", [*RUN, "student.train.stpes=3"], "unknown config key 'student.train.stpes'"),
    case("config-unknown-top-key", [*RUN, "tracher.model.arch=mlp"], "unknown config key 'tracher'"),
    case(
        "config-unknown-key-in-file",
        ["run", "$dir/c.yaml", *TINY],
        "unknown config key 'distill.temprature'",
        {"c.yaml": "distill:\n  temprature: 2.0\n"},
    ),
    case("config-wrong-type-int", [*RUN, "student.train.steps=many"], "config key 'student.train.steps': 'many'"),
    case("config-wrong-type-float-list", [*RUN, "distill.temperature=[1, 2]"], "config key 'distill.temperature'"),
    case("config-wrong-type-bool", [*RUN, "deploy.enabled=maybe"], "config key 'deploy.enabled': 'maybe'"),
    case("config-wrong-literal", [*RUN, "distill.divergence=kl"], "config key 'distill.divergence': 'kl'"),
    case("config-nan", [*RUN, "student.train.lr=.nan"], "expected a finite number"),
    case("config-inf", [*RUN, "distill.temperature=.inf"], "expected a finite number"),
    case("config-section-not-mapping", [*RUN, "distill=3"], "config key 'distill': 3"),
    case(
        "config-override-no-equals",
        ["run", "$dir/c.yaml", "steps"],
        "not of the form dotted.key=value",
        {"c.yaml": "name: x\n"},
    ),
    case("config-override-empty-key", [*RUN, "student..steps=3"], "has an empty key"),
    case("config-override-into-list", [*RUN, "distill.phases.9.name=x"], "is a list; set it whole"),  # no item 9
    case("config-override-bad-yaml", [*RUN, "distill.phases=[{"], "value is not valid YAML"),
    case("config-unknown-command", ["distil", *TINY], "invalid choice: 'distil'"),
    case("config-unknown-flag", [*RUN, "--fast"], "unrecognized arguments: --fast"),
    # Ranges and combinations.
    case("config-steps-zero", [*RUN, "student.train.steps=0"], "'student.train.steps': 0 is not allowed"),
    case("config-batch-not-divisible", [*RUN, "student.train.grad_accum=3"], "must be divisible by grad_accum"),
    case("config-warmup-past-steps", [*RUN, "student.train.warmup_steps=9"], "must be in [0, steps]"),
    case("config-temperature-zero", [*RUN, "distill.temperature=0"], "'distill.temperature': 0.0"),
    case("config-jsd-beta", [*RUN, "distill.jsd_beta=1.5"], "'distill.jsd_beta'"),
    case("config-phases-empty", [*RUN, "distill.phases=[]"], "at least one phase is needed"),
    case("config-phase-fractions", [*RUN, "distill.phases=[{name: a, fraction: 0.5, terms: [kd]}]"], "fraction"),
    case(
        "config-phase-names-twice",
        [*RUN, "distill.phases=[{name: a, fraction: 0.5, terms: [kd]}, {name: a, fraction: 0.5, terms: [ce]}]"],
        "given twice",
    ),
    case(
        "config-phase-unknown-term",
        [*RUN, "distill.phases=[{name: a, fraction: 1.0, terms: [mse]}]"],
        "distill.phases[0].terms[0]",
    ),
    case("config-section-of-another-kind", [*RUN, "student.model.cnn={kernel_size: 3}"], "student.model.cnn"),
    case("config-data-section-of-another-source", [*RUN, "data.text={path: x.txt}"], "data.text"),
    case("config-data-source-unknown", [*RUN, "data.source=imagenet", "data.mnist1d=null"], "data.source"),
    case("config-layer-map-classifier", [*RUN, "distill.layer_map=uniform"], "only causal LMs"),
    case("config-on-policy-classifier", [*RUN, "on_policy.lmbda=0.5"], "on-policy distillation needs a causal LM"),
    case(
        "config-cache-with-on-policy",
        [*run_text("$dir/t.txt", "cache.use=true", "on_policy.lmbda=0.5")],
        "not with on_policy.lmbda > 0",
        {"t.txt": "1+1=2\n" * 50},
    ),
    case("config-cache-samples-range", [*RUN, "cache.samples=300"], "must be in [1, 255]"),
    case("config-fp16-on-cpu", [*RUN, "student.train.precision=fp16"], "fp16 training needs a GPU"),
    case("config-teacher-float16-on-cpu", [*RUN, "teacher.model.dtype=float16"], "float16 needs a GPU"),
    case(
        "config-gradient-checkpointing-mlp",
        [*RUN, "student.train.gradient_checkpointing=true"],
        "student.train.gradient_checkpointing",
    ),
    case("config-device-unknown", [*RUN, "device=tpu"], "device"),
    case("config-device-cuda-missing", [*RUN, "device=cuda"], "cuda"),
    case("config-threads-negative", [*RUN, "threads=-1"], "'threads': -1"),
    # Settings that cannot apply to the model kind in use (refused, not silently ignored).
    case("config-genai-on-classifier", [*RUN, "deploy.genai.enabled=true"], "deploy.genai"),
    case("config-genai-setting-on-classifier", [*RUN, "deploy.genai.precisions=[int4]"], "deploy.genai"),
    case(
        "config-int8-setting-with-genai",
        run_text("$dir/t.jsonl", "deploy.enabled=true", "deploy.genai.enabled=true", "deploy.methods=[static]"),
        "config key 'deploy.methods': ['static'] is not allowed; deploy.genai.enabled ships",
        {"t.jsonl": "{}\n"},
    ),
    case("config-on-policy-setting-on-classifier", [*RUN, "on_policy.temperature=0.5"], "on_policy.temperature"),
    case("config-fused-on-classifier", [*RUN, "distill.loss_impl=fused"], "distill.loss_impl"),
    case(
        "config-label-column-on-npz",
        [*run_files("npz", "$dir/d.npz", "data.files.label_column=target")],
        "data.files.label_column",
    ),
    case(
        "config-reasoning-with-distill-command",
        ["distill", "configs/reasoning_arith.yaml", "output_dir=$out"],
        "the reasoning demo runs with 'distilflow run' only",
    ),
    # The output folder.
    case(
        "config-output-dir-is-a-file",
        [*RUN[:-1], "output_dir=$dir/f", "--no-tensorboard"],
        "is a file, not a folder",
        {"f": "notes"},
    ),
    case(
        "config-output-dir-holds-another-run",
        [*RUN, "seed=5"],
        "holds a run with a different config",
        {"out/config.yaml": lambda path, kit: _saved_config(path, kit)},
    ),
]


def _saved_config(path, kit) -> None:
    """The config.yaml of the tiny run (seed 0) in ``path``, as 'distilflow run' saves it."""
    import yaml

    from distilflow.config import load_config, to_dict

    names = {"out": str(path.parent), "mnist_cache": str(kit.mnist_cache)}
    overrides = [o.replace("$out", names["out"]).replace("$mnist_cache", names["mnist_cache"]) for o in TINY]
    path.write_text(yaml.safe_dump(to_dict(load_config(None, overrides)), sort_keys=False))
