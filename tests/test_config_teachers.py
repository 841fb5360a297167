"""The config of several teachers, the adaptive KD weight and label-free runs: keys, spelling, and one
line with exit 2 (nothing written) for every bad input the issue lists that the config alone shows."""

from __future__ import annotations

import dataclasses

import pytest

from distilflow.cli import main
from distilflow.config import AdaptiveConfig, CombineConfig, config_from_dict, describe, load_config, to_dict
from distilflow.config_teachers import adaptive_of, combination_of
from distilflow.errors import UserError
from distilflow.losses.adaptive import AdaptiveKD
from distilflow.teachers.weighting import Combination

TWO = (
    "teachers=[{name: cnn, model: {arch: cnn1d}}, {name: wide, model: {arch: mlp, mlp: {hidden: [512]}}}]",
    "distill.feature_teacher=cnn",
)


def test_the_sections_have_exactly_the_fields_of_what_they_configure():
    assert [f.name for f in dataclasses.fields(CombineConfig)] == [f.name for f in dataclasses.fields(Combination)]
    assert [f.name for f in dataclasses.fields(AdaptiveConfig)] == [f.name for f in dataclasses.fields(AdaptiveKD)]
    cfg = load_config(
        overrides=[
            *TWO,
            "distill.combine={rule: camkd, weights: [1, 3], tau: 0.5, fallback: weights, confidence_temperature: 2}",
            "distill.adaptive={source: correctness, prefer: uncertain, tau: 2, confidence_temperature: 1.5}",
        ]
    )
    assert combination_of(cfg) == Combination("camkd", (1.0, 3.0), 0.5, "weights", 2.0)
    assert adaptive_of(cfg) == AdaptiveKD("correctness", "uncertain", 2.0, 1.5)


def test_teachers_replace_teacher_and_are_reached_by_name():
    cfg = load_config(overrides=[*TWO, "teachers.wide.train.steps=300", "teachers.0.model.cnn.channels=[8]"])
    assert cfg.teacher is None and [t.name for t in cfg.teachers] == ["cnn", "wide"]
    assert cfg.teachers[1].train.steps == 300 and cfg.teachers[0].model.cnn.channels == [8]
    assert cfg.distill.combine == CombineConfig()  # the rule in use is on record
    # The feature pairs default to the feature teacher's last hidden layer (a CNN's pooled features).
    assert [(p.student, p.teacher) for p in cfg.distill.feature_layers] == [("layers.3", "pool")]
    saved = to_dict(cfg)
    assert saved["teacher"] is None and "teachers:" in describe(cfg)
    assert to_dict(config_from_dict(saved)) == saved  # a run folder's config.yaml reads back the same


def test_one_teacher_reads_no_combination_and_keeps_its_defaults():
    cfg = load_config()
    assert cfg.teachers is None and cfg.teacher.model.arch == "cnn1d" and cfg.distill.combine is None
    assert cfg.distill.adaptive is None and cfg.distill.label_free is False


BAD = [
    ([*TWO, "teacher.train.steps=5"], "config keys 'teacher' and 'teachers' are both given"),
    (["teachers=[{name: a}, {name: a}]", "distill.feature_teacher=a"], "teacher names must be unique (a given twice)"),
    ([*TWO, "distill.combine.rule=weights", "distill.combine.weights=[1, 0]"], "weights must be positive numbers"),
    ([*TWO, "distill.combine.rule=weights", "distill.combine.weights=[1, -2]"], "weights must be positive numbers"),
    ([*TWO, "distill.combine.rule=weights", "distill.combine.weights=[1, 2, 3]"], "got 3 weights for 2 teachers"),
    ([*TWO, "distill.combine.rule=weights"], "needs a list of 2 positive weights"),
    ([TWO[0], "distill.feature_teacher=big"], "'distill.feature_teacher': 'big' is not allowed; names no teacher"),
    ([TWO[0]], "a phase uses the 'feature' term with 2 teachers; name the one to align with (cnn, wide)"),
    (["distill.feature_teacher=cnn"], "names no teacher; the teachers are teacher"),
    (["data.teacher_column=teacher"], "'data.teacher_column': 'teacher' is not allowed; routes rows to one of several"),
    ([*TWO, "data.teacher_column=teacher"], "data.source 'mnist1d' has no columns"),
    (["distill.combine.rule=entropy"], "'distill.combine': 'given' is not allowed; is read with 'teachers:' only"),
    (["teachers=[{name: 'a b'}]"], "name each teacher: letters, digits"),
    (["teachers=[]"], "list one or more named teachers"),
    (["teacher=null"], "give 'teacher:' (one teacher) or 'teachers:'"),
    (["distill.label_free=true"], "a label-free student has no 'ce' term"),
    (
        [
            *TWO,
            "distill.label_free=true",
            "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]",
            "distill.combine.rule=correctness",
        ],
        "reads labels, and a label-free run has none",
    ),
    ([*TWO, "distill.adaptive.tau=0"], "adaptive KD weight tau must be a positive number"),
    ([*TWO, "cache.use=true", "cache.format=sampled"], "several teachers combine full or topk caches only"),
    (["cache.use=true", "cache.format=sampled", "distill.adaptive.tau=1"], "a sampled cache holds drawn ids"),
    ([*TWO, "dist.shard_teacher=true"], "'dist.shard_teacher': True is not allowed; not with 'teachers:'"),
    # A served teacher (issue 19) is one teacher's path: refused among several, by value or by override.
    (
        [
            "teachers=[{name: a}, {name: b, server: {url: 'http://127.0.0.1:8000', model: t}}]",
            "distill.feature_teacher=a",
        ],
        "'teachers.b.server': a teacher served by vLLM is supported with 'teacher:' only",
    ),
    ([*TWO, "teachers.wide.server.url=http://127.0.0.1:8000"], "'teachers.wide.server': a teacher served by vLLM"),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(overrides, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilflow: error: ") and "\n" not in err and expected in err, err
    assert not out.exists()
    with pytest.raises(UserError):
        load_config(overrides=overrides)


def test_a_teacher_with_its_own_seed_is_trained_from_it_and_the_others_from_the_runs():
    from distilflow.teacher_views import view_config

    same = "teachers=[{name: a, model: {arch: cnn1d}, seed: 7}, {name: b, model: {arch: cnn1d}}]"
    cfg = load_config(overrides=[same, "distill.feature_teacher=a", "seed=3"])
    a, b = (view_config(cfg, entry, feature_teacher=entry.name == "a") for entry in cfg.teachers)
    assert (a.seed, b.seed) == (7, 3) and a.teacher.model.arch == b.teacher.model.arch == "cnn1d"
    assert str(a.run_dir).endswith("teachers/a") and b.cache.features is False
