"""Configs written for the flat layout of distilflow 0.1 (main at 1481b0a), read in the sectioned one.

0.1 held every model kind's keys side by side in ``teacher.model`` / ``student.model`` (``hidden``,
``channels``, ``kernel_size``, ``dropout``, ``kwargs``, ``path``, ``hf_config``, ``init_layers``,
``trust_remote_code``) and every data source's in ``data`` (``num_samples`` ... ``eval_chars``), and
saved all of them in every run folder's ``config.yaml``. Now each kind has its own section
(``model.mlp``, ``model.cnn``, ``model.factory``, ``model.hf``; ``data.mnist1d``, ``data.files``,
``data.text``, ``data.stdlib``) and a config holds the one it uses. :func:`migrate` moves each old key
of the kind in use into its section and drops the keys of other kinds (0.1 read none of them, so
nothing changes meaning); a key given both ways is refused with one line. 0.1's default feature
pair (``layers.3 -> pool``) is written out for an old classifier config that relied on it, because
the new default depends on the models (the last hidden layers).
"""

from __future__ import annotations

import copy
from typing import Any

from distilflow.errors import UserError

MODEL_KEYS = {
    "mlp": {"hidden": "hidden", "dropout": "dropout"},
    "cnn": {"channels": "channels", "kernel_size": "kernel_size", "dropout": "dropout"},
    "factory": {"kwargs": "kwargs"},
    "hf": {
        "path": "path",
        "hf_config": "config",
        "trust_remote_code": "trust_remote_code",
        "init_layers": "init_layers",
    },
}
OLD_MODEL_KEYS = {key for keys in MODEL_KEYS.values() for key in keys}
DATA_KEYS = {
    "mnist1d": ("num_samples", "train_split", "transfer_size", "transfer_seed"),
    "files": ("path", "test_path", "test_fraction", "label_column", "transfer_path"),
    "text": ("path", "test_path", "test_fraction", "on_error", "seq_len", "pack", "tokenizer"),
    "stdlib": ("vocab_size", "train_chars", "eval_chars", "seq_len", "pack", "tokenizer"),
}
OLD_DATA_KEYS = {key for keys in DATA_KEYS.values() for key in keys}
OLD_DEFAULT_FEATURE_LAYERS = [{"student": "layers.3", "teacher": "pool", "weight": 1.0}]
TEXT_SOURCES = ("text", "stdlib")


def _move(node: dict, prefix: str, section: str | None, keys: dict[str, str], old: set[str], notes: dict) -> None:
    """Move ``node``'s old keys named in ``keys`` into ``node[section]``; drop the other ``old`` keys."""
    for key in sorted(old & set(node)):
        value = node.pop(key)
        if section is not None and key in keys:
            target = node.setdefault(section, {})
            if not isinstance(target, dict) or keys[key] in target:
                raise UserError(
                    f"config key '{prefix}.{key}' (the 0.1 layout) and '{prefix}.{section}.{keys[key]}' are both "
                    f"given; keep '{prefix}.{section}.{keys[key]}'"
                )
            target[keys[key]] = value
            notes["moved"].append(f"{prefix}.{key} -> {prefix}.{section}.{keys[key]}")
        else:
            notes["dropped"].append(f"{prefix}.{key}")


def migrate(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """``tree`` in the sectioned layout, and the notes ``{"moved": [...], "dropped": [...]}`` (both
    empty when it already was)."""
    from distilflow.config import model_section  # (config imports this module)

    tree = copy.deepcopy(tree)
    notes: dict[str, list[str]] = {"moved": [], "dropped": []}
    for role in ("teacher", "student"):
        model = (tree.get(role) or {}).get("model")
        if not isinstance(model, dict) or not OLD_MODEL_KEYS & set(model):
            continue
        section = model_section(str(model.get("arch", "cnn1d" if role == "teacher" else "mlp")))
        keys = dict(MODEL_KEYS[section])
        if role == "teacher":
            keys.pop("init_layers", None)  # 0.1 read init_layers of the student only
        elif "dtype" in model:  # 0.1 saved a student dtype too (always float32); students have none now
            model.pop("dtype")
            notes["dropped"].append(f"{role}.model.dtype")
        _move(model, f"{role}.model", section, keys, OLD_MODEL_KEYS, notes)
    data = tree.get("data") if isinstance(tree.get("data"), dict) else {}
    source = str(data.get("source", "mnist1d"))
    if OLD_DATA_KEYS & set(data):
        section = {"mnist1d": "mnist1d", "npz": "files", "csv": "files"}.get(source, source)
        keys = {key: key for key in DATA_KEYS.get(section, ())}
        _move(data, "data", section if keys else None, keys, OLD_DATA_KEYS, notes)
    old = notes["moved"] or notes["dropped"]
    if old and source not in TEXT_SOURCES and (tree.get("distill") or {}).get("feature_layers") is None:
        tree.setdefault("distill", {})["feature_layers"] = copy.deepcopy(OLD_DEFAULT_FEATURE_LAYERS)
        notes["moved"].append("distill.feature_layers: 0.1's default [layers.3 -> pool], written out")
    return tree, notes


def describe_migration(where: str, notes: dict[str, list[str]]) -> str:
    """The one stderr line that says an old-layout config was read, and how."""
    moved = notes["moved"]
    shown = ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
    dropped = f"; {len(notes['dropped'])} keys of other model kinds or data sources dropped" if notes["dropped"] else ""
    return (
        f"distilflow: {where} uses the flat 0.1 config layout; read as model/data sections ({shown or 'no key moved'}"
        f"{dropped}, none of which 0.1 read); 'distilflow print-config' shows the new layout"
    )
