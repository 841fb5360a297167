"""Model folders (teacher.model.hf.path, student.model.hf.path) and weight files (teacher.model.checkpoint)."""

from __future__ import annotations

import shutil

from ..case import LINES, RUN, case, run_text


def copy_lm(drop: tuple[str, ...] = (), replace: dict[str, str | bytes] | None = None):
    """A maker copying the kit's tiny Llama folder without the files ``drop`` and with ``replace``'s contents."""

    def make(path, kit) -> None:
        shutil.copytree(kit.lm, path)
        for name in drop:
            (path / name).unlink()
        for name, content in (replace or {}).items():
            (path / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return make


def safetensors(**tensors):
    def make(path, kit) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.zeros(v) for k, v in tensors.items()}, str(path))

    return make


def _torch_save(obj):
    def make(path, kit) -> None:
        import torch

        torch.save(obj, path)

    return make


HF_TEACHER = run_text("$dir/t.jsonl", "teacher.model.hf.config={}", "teacher.model.hf.path=$dir/teacher")
TEACHER_CKPT = (*RUN, "teacher.model.checkpoint=$dir/w")

CASES = [
    # Hugging Face folders
    case(
        "hf-folder-missing",
        HF_TEACHER,
        "teacher' does not exist; give a folder written by save_pretrained",
        {"t.jsonl": LINES},
    ),
    case(
        "hf-folder-is-a-file",
        HF_TEACHER,
        "teacher' does not exist; give a folder written by save_pretrained",
        {"t.jsonl": LINES, "teacher": "x"},
    ),
    case(
        "hf-no-config", HF_TEACHER, "has no config.json", {"t.jsonl": LINES, "teacher": copy_lm(drop=("config.json",))}
    ),
    case(
        "hf-no-weights",
        HF_TEACHER,
        "has no weights",
        {"t.jsonl": LINES, "teacher": copy_lm(drop=("model.safetensors",))},
    ),
    case(
        "hf-no-tokenizer",
        HF_TEACHER,
        "has no tokenizer",
        {"t.jsonl": LINES, "teacher": copy_lm(drop=("tokenizer.json",))},
    ),
    case(
        "hf-config-not-json",
        HF_TEACHER,
        "could not be loaded",
        {"t.jsonl": LINES, "teacher": copy_lm(replace={"config.json": "{not json"})},
    ),
    case(
        "hf-config-unknown-model-type",
        HF_TEACHER,
        "could not be loaded",
        {"t.jsonl": LINES, "teacher": copy_lm(replace={"config.json": '{"model_type": "no-such-model"}'})},
    ),
    case(
        "hf-weights-garbage",
        HF_TEACHER,
        "could not be loaded",
        {
            "t.jsonl": LINES,
            "teacher": copy_lm(replace={"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"}),
        },
    ),
    case(
        "hf-weights-truncated",
        HF_TEACHER,
        "could not be loaded",
        {"t.jsonl": LINES, "teacher": copy_lm(replace={"model.safetensors": b"\x40\x00\x00"})},
    ),
    case(
        "hf-both-path-and-config",
        run_text("$dir/t.jsonl", "teacher.model.hf.path=$lm"),
        "exactly one of path",
        {"t.jsonl": LINES},
    ),
    case(
        "hf-fresh-config-unknown-type",
        run_text("$dir/t.jsonl", "teacher.model.hf.config={model_type: nope}"),
        "model_type 'nope' is not a transformers model type",
        {"t.jsonl": LINES},
    ),
    case(
        "hf-fresh-config-unknown-field",
        run_text("$dir/t.jsonl", "teacher.model.hf.config.hiden_size=8"),
        "hiden_size",
        {"t.jsonl": LINES},
    ),
    case(
        "hf-arch-on-classifier",
        [*RUN, "student.model.arch=hf", "student.model.mlp=null"],
        "'hf' models need data.source text or stdlib",
    ),
    case(
        "hf-init-layers-out-of-range",
        run_text("$dir/t.jsonl", "student.model.hf.init_layers=[5]"),
        "init_layers",
        {"t.jsonl": LINES},
    ),
    case(
        "hf-layer-map-out-of-range",
        run_text(
            "$dir/t.jsonl",
            "distill.layer_map=[[0, 7]]",
            "distill.phases=[{name: f, fraction: 1.0, terms: [feature, kd]}]",
        ),
        "teacher layer 7 is out of range",
        {"t.jsonl": LINES},
    ),
    # teacher.model.checkpoint
    case("ckpt-missing", TEACHER_CKPT, "do not exist"),
    case("ckpt-text", TEACHER_CKPT, "is not a readable distilflow checkpoint", {"w": "not weights"}),
    case("ckpt-empty", TEACHER_CKPT, "is not a readable distilflow checkpoint", {"w": b""}),
    case("ckpt-torch-foreign", TEACHER_CKPT, "is not a distilflow checkpoint", {"w": _torch_save({"a": 1})}),
    case("ckpt-torch-list", TEACHER_CKPT, "is not a distilflow checkpoint", {"w": _torch_save([1, 2])}),
    case(
        "ckpt-safetensors-garbage",
        (*RUN, "teacher.model.checkpoint=$dir/w.safetensors"),
        "are not a readable safetensors file",
        {"w.safetensors": b"\xff" * 64},
    ),
    case(
        "ckpt-safetensors-wrong-model",
        (*RUN, "teacher.model.checkpoint=$dir/w.safetensors"),
        "do not fit the configured teacher model",
        {"w.safetensors": safetensors(weight=[2, 2])},
    ),
    case(
        "ckpt-stage-folder-empty",
        (*RUN, "teacher.model.checkpoint=$dir/stage"),
        "do not exist",
        {"stage/notes.txt": "x"},
    ),
    case(
        "model-factory-missing-module",
        [
            *RUN,
            "student.model.arch=no_such_module:make",
            "student.model.mlp=null",
            "distill.feature_layers=[]",
            "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]",
        ],
        "cannot import module 'no_such_module'",
    ),
    case(
        "model-factory-not-callable-spec",
        [
            *RUN,
            "student.model.arch=json:nothing",
            "student.model.mlp=null",
            "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]",
        ],
        "has no attribute 'nothing'",
    ),
]
