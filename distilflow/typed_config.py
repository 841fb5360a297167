"""Typed dataclass configs from plain data: strict conversion, YAML, dotted overrides, printing.

The mechanism behind distilflow/config.py, kept apart from the fields themselves. Conversion is
strict: an unknown key or a value of the wrong type is a UserError naming the key, the value and
what is allowed. YAML is data: ``yaml.safe_load`` only.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distilflow.errors import UserError


def help_field(default: Any, help: str, *, section: type | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a help line; mutable defaults are copied per instance.

    ``section``: the field is the optional section of one kind (a dataclass of that type, or None when
    the kind is not in use); :func:`to_dict` and :func:`describe` leave an unset section out."""
    metadata = {"help": help} if section is None else {"help": help, "section": section}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    bad = UserError(f"config key '{key}': {value!r} is not allowed; expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [arg for arg in args if arg is not type(None)]
        if len(others) == 1:  # X | None: a value is an X, and X's own error names the inner key
            return _convert(value, others[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "off" in allowed:  # YAML 1.1 reads an unquoted off (or no) as false
            return "off"
        if isinstance(value, str) and value in allowed:
            return value
        if not isinstance(value, (str, bool)) and value in allowed:  # numeric choices (block_size: 16 ...)
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # PyYAML reads YAML 1.1, where '3e-5' (no dot) is a string; it means the float.
        elif isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            number = float(value)
        else:
            raise bad
        # No setting of ours means anything at .inf or .nan (a learning rate of .inf trains a whole
        # teacher, then fails on the student): refused here, once for every float key.
        if not math.isfinite(number):
            raise UserError(f"config key '{key}': {value!r} is not allowed; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{full}'{hint}; allowed: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any, *, sections: bool = True) -> Any:
    """Plain data of a config (what YAML, JSON and checkpoints hold), without the sections of kinds not in
    use; ``sections=False`` leaves every section out (the defaults a config file is merged onto, so that
    the sections follow the kinds the file chooses)."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if "section" in f.metadata and (value is None or not sections):
                continue
            out[f.name] = to_dict(value, sections=sections)
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v, sections=sections) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v, sections=sections) for k, v in cfg.items()}
    return copy.deepcopy(cfg)


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], value); the value is read as YAML (safe_load)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override '{text}' has an empty key; use dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def _list_item(items: list, key: str) -> Any:
    """The item of a list of mappings that ``key`` names: its ``name`` field, or its index."""
    named = [item for item in items if isinstance(item, dict) and item.get("name") == key]
    if named:
        return named[0]
    if key.isdigit() and int(key) < len(items) and isinstance(items[int(key)], dict):
        return items[int(key)]
    return None


def set_path(tree: dict, path: list[str], value: Any) -> None:
    """Set ``value`` at the dotted ``path``; an item of a list of named mappings (``teachers``) is
    reached by its name or index: ``teachers.cnn.train.steps=500``."""
    node, i = tree, 0
    while i < len(path) - 1:
        part, child = path[i], node.get(path[i])
        if isinstance(child, list):
            item = _list_item(child, path[i + 1]) if i + 2 < len(path) else None
            if item is None:
                raise UserError(
                    f"override '{'.'.join(path)}': '{part}' is a list; set it whole, e.g. {part}=[...], or a key of "
                    f"one of its named items, {part}.<name>.<key>=value"
                )
            node, i = item, i + 2
            continue
        if not isinstance(child, dict):
            if part not in node:
                # Leave the unknown key in place: validation names it with the allowed keys.
                node[part] = {}
            else:
                raise UserError(f"override '{'.'.join(path)}': '{'.'.join(path[: i + 1])}' is not a mapping")
        node, i = node[part], i + 1
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file '{path}' is a folder; give a YAML file (a run folder holds config.yaml)")
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file '{path}' is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r}); "
            "save it as UTF-8 YAML"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def describe(cfg: Any, indent: int = 0) -> str:
    """Commented YAML of a config: every field with its value and one-line description."""
    lines: list[str] = []
    pad = "  " * indent
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        help_text = f.metadata.get("help", "")
        if value is None and "section" in f.metadata:
            continue  # the section of a kind not in use
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:  # {help_text}")
            lines.append(describe(value, indent + 1))
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            lines.append(f"{pad}{f.name}:  # {help_text}")
            for item in value:
                body = describe(item, indent + 2).splitlines()
                first = body[0].lstrip()
                lines.append(f"{pad}  - {first}")
                lines.extend(body[1:])
        else:
            rendered = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            if rendered.endswith("\n...") or rendered.endswith("..."):
                rendered = rendered.replace("\n...", "").removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {rendered}  # {help_text}")
    return "\n".join(lines)
