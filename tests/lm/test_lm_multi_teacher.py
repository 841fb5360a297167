"""Several causal-LM teachers end to end through the CLI (tiny Llama folders over one tokenizer, JSONL
records): each token routed by its record's ``teacher`` field to that teacher's tempered distribution and
the unrouted ones to the rule, the adaptive weight logged, a label-free LM student that reads no label,
and a record naming no teacher refused in one line with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distilflow.cli import main
from distilflow.data.stdlib_corpus import stdlib_root, train_tokenizer
from distilflow.models.hf import build_causal_lm
from distilflow.teachers import multi

from .conftest import family_config

TEMPERATURE = 2.0
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
ROUTES = ("left", "right", None)  # record i is distilled from ROUTES[i % 3] (None: no route)


def _save(folder: Path, tokenizer, *, layers: int, hidden: int, seed: int) -> Path:
    torch.manual_seed(seed)
    build_causal_lm(family_config("llama", len(tokenizer), layers=layers, hidden=hidden)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _other_tokenizer(folder: Path):
    return train_tokenizer([(stdlib_root() / "textwrap.py").read_text(encoding="utf-8")], 320, folder)


def _record(i: int) -> dict:
    record = {"prompt": f"#{i} " + " ".join(WORDS[: i % 3 + 1]), "completion": " " + " ".join(WORDS[i % 7 :][:3])}
    if ROUTES[i % 3] is not None:
        record["teacher"] = ROUTES[i % 3]
    return record


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_multi")
    paths = {
        "left": _save(root / "left", tokenizer, layers=2, hidden=32, seed=1),
        "right": _save(root / "right", tokenizer, layers=1, hidden=32, seed=2),
        "student": _save(root / "student", tokenizer, layers=1, hidden=16, seed=3),
        # Another tokenizer of the same size, trained on other text: it differs from ours at some ids.
        "foreign": _save(root / "foreign", _other_tokenizer(root / "other_tok"), layers=1, hidden=32, seed=4),
        "data": root / "data.jsonl",
        "bad": root / "bad.jsonl",
    }
    paths["data"].write_text("".join(json.dumps(_record(i)) + "\n" for i in range(36)))
    bad = [_record(0), {**_record(1), "teacher": "middle"}]
    paths["bad"].write_text("".join(json.dumps(r) + "\n" for r in bad))
    return paths


def _args(folders: dict[str, Path], out: Path, *extra: str, data: str = "data", right: str = "right") -> list[str]:
    paths = {"left": folders["left"], "right": folders[right]}
    teachers = ", ".join(f"{{name: {n}, model: {{arch: hf, hf: {{path: '{p}'}}}}}}" for n, p in paths.items())
    return [
        f"output_dir={out}",
        "data.source=text",
        f"data.text.path={folders[data]}",
        "data.text.test_fraction=0.25",
        "data.text.seq_len=32",
        "data.text.pack=false",
        "data.teacher_column=teacher",
        "threads=1",
        f"teachers=[{teachers}]",
        "student.model.arch=hf",
        f"student.model.hf.path={folders['student']}",
        "distill.feature_layers=[]",
        f"distill.temperature={TEMPERATURE}",
        "distill.phases=[{name: kd, fraction: 0.5, terms: [kd]}, {name: joint, fraction: 0.5, terms: [kd, ce]}]",
        "student.train.steps=4",
        "student.train.batch_size=4",
        "student.train.warmup_steps=1",
        "student.train.eval_every=4",
        "student.train.log_every=1",
        "deploy.enabled=false",
        *extra,
        "--no-tensorboard",
    ]


def _student_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "student" and "loss" in r]


def test_each_token_takes_its_records_teacher_and_the_rest_the_mean(folders, tmp_path, monkeypatch):
    seen = []
    real = multi.MultiTeacher.__call__

    def spy(self, batch, *, features):
        out = real(self, batch, features=features)
        members = [o.logits.detach().double() for o in self.member_outputs(batch, features=False)]
        seen.append((batch["route"][:, 1:].clone(), self.targets(batch).kd_mask, members, out.logits.log_probs_at()))
        return out

    monkeypatch.setattr(multi.MultiTeacher, "__call__", spy)
    out = tmp_path / "run"
    assert main(["run", *_args(folders, out, "distill.adaptive.tau=1.0")]) == 0
    checked = {0: 0, 1: 0, -1: 0}
    for route, mask, members, mixed in seen:
        tempered = [torch.softmax(m / TEMPERATURE, -1) for m in members]  # (B, T - 1, V) each
        for index in mask.nonzero().tolist():
            b, t = index
            r = int(route[b, t])
            want = tempered[r][b, t] if r >= 0 else 0.5 * (tempered[0][b, t] + tempered[1][b, t])
            torch.testing.assert_close(mixed[b, t].exp().double(), want, rtol=1e-5, atol=1e-7)
            checked[r] += 1
    assert min(checked.values()) > 0  # routed to each teacher, and unrouted, tokens were all seen
    results = json.loads((out / "results.json").read_text())
    assert set(results["teachers"]) == {"left", "right"} and math.isfinite(results["student"]["perplexity"])
    rows = _student_rows(out)
    assert rows and all(r["kd_position_weight_mean"] == pytest.approx(1.0, rel=1e-6) for r in rows)


def test_a_label_free_lm_student_reads_no_label(folders, tmp_path, labels_read):
    labels_seen = labels_read()
    out = tmp_path / "run"
    extra = ["distill.label_free=true", "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]"]
    assert main(["distill", *_args(folders, out, *extra, "distill.combine.rule=entropy")]) == 0
    assert labels_seen and not any(labels_seen)  # distill alone: the student's steps only
    assert all("ce" not in r and r["kd"] > 0 for r in _student_rows(out))


def test_a_record_naming_no_teacher_is_one_line_and_nothing_is_written(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *_args(folders, out, data="bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilflow: error: ") and "\n" not in err
    assert "line 2" in err and "'teacher' is 'middle', which names no teacher (teachers: left, right)" in err
    assert not out.exists()


def test_a_teacher_of_another_tokenizer_is_one_line_and_nothing_is_written(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *_args(folders, out, right="foreign")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilflow: error: ") and "\n" not in err and "tokenizers differ at id" in err
    assert not out.exists()


def test_cache_teacher_loads_the_teachers_one_at_a_time(folders, tmp_path, monkeypatch):
    """Each teacher folder is loaded only once the one before is freed (preflight and caching alike), so
    teachers that do not fit memory together can be cached; the caches are then read without a model."""
    import gc
    import weakref

    from distilflow.tasks import causal_lm_workload

    real, alive_at_load, loaded = causal_lm_workload.load_causal_lm, [], []

    def tracked(path, *, role, **kwargs):
        if role == "teacher":
            gc.collect()
            alive_at_load.append(sum(ref() is not None for ref in loaded))
        model, tokenizer = real(path, role=role, **kwargs)
        if role == "teacher":
            loaded.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(causal_lm_workload, "load_causal_lm", tracked)
    out = tmp_path / "run"
    caching = ["cache.use=true", "cache.format=topk", "cache.k=8"]
    assert main(["cache-teacher", *[a for a in _args(folders, out, *caching) if a != "--no-tensorboard"]]) == 0
    assert len(alive_at_load) >= 2 and alive_at_load == [0] * len(alive_at_load)
    for name in ("left", "right"):
        assert (out / "teachers" / name / "teacher_cache" / "manifest.json").is_file()
    loads = len(alive_at_load)
    assert main(["distill", *_args(folders, out, *caching)]) == 0  # from the caches: no teacher loaded
    assert len(alive_at_load) == loads
