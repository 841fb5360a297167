"""Config: defaults, YAML + dotted overrides, strict validation, describe, round trip."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from distilflow.config import (
    Config,
    FeatureLayerConfig,
    PhaseConfig,
    config_from_dict,
    describe,
    load_config,
    parse_override,
    to_dict,
)
from distilflow.errors import UserError


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_defaults_load_and_match_the_article():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.distill.temperature == 2.0
    assert cfg.distill.kd_weight.base_weight == 0.7
    assert cfg.distill.ce_weight == 0.3
    assert [p.name for p in cfg.distill.phases] == ["feature_alignment", "soft_label_pretrain", "joint_optimization"]
    assert [p.fraction for p in cfg.distill.phases] == [0.2, 0.5, 0.3]
    assert [p.terms for p in cfg.distill.phases] == [["feature"], ["kd"], ["kd", "ce"]]
    assert cfg.teacher.model.arch == "cnn1d"
    assert cfg.student.model.arch == "mlp"
    assert cfg.student.train.steps == 4000


def test_mutable_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.student.model.mlp.hidden.append(7)
    a.distill.phases[0].terms.append("kd")
    assert b.student.model.mlp.hidden == [192, 192]
    assert b.distill.phases[0].terms == ["feature"]
    assert Config().distill.phases[0].terms == ["feature"]


# ---------------------------------------------------------------- YAML file and overrides


def test_yaml_file_then_overrides(tmp_path):
    path = write(
        tmp_path,
        "name: tiny\nstudent:\n  train:\n    steps: 300\n    lr: 0.01\ndistill:\n  temperature: 4\n",
    )
    cfg = load_config(path, ["student.train.steps=500", "distill.divergence=jsd", "student.model.mlp.hidden=[16, 8]"])
    assert cfg.name == "tiny"
    assert cfg.student.train.steps == 500  # override beats the file
    assert cfg.student.train.lr == 0.01  # file beats the default
    assert cfg.distill.temperature == 4.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.distill.divergence == "jsd"
    assert cfg.student.model.mlp.hidden == [16, 8]
    # Keys the file did not name keep their defaults, nested ones included.
    assert cfg.student.train.batch_size == 128
    assert cfg.teacher.train.steps == 2000


def test_override_values_are_parsed_as_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a={x: 1}") == (["a"], {"x": 1})
    assert parse_override("a=x=y") == (["a"], "x=y")  # only the first '=' splits
    assert parse_override("a=") == (["a"], "")


def test_scientific_floats_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads '3e-5' as a string; the article's config writes lr exactly like this.
    path = write(tmp_path, "student:\n  train:\n    lr: 3e-5\n    min_lr: 1E-6\n")
    cfg = load_config(path, ["teacher.train.lr=2e-3"])
    assert cfg.student.train.lr == 3e-5
    assert cfg.student.train.min_lr == 1e-6
    assert cfg.teacher.train.lr == 2e-3
    with pytest.raises(UserError, match=r"'student\.train\.steps': '1e3'"):
        load_config(overrides=["student.train.steps=1e3"])  # an int field stays strict


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_malformed_overrides(bad):
    with pytest.raises(UserError, match=re.escape(bad)):
        load_config(overrides=[bad])


def test_override_into_a_scalar_or_a_list_is_refused():
    with pytest.raises(UserError, match="'name' is not a mapping"):
        load_config(overrides=["name.x=1"])
    with pytest.raises(UserError, match="'phases' is a list; set it whole"):
        load_config(overrides=["distill.phases.no_such_phase.fraction=1"])


def test_override_reaches_an_item_of_a_list_by_name_or_index():
    cfg = load_config(overrides=["distill.phases.soft_label_pretrain.terms=[kd, ce]", "distill.phases.0.name=warm"])
    assert cfg.distill.phases[1].terms == ["kd", "ce"] and cfg.distill.phases[0].name == "warm"
    assert cfg.distill.phases[2].terms == ["kd", "ce"]  # the others as they were


def test_override_replaces_a_whole_list_of_phases():
    cfg = load_config(overrides=["distill.phases=[{name: only, fraction: 1.0, terms: [kd, ce]}]"])
    assert len(cfg.distill.phases) == 1
    assert cfg.distill.phases[0] == PhaseConfig(name="only", fraction=1.0, steps=None, terms=["kd", "ce"])


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_names_key_suggestion_and_allowed():
    with pytest.raises(UserError) as err:
        load_config(overrides=["distill.temprature=3"])
    msg = str(err.value)
    assert "'distill.temprature'" in msg
    assert "did you mean 'temperature'" in msg
    for allowed in ("temperature", "divergence", "jsd_beta", "kd_weight", "phases"):
        assert allowed in msg
    assert "\n" not in msg


def test_unknown_top_level_key_in_file(tmp_path):
    path = write(tmp_path, "studnet:\n  train:\n    steps: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'studnet'" in msg and "did you mean 'student'" in msg and "allowed:" in msg


def test_unknown_key_without_close_match_lists_allowed_keys():
    with pytest.raises(UserError) as err:
        load_config(overrides=["student.train.zzzzzz=1"])
    msg = str(err.value)
    assert "'student.train.zzzzzz'" in msg and "did you mean" not in msg
    assert "steps" in msg and "batch_size" in msg


def test_unknown_key_inside_a_list_item_names_the_index():
    with pytest.raises(UserError, match=r"'distill\.phases\[1\]\.fractoin'.*did you mean 'fraction'"):
        load_config(
            overrides=["distill.phases=[{name: a, fraction: 0.5}, {name: b, fractoin: 0.5}]"],
        )


# ---------------------------------------------------------------- wrong types and values


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("student.train.steps=abc", "student.train.steps", "'abc'"),
        ("student.train.steps=1.5", "student.train.steps", "1.5"),
        ("student.train.steps=true", "student.train.steps", "True"),
        ("distill.temperature=[1]", "distill.temperature", "[1]"),
        ("distill.temperature=hot", "distill.temperature", "'hot'"),
        ("distill.divergence=kl", "distill.divergence", "'kl'"),
        ("student.model.mlp.hidden=[8, x]", "student.model.mlp.hidden[1]", "'x'"),
        ("distill.kd_weight=3", "distill.kd_weight", "3"),
        ("name=[a]", "name", "['a']"),
    ],
)
def test_wrong_type_names_key_and_value(override, key, value):
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert value in msg
    assert "expected" in msg


def test_wrong_type_message_says_what_is_allowed():
    with pytest.raises(UserError) as err:
        load_config(overrides=["distill.divergence=kl"])
    assert "'forward_kl' | 'reverse_kl' | 'jsd'" in str(err.value)
    with pytest.raises(UserError, match="expected int"):
        load_config(overrides=["student.train.steps=abc"])
    with pytest.raises(UserError, match="expected float"):
        load_config(overrides=["distill.temperature=[1]"])


@pytest.mark.parametrize("temperature", ["0", "-1", "-0.5"])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(UserError) as err:
        load_config(overrides=[f"distill.temperature={temperature}"])
    msg = str(err.value)
    assert "'distill.temperature'" in msg and "> 0" in msg


def test_small_positive_temperature_is_fine():
    assert load_config(overrides=["distill.temperature=0.1"]).distill.temperature == 0.1


@pytest.mark.parametrize(
    "fractions, shown",
    [((0.2, 0.5, 0.2), "0.9"), ((0.5, 0.6, 0.3), "1.4"), ((0.3, 0.3, 0.3), "0.9")],
)
def test_phase_fractions_must_sum_to_one(fractions, shown):
    phases = ", ".join(f"{{name: p{i}, fraction: {f}}}" for i, f in enumerate(fractions))
    with pytest.raises(UserError) as err:
        load_config(overrides=[f"distill.phases=[{phases}]"])
    msg = str(err.value)
    assert "distill.phases" in msg and f"sum to {shown}" in msg and "must sum to 1" in msg


def test_phase_fractions_that_sum_to_one_only_as_decimals_are_accepted():
    # In binary floating point these do not sum to 1.0, but the user means exactly 1.
    assert 0.7 + 0.2 + 0.1 != 1.0
    cfg = load_config(
        overrides=["distill.phases=[{name: a, fraction: 0.7}, {name: b, fraction: 0.2}, {name: c, fraction: 0.1}]"]
    )
    assert [p.fraction for p in cfg.distill.phases] == [0.7, 0.2, 0.1]


def test_phase_needs_exactly_one_of_fraction_or_steps():
    with pytest.raises(UserError, match=r"distill\.phases\[0\].*exactly one of fraction or steps"):
        load_config(overrides=["distill.phases=[{name: a, fraction: 1.0, steps: 4000}]"])
    with pytest.raises(UserError, match=r"distill\.phases\[0\].*exactly one of fraction or steps"):
        load_config(overrides=["distill.phases=[{name: a}]"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("distill.jsd_beta=1", "distill.jsd_beta"),
        ("distill.jsd_beta=0", "distill.jsd_beta"),
        ("distill.kd_weight.decay_rate=0", "distill.kd_weight.decay_rate"),
        ("distill.kd_weight.min_weight=0.9", "distill.kd_weight.min_weight"),
        ("student.train.min_lr=1.0", "student.train.min_lr"),
        ("teacher.model.cnn.dropout=1.0", "teacher.model.cnn.dropout"),
        ("data.source=npz", "data.files.path"),
        ("data.mnist1d.transfer_seed=42", "data.mnist1d.transfer_seed"),
        ("distill.feature_layers=[]", "distill.feature_layers"),
        ("distill.cross_tokenizer=hybrid", "distill.cross_tokenizer"),  # classifiers have no tokenizers
        ("distill.hybrid_matched_weight=-1", "distill.hybrid_matched_weight"),
    ],
)
def test_value_rules(override, key):
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    assert f"'{key}'" in str(err.value)


def test_value_rules_batch_size_divisible_by_grad_accum():
    with pytest.raises(UserError, match=r"'student\.train\.batch_size': 10 .*divisible by grad_accum \(3\)"):
        load_config(overrides=["student.train.grad_accum=3", "student.train.batch_size=10"])
    cfg = load_config(overrides=["student.train.grad_accum=3", "student.train.batch_size=12"])
    assert cfg.student.train.grad_accum == 3


# ---------------------------------------------------------------- files that are not configs


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    with pytest.raises(UserError, match=f"must hold a mapping of keys, not {kind}"):
        load_config(write(tmp_path, text))


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: a\nstudent: [unclosed\n  train: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    msg = str(err.value)
    assert "not valid YAML" in msg and re.search(r"at line \d+", msg) and str(path) in msg


def test_yaml_custom_tags_are_refused(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == load_config()


# ---------------------------------------------------------------- describe and round trips


def _all_fields(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None and "section" in f.metadata:
            continue  # the section of a kind not in use: neither held nor printed
        yield f.name, f.metadata["help"]
        if dataclasses.is_dataclass(value):
            yield from _all_fields(value)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            yield from _all_fields(value[0])


def test_describe_prints_every_field_with_a_help_comment():
    cfg = load_config()
    text = describe(cfg)
    lines = text.splitlines()
    fields = list(_all_fields(cfg))
    assert len(fields) > 50
    for name, help_text in fields:
        assert help_text, f"field {name} has no help"
        matching = [line for line in lines if re.match(rf"^\s*(- )?{name}:", line)]
        assert matching, f"field {name} is not printed"
        assert any(line.endswith(f"# {help_text}") for line in matching), f"field {name} lacks '# {help_text}'"
    for line in lines:
        assert "  # " in line, line


def test_describe_is_yaml_that_loads_back_to_the_same_config():
    cfg = load_config(
        overrides=[
            "name=run #1",
            'output_dir="out: here"',
            "student.train.lr=3e-5",
            "student.model.mlp.hidden=[8]",
            "distill.feature_layers=[{student: layers.1, teacher: features.2, weight: 0.5}]",
        ]
    )
    tree = yaml.safe_load(describe(cfg))
    assert tree == to_dict(cfg)
    assert config_from_dict(tree) == cfg


def test_describe_empty_list_of_layers():
    cfg = load_config(overrides=["distill.feature_layers=[]", "distill.phases=[{name: kd, fraction: 1.0}]"])
    tree = yaml.safe_load(describe(cfg))
    assert tree["distill"]["feature_layers"] == []
    assert config_from_dict(tree) == cfg


def test_to_dict_round_trip():
    cfg = load_config(overrides=["distill.divergence=reverse_kl", "seed=7", "data.source=npz", "data.files.path=x.npz"])
    tree = to_dict(cfg)
    assert tree["distill"]["divergence"] == "reverse_kl"
    assert tree["distill"]["feature_layers"] == [{"student": "layers.3", "teacher": "pool", "weight": 1.0}]
    back = config_from_dict(tree)
    assert back == cfg
    assert isinstance(back.distill.feature_layers[0], FeatureLayerConfig)
    assert isinstance(back.distill.phases[2], PhaseConfig)
    # JSON-like data only: survives a YAML dump and reload unchanged.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(tree))) == cfg


def test_config_from_dict_validates():
    tree = to_dict(Config())
    tree["distill"]["temperature"] = 0.0
    with pytest.raises(UserError, match="distill.temperature"):
        config_from_dict(tree)
    tree = to_dict(Config())
    tree["student"]["train"]["stepz"] = 1
    with pytest.raises(UserError, match="did you mean 'steps'"):
        config_from_dict(tree)


# ---------------------------------------------------------------- values that type checks let through


@pytest.mark.parametrize(
    "override",
    [
        "student.train.lr=.inf",
        "student.train.lr=.nan",
        "teacher.train.grad_clip=.inf",
        "distill.ce_weight=-.inf",
        "distill.kd_weight.base_weight=.nan",
        "distill.temperature=.inf",
    ],
)
def test_non_finite_numbers_are_refused_at_load_time(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"'{re.escape(key)}'.*expected a finite number"):
        load_config(overrides=[override])


def test_non_finite_number_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\n  train:\n    lr: .inf\n")
    with pytest.raises(UserError, match=r"'student\.train\.lr': inf .*finite"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("student.train.lr=0", "student.train.lr"),
        ("teacher.train.lr=-0.1", "teacher.train.lr"),
        ("distill.ce_weight=0", "distill.ce_weight"),
        ("distill.feature_weight=-1", "distill.feature_weight"),
        ("distill.kd_weight.base_weight=0", "distill.kd_weight.base_weight"),
        ("distill.feature_layers=[{student: layers.3, teacher: pool, weight: 0}]", "distill.feature_layers[0].weight"),
        ("teacher.train.grad_clip=-1", "teacher.train.grad_clip"),
    ],
)
def test_non_positive_rates_weights_and_clip_are_refused(override, key):
    with pytest.raises(UserError, match=rf"'{re.escape(key)}'.*must be"):
        load_config(overrides=[override])


@pytest.mark.parametrize("steps", [0, -5])
def test_negative_steps_are_named_before_the_phase_plan(steps):
    with pytest.raises(UserError, match=rf"'student\.train\.steps': {steps} is not allowed; must be >= 1"):
        load_config(overrides=[f"student.train.steps={steps}"])


def test_two_phases_with_one_name_are_refused():
    phases = "distill.phases=[{name: kd, fraction: 0.5, terms: [kd]}, {name: kd, fraction: 0.5, terms: [ce]}]"
    with pytest.raises(UserError, match=r"'distill\.phases'.*unique \(kd given twice\)"):
        load_config(overrides=[phases])


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)), "student:\n  train:\n    steps: 5\n".encode("utf-16")],
    ids=["binary", "utf-16"],
)
def test_a_config_that_is_not_utf8_text(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"c\.yaml' is not UTF-8 text"):
        load_config(path)


def test_a_folder_given_as_config(tmp_path):
    with pytest.raises(UserError, match="is a folder; give a YAML file"):
        load_config(tmp_path)


def test_layer_map_is_for_causal_lms_only():
    with pytest.raises(UserError, match="config key 'distill.layer_map': 'uniform' is not allowed; only causal LMs"):
        load_config(None, ["distill.layer_map=uniform"])


def test_an_unquoted_off_is_the_choice_off_not_false(tmp_path):
    """YAML 1.1 reads an unquoted ``off`` as false: where ``off`` is one of the choices, it means ``off``."""
    assert load_config(overrides=["distill.cross_tokenizer=off"]).distill.cross_tokenizer == "off"
    assert load_config(overrides=["reasoning.task=off"]).reasoning.task == "off"
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  cross_tokenizer: off\n")
    assert load_config(path).distill.cross_tokenizer == "off"
    # Elsewhere a boolean is not a choice: not for numeric choices, nor true for off.
    for override, key in (
        ("deploy.genai.block_size=true", "deploy.genai.block_size"),
        ("distill.cross_tokenizer=on", ""),
    ):
        with pytest.raises(UserError, match=rf"'{re.escape(key or 'distill.cross_tokenizer')}'.*not allowed"):
            load_config(overrides=[override])
