"""Property-based tests (hypothesis): whatever the input, the config parser and the data readers give a
result or one UserError of one line, never another exception.

Bounded (max_examples, no deadline on a loaded machine) so that the file costs seconds. Inputs are
drawn from what users really type (the real dotted keys, YAML scalars and flow collections, typos)
and from random bytes and rows.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distilflow.config import Config, DataConfig, FilesConfig, load_config, to_dict
from distilflow.data.classification import load_classification
from distilflow.data.tabular import read_csv_table
from distilflow.data.text import read_records
from distilflow.errors import UserError
from distilflow.generate.prompts import read_prompts

BOUNDED = settings(
    max_examples=60,
    deadline=None,  # 2 shared cores: time per example varies, the count bounds the cost
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure is reproducible
    database=None,  # nothing written into the checkout (.hypothesis/)
)


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        keys.append(name)
        if isinstance(value, dict):
            keys += _dotted_keys(value, name)
    return keys


# Every key of the default config (classifier) and of a causal-LM config (its own model and data sections).
LM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_stdlib.yaml"
KEYS = sorted(set(_dotted_keys(to_dict(load_config()))) | set(_dotted_keys(to_dict(load_config(LM_CONFIG)))))
SCALARS = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "~", ".nan", ".inf", "-.inf", "auto", "fused", "mlp", "hf", "''"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
    st.dictionaries(st.sampled_from(["name", "fraction", "terms", "x", "steps"]), SCALARS, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
    ),
)
KEY = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + "x"),  # a typo
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0", min_size=0, max_size=12),
)
OVERRIDE = st.one_of(st.tuples(KEY, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=20))


def _one_line(error: UserError) -> None:
    assert str(error) and "\n" not in str(error), repr(str(error))


@BOUNDED
@given(overrides=st.lists(OVERRIDE, max_size=4))
def test_overrides_give_a_config_or_one_line(overrides):
    try:
        cfg = load_config(None, overrides)
    except UserError as error:
        _one_line(error)
    else:
        assert isinstance(cfg, Config)


@BOUNDED
@given(text=st.one_of(st.text(max_size=200), st.lists(st.tuples(KEY, VALUES), max_size=6)))
def test_config_files_give_a_config_or_one_line(tmp_path_factory, text):
    """A YAML file of any text, or of key: value lines (nested keys written dotted, which is wrong)."""
    if isinstance(text, list):
        text = "".join(f"{key}: {value}\n" for key, value in text)
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except UserError as error:
        _one_line(error)
    else:
        assert isinstance(cfg, Config)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["text", "prompt", "completion", "messages", "role", "content"]), inner),
    ),
    max_leaves=8,
)
LINE = st.one_of(JSON_VALUES.map(json.dumps), st.text(max_size=30))


def _read(reader, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader's warning is a failure too
        try:
            return reader(path)
        except UserError as error:
            _one_line(error)
            return None


@BOUNDED
@given(data=st.one_of(st.binary(max_size=200), st.lists(LINE, max_size=6).map(lambda ls: "\n".join(ls).encode())))
def test_jsonl_readers_give_records_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("jsonl") / "d.jsonl"
    path.write_bytes(data)
    result = _read(read_records, path)
    if result is not None:
        assert result.records and all(r.completion is not None or r.messages for r in result.records)
    prompts = _read(read_prompts, path)
    if prompts is not None:
        assert prompts.prompts and all(p.text or p.messages for p in prompts.prompts)


CELL = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=5),
)


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


@BOUNDED
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.lists(st.lists(CELL, max_size=4), max_size=8).map(lambda rows: _csv([["a", "b", "label"], *rows])),
    )
)
def test_csv_readers_give_a_table_or_one_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("csv") / "d.csv"
    path.write_bytes(data)
    table = _read(lambda p: read_csv_table(p, f"data file '{p}'"), path)
    if table is not None:
        header, values = table
        assert values.shape[1] == len(header) and values.shape[0] >= 1
    cfg = DataConfig(source="csv", files=FilesConfig(path=str(path), test_fraction=0.5))
    data_set = _read(lambda p: load_classification(cfg), path)
    if data_set is not None:
        assert data_set.num_classes >= 2 and len(data_set.train_x) >= 1


def test_the_properties_can_fail():
    """A reader that raises something else is caught by the same helper (the assertion is live)."""

    def broken(path):
        raise KeyError("x")

    with pytest.raises(KeyError):
        _read(broken, Path("x"))
    with pytest.raises(AssertionError):
        _one_line(ValueError("two\nlines"))
    assert str(UserError("a value 'x\ny' quoted")) == "a value 'x\\ny' quoted"  # one line whatever it quotes
