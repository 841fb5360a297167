"""Files that would run code or reach outside their folder if read carelessly (SECURITY.md): pickle
payloads wherever a file is read, manifests and GenAI configs naming paths outside their folder.

Each payload, if unpickled, creates ``$dir/pwned``; the corpus test then finds a file that was not
there before (tests/test_security.py checks that the payloads do run when unpickled)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from ..case import CACHED, LINES, RUN, case, run_files, run_text
from .caches import manifest_edit, run_copy
from .predict import genai_config


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears where none should."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def torch_payload(wrap=lambda payload: payload):
    def make(path, kit) -> None:
        import torch

        torch.save(wrap(Payload(str(path.parent / "pwned"))), path)

    return make


def pickle_payload(path, kit) -> None:
    import pickle

    path.write_bytes(pickle.dumps(Payload(str(path.parent / "pwned"))))


def npz_payload(**arrays):
    """An .npz whose object arrays hold the payload (numpy pickles object arrays)."""

    def make(path, kit) -> None:
        marker = str(path.parent / "pwned")
        with path.open("wb") as f:
            np.savez(
                f, **{k: np.array([Payload(marker)] * 4, dtype=object) if v is None else v for k, v in arrays.items()}
            )

    return make


def hf_with_pickled_weights(path, kit) -> None:
    """The kit's Llama folder with its weights as a pytorch_model.bin holding the payload."""
    import torch

    shutil.copytree(kit.lm, path)
    (path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(str(path.parent / "pwned"))}, path / "pytorch_model.bin")


# Python that creates a file when imported: a model folder's own code (trust_remote_code). The marker's
# path is written into the code: transformers imports a copy of it from its modules cache.
REMOTE_CODE = """from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def hf_with_remote_code(path, kit) -> None:
    """The kit's Llama folder declaring a config class of its own (``auto_map``) in ``evil.py``."""
    shutil.copytree(kit.lm, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "evil.py").write_text(REMOTE_CODE.format(marker=str(path.parent / "pwned")))


# YAML that creates a file when loaded with yaml.unsafe_load (distilflow reads YAML with safe_load).
YAML_APPLY = '!!python/object/apply:builtins.open ["$dir/pwned", "w"]\n'


def cache_shard_payload(folder) -> None:
    """The first shard replaced by a pickle, with the manifest's size and sha256 updated to match it."""
    import hashlib
    import pickle

    shard = folder / "shard-00000.safetensors"
    data = pickle.dumps(Payload(str(folder.parent.parent / "pwned")))
    shard.write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(b"shard-00000.safetensors" + data).hexdigest()
    manifest["shards"][0].update(bytes=len(data), sha256=digest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def mnist_cache_payload(path, kit) -> None:
    """A data.cache_dir whose MNIST-1D files (the names the kit's cache holds) are pickles."""
    path.mkdir()
    for cached in kit.mnist_cache.glob("mnist1d-*.npz"):
        pickle_payload(path / cached.name, kit)


def _escape(name: str):
    """The manifest's first shard named ``name`` (a path outside the cache folder)."""

    def edit(manifest: dict) -> None:
        manifest["shards"][0]["file"] = name

    return edit


def _link_outside(folder) -> None:
    """The first shard replaced by a symbolic link to a copy of it outside the cache folder."""
    shard = folder / "shard-00000.safetensors"
    outside = folder.parent.parent / "elsewhere.safetensors"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)


CACHE_RUN = ("run", *CACHED, "--no-tensorboard")  # the kit's run again: same config, its teacher and cache done


def _genai_escape(path, kit) -> None:
    shutil.copytree(kit.tokenizer, path)
    (path.parent / "outside.onnx").write_bytes(b"not a model")
    config = genai_config(filename="../outside.onnx")
    (path / "genai_config.json").write_text(json.dumps(config))


def _genai_absolute(path, kit) -> None:
    shutil.copytree(kit.tokenizer, path)
    config = genai_config(filename=str(kit.onnx))
    (path / "genai_config.json").write_text(json.dumps(config))


