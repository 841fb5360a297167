"""Every shipped config loads and validates; the written-out default and the docs are current."""

import dataclasses
import sys
from pathlib import Path

import pytest

from distilflow.config import Config, describe, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_config_docs  # noqa: E402


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_mnist1d_yaml_is_the_builtin_default():
    assert to_dict(load_config(ROOT / "configs" / "mnist1d.yaml")) == to_dict(load_config())


def test_config_reference_is_current():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert gen_config_docs.reference_block() in doc and gen_config_docs.sections_block() in doc
    assert (ROOT / "configs" / "mnist1d.yaml").read_text().endswith(describe(load_config()) + "\n")


def _field_names(cls) -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if "section" in f.metadata:  # a model kind's or data source's section (None unless in use)
            names |= _field_names(f.metadata["section"])
        elif dataclasses.is_dataclass(default):
            names |= _field_names(type(default))
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            names |= _field_names(type(default[0]))
    return names


def test_reference_names_every_field():
    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    missing = [name for name in _field_names(Config) if f"{name}:" not in doc]
    assert not missing