CASES = [
    case(
        "pickle-teacher-checkpoint",
        [*RUN, "teacher.model.checkpoint=$dir/w.pt"],
        "w.pt",
        {"w.pt": torch_payload(lambda p: {"format": 1, "model": p})},
    ),
    case(
        "pickle-teacher-checkpoint-bare",
        [*RUN, "teacher.model.checkpoint=$dir/w.pt"],
        "w.pt",
        {"w.pt": torch_payload()},
    ),
    case(
        "pickle-teacher-checkpoint-plain-pickle",
        [*RUN, "teacher.model.checkpoint=$dir/w.pt"],
        "w.pt",
        {"w.pt": pickle_payload},
    ),
    case(
        "pickle-stage-checkpoint-on-resume",
        CACHE_RUN,
        "checkpoint.pt",
        {"out": run_copy(), "out/baseline/checkpoint.pt": torch_payload(lambda p: {"format": 1, "model": p})},
    ),
    case(
        "pickle-npz-features",
        run_files("npz", "$dir/d.npz"),
        "object arrays",
        {"d.npz": npz_payload(x=None, y=np.arange(4) % 2)},
    ),
    case(
        "pickle-npz-labels",
        run_files("npz", "$dir/d.npz"),
        "object arrays",
        {"d.npz": npz_payload(x=np.zeros((4, 2)), y=None)},
    ),
    case(
        "pickle-npz-test-file",
        [*run_files("npz", "$dir/d.npz", "data.files.test_path=$dir/t.npz")],
        "t.npz",
        {"d.npz": npz_payload(x=np.zeros((4, 2)), y=np.arange(4) % 2), "t.npz": npz_payload(x=None, y=None)},
    ),
    case("pickle-npz-whole-file", run_files("npz", "$dir/d.npz"), "d.npz", {"d.npz": pickle_payload}),
    case("pickle-predict-input", ("predict", "$onnx", "$dir/x.npz"), "object arrays", {"x.npz": npz_payload(x=None)}),
    case("pickle-mnist1d-cache", [*RUN, "data.cache_dir=$dir/cache"], "mnist1d", {"cache": mnist_cache_payload}),
    case(
        "pickle-hf-weights",
        run_text("$dir/t.jsonl", "teacher.model.hf.config={}", "teacher.model.hf.path=$dir/t"),
        "could not be loaded",
        {"t.jsonl": LINES, "t": hf_with_pickled_weights},
    ),
    case("pickle-cache-shard", CACHE_RUN, "shard-00000.safetensors", {"out": run_copy(cache_shard_payload)}),
    case(
        "pickle-cache-manifest",
        CACHE_RUN,
        "is not a distilflow manifest",
        {"out": run_copy(lambda folder: pickle_payload(folder / "manifest.json", None))},
    ),
    case(
        "pickle-student-checkpoint",
        [*RUN, "student.model.checkpoint=$dir/w.pt"],
        "w.pt",
        {"w.pt": torch_payload(lambda p: {"format": 1, "model": p})},
    ),
    case(
        "pickle-onnx-model",
        ("predict", "$dir/m.onnx", "$dir/x.npz"),
        "is not a loadable ONNX model",
        {"m.onnx": pickle_payload},
    ),  # fmt: skip
    case(
        "pickle-predict-hf-folder", ("predict", "$dir/t", "1+1="), "could not be loaded", {"t": hf_with_pickled_weights}
    ),  # fmt: skip
    case(
        "pickle-generate-model",
        ["generate", "output_dir=$out", "generate.prompts=$dir/p.jsonl", "generate.model=$dir/t"],
        "could not be loaded",
        {"p.jsonl": '{"prompt": "1+1="}\n', "t": hf_with_pickled_weights},
    ),  # fmt: skip
    # the teacher's weights are hashed (bytes, not loaded) against the cache made of them first
    case(
        "pickle-eval-stage-weights",
        ["eval", *CACHED, "--model", "teacher"],
        "does not match this config",
        {"out": run_copy(), "out/teacher/model.safetensors": pickle_payload},
    ),  # fmt: skip
    case(
        "pickle-cache-manifest-on-cache-teacher",
        ["cache-teacher", *CACHED],
        "is not a distilflow manifest",
        {"out": run_copy(lambda folder: pickle_payload(folder / "manifest.json", None))},
    ),  # fmt: skip
    case(
        "remote-code-not-trusted",
        run_text("$dir/t.jsonl", "teacher.model.hf.config={}", "teacher.model.hf.path=$dir/t"),
        "could not be loaded",
        {"t.jsonl": LINES, "t": hf_with_remote_code},
    ),
    case("yaml-python-apply-tag", ["run", "$dir/c.yaml"], "is not valid YAML", {"c.yaml": YAML_APPLY}),
    case("yaml-python-tag-in-override", [*RUN, f"name={YAML_APPLY.strip()}"], "value is not valid YAML"),
    # paths that point outside their folder
    case(
        "escape-cache-manifest-dotdot",
        CACHE_RUN,
        "outside the cache folder",
        {"out": run_copy(manifest_edit(_escape("../student/model.safetensors")))},
    ),
    case(
        "escape-cache-manifest-absolute",
        CACHE_RUN,
        "outside the cache folder",
        {"out": run_copy(manifest_edit(_escape("/etc/hostname")))},
    ),
    case("escape-cache-shard-symlink", CACHE_RUN, "outside the cache folder", {"out": run_copy(_link_outside)}),
    case(
        "escape-genai-dotdot", ("predict", "$dir/genai", "1+1="), "outside the model folder", {"genai": _genai_escape}
    ),
    case(
        "escape-genai-absolute",
        ("predict", "$dir/genai", "1+1="),
        "outside the model folder",
        {"genai": _genai_absolute},
    ),
    case(
        "escape-output-dir-dangling-link",
        RUN,
        "is a symbolic link to",
        {"out": lambda path, kit: path.symlink_to(path.parent / "gone")},
    ),
]
