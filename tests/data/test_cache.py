"""Teacher-signal cache: cached distillation equals the live teacher, signals equal direct computations
from the teacher's logits, mismatched or damaged caches are refused, an interrupted write resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distilflow import pipeline, teacher_signals, teacher_stages
from distilflow.cli import main
from distilflow.config import load_config
from distilflow.data import cache as cache_mod
from distilflow.data import cache_writer
from distilflow.data.cache import read_manifest
from distilflow.data.cache_writer import encode, merge_draws
from distilflow.errors import UserError
from distilflow.losses.sparse import SparseTeacher
from distilflow.teachers.cached import CachedTeacher

ERROR = "distilflow: error: "
# Student phases of 10 steps with KD (and CE) from the first step, for the sparse-format runs.
KD_PHASES = "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]"


def _losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "student" and "loss" in r]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR), err
    return err[0]


@pytest.fixture(scope="module")
def classifier_teacher(tmp_path_factory, tiny_overrides) -> tuple[Path, list[str]]:
    """A trained tiny classifier teacher, and the overrides of a distillation with every phase."""
    root = tmp_path_factory.mktemp("cache_classifier")
    args = [*tiny_overrides(root / "live"), "cache.features=true", "cache.shard_rows=50"]
    assert main(["train-teacher", *args]) == 0
    return root, args


def _with_teacher(root: Path, args: list[str], out: str, *extra: str) -> list[str]:
    """The same config in another folder, distilled from the trained teacher's weights file."""
    return [
        *args,
        f"output_dir={root / out}",
        f"teacher.model.checkpoint={root / 'live/teacher/model.safetensors'}",
        *extra,
    ]


def test_full_cache_distillation_equals_live_teacher_classifier(classifier_teacher, monkeypatch):
    root, args = classifier_teacher
    assert main(["distill", *args, "--no-tensorboard"]) == 0
    cached = _with_teacher(root, args, "cached", "cache.use=true", "cache.format=full")
    assert main(["cache-teacher", *cached]) == 0

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher must not be loaded when a complete cache is used")

    monkeypatch.setattr(teacher_stages, "teacher_stage", no_teacher)
    assert main(["distill", *cached, "--no-tensorboard"]) == 0
    live, from_cache = _losses(root / "live"), _losses(root / "cached")
    assert [r["phase"] for r in live] == ["feature_alignment"] * 2 + ["soft_label_pretrain"] * 5 + [
        "joint_optimization"
    ] * 3
    # Same teacher, same float32 logits and features: only the teacher's batch composition differs
    # (shards of 50 rows vs micro-batches of 32), which can move a GEMM result by an ulp.
    for a, b in zip(live, from_cache, strict=True):
        for key in ("loss", "feature", "kd", "ce", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key)
    manifest = read_manifest(root / "cached" / "teacher_cache")
    assert manifest["complete"] and manifest["identity"]["format"] == "full"
    assert manifest["bytes_per_position"] == 10 * 4  # 10 classes in float32


def test_run_with_cache_reports_teacher_metric(classifier_teacher):
    root, args = classifier_teacher
    run_args = [*args, f"output_dir={root / 'run'}", "cache.use=true", "cache.format=full"]
    assert main(["run", *run_args, "--no-tensorboard"]) == 0  # trains the teacher, writes the cache, distils
    results = json.loads((root / "run" / "results.json").read_text())
    teacher_result = json.loads((root / "run" / "teacher" / "result.json").read_text())
    assert results["teacher"]["accuracy"] == teacher_result["accuracy"]
    assert read_manifest(root / "run" / "teacher_cache")["complete"]


def _logits_of(run, teacher, rows: torch.Tensor) -> torch.Tensor:
    batch = {k: v[rows] for k, v in run.work.cache_source().rows.items()}
    with torch.no_grad():
        return run.work.forward(teacher.eval(), batch).float()


def test_topk_signals_equal_top_k_of_teacher_log_softmax(tmp_path, tiny_lm_args):
    args = [*tiny_lm_args(tmp_path), "deploy.enabled=false", "cache.format=topk", "cache.k=7", "cache.shard_rows=9"]
    args += ["distill.temperature=2.0"]
    cfg = load_config(args[0], args[1:])
    run = pipeline.open_run(cfg)
    teacher, _ = teacher_stages.teacher_stage(run, log_tensorboard=False)
    teacher_signals.cache_stage(run, teacher, quiet=True)
    manifest = read_manifest(cache_mod.cache_dir(cfg))
    reader = CachedTeacher(cache_mod.cache_dir(cfg), manifest, torch.device("cpu"))
    rows = torch.tensor([0, 8, 9, 17, manifest["identity"]["rows"] - 1])  # across shard borders
    got = reader({"row": rows}, features=False).logits
    assert isinstance(got, SparseTeacher) and got.kind == "topk" and got.temperature == 2.0
    reference = torch.log_softmax(_logits_of(run, teacher, rows) / 2.0, dim=-1)  # (5, T - 1, V)
    order = reference.argsort(dim=-1, descending=True)[..., :7]
    assert torch.equal(got.ids, order)
    # Stored in float16: within half an fp16 ulp of the float32 log-probabilities (2^-11 relative).
    expected = reference.gather(-1, order)
    torch.testing.assert_close(got.values, expected, rtol=2.0**-11, atol=1e-6)
    tail = 1 - got.values.exp().sum(-1)
    assert bool((tail >= -1e-3).all()) and bool((tail <= 1).all())


def test_sampled_draws_follow_the_tempered_teacher_distribution():
    vocab, positions, samples, temperature = 6, 4000, 12, 2.0
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -30.0]).expand(positions, vocab)
    out = encode(
        logits,
        fmt="sampled",
        k=0,
        samples=samples,
        temperature=temperature,
        generator=torch.Generator().manual_seed(5),
    )
    ids, counts = out["ids"].long(), out["counts"].long()
    assert out["ids"].dtype == torch.int32 and out["counts"].dtype == torch.uint8
    assert bool((counts.sum(-1) == samples).all())  # every draw is counted once
    # Distinct ids in the used slots (merged duplicates); padding slots have count 0.
    for row_ids, row_counts in zip(ids[:50], counts[:50]):
        used = row_ids[row_counts > 0]
        assert len(set(used.tolist())) == len(used)
    frequency = torch.zeros(vocab, dtype=torch.float64).scatter_add_(0, ids.flatten(), counts.flatten().double())
    frequency /= positions * samples
    p = torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -30.0], dtype=torch.float64) / temperature, 0)
    # 48,000 draws with a fixed seed: each frequency within 5 standard errors of its probability.
    sigma = torch.sqrt(p * (1 - p) / (positions * samples))
    assert bool(((frequency - p).abs() <= 5 * sigma + 1e-12).all()), (frequency, p)


def test_merge_draws_by_hand():
    drawn = torch.tensor([[4, 1, 4, 4], [2, 2, 2, 2], [0, 3, 1, 2]])
    ids, counts = merge_draws(drawn)
    assert ids.tolist() == [[1, 4, 0, 0], [2, 0, 0, 0], [0, 1, 2, 3]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]


def test_sampled_reader_weights_sum_to_one(classifier_teacher):
    root, args = classifier_teacher
    cached = _with_teacher(root, args, "sampled", "cache.format=sampled", "cache.samples=5")
    assert main(["cache-teacher", *cached]) == 0
    folder = root / "sampled" / "teacher_cache"
    reader = CachedTeacher(folder, read_manifest(folder), torch.device("cpu"))
    got = reader({"row": torch.arange(0, 120, 7)}, features=True)
    assert got.logits.kind == "sampled"
    torch.testing.assert_close(got.logits.values.sum(-1), torch.ones(len(range(0, 120, 7))))
    assert len(got.features) == 1 and got.features[0].shape[0] == len(range(0, 120, 7))


def test_interrupted_write_resumes_to_identical_files(classifier_teacher, monkeypatch):
    root, args = classifier_teacher
    whole = _with_teacher(root, args, "whole", "cache.format=sampled", "cache.samples=9")
    assert main(["cache-teacher", *whole]) == 0

    broken = _with_teacher(root, args, "broken", "cache.format=sampled", "cache.samples=9")
    real_encode, calls = cache_writer.encode, {"n": 0}

    def failing_encode(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # micro-batches of 32 rows, shards of 50: dies inside the third shard
            raise KeyboardInterrupt
        return real_encode(*a, **k)

    monkeypatch.setattr(cache_writer, "encode", failing_encode)
    assert main(["cache-teacher", *broken]) == 130
    folder = root / "broken" / "teacher_cache"
    partial = read_manifest(folder)
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert not list(folder.glob("*.tmp"))  # no half-written shard left behind
    monkeypatch.setattr(cache_writer, "encode", real_encode)
    assert main(["cache-teacher", *broken]) == 0
    reference = root / "whole" / "teacher_cache"
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in folder.iterdir())
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("distill.temperature=3.0", "temperature"),
        ("data.mnist1d.num_samples=220", "rows"),
        ("cache.k=4", "k"),
        ("other-teacher", "teacher_sha256"),
    ],
)
def test_mismatched_cache_refused_before_anything_is_written(classifier_teacher, capsys, change, named):
    root, args = classifier_teacher
    made = _with_teacher(root, args, "topk", "cache.format=topk", "cache.k=3", f"cache.path={root / 'topk_cache'}")
    if not (root / "topk_cache" / "manifest.json").is_file():
        assert main(["cache-teacher", *made]) == 0
    out = root / f"mismatch-{named}"
    extra = [change] if change != "other-teacher" else []
    if change == "other-teacher":
        other = root / "other.safetensors"
        from safetensors.torch import load_file, save_file

        weights = load_file(root / "live/teacher/model.safetensors")
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other)
        extra = [f"teacher.model.checkpoint={other}"]
    capsys.readouterr()
    assert main(["distill", *made, f"output_dir={out}", "cache.use=true", *extra]) == 2
    line = _error(capsys)
    assert "does not match this config" in line and f"{named} is" in line
    assert not out.exists()  # refused in preflight: not even config.yaml


def test_truncated_or_corrupted_shard_refused(classifier_teacher, capsys):
    root, args = classifier_teacher
    made = _with_teacher(root, args, "damaged", "cache.format=topk", "cache.k=3", "cache.use=true")
    assert main(["cache-teacher", *made]) == 0
    shard = root / "damaged" / "teacher_cache" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["distill", *made]) == 2
    assert "truncated" in _error(capsys)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert main(["distill", *made]) == 2
    assert "sha256" in _error(capsys)
    assert not (root / "damaged" / "student").exists()


def test_k_larger_than_vocabulary_refused(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert main(["cache-teacher", *tiny_overrides(out), "cache.format=topk", "cache.k=11"]) == 2
    line = _error(capsys)
    assert "cache.k" in line and "11" in line and "10 ids" in line
    assert not out.exists()


def test_feature_phase_needs_cached_features(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(out), "cache.use=true", "cache.format=full", "cache.features=false"]) == 2
    assert "cache.features" in _error(capsys)
    assert not out.exists()


def test_sampled_cache_needs_forward_kl(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    args = [*tiny_overrides(out), "cache.use=true", "cache.features=true", "cache.format=sampled"]
    assert main(["run", *args, "distill.divergence=reverse_kl"]) == 2
    assert "distill.divergence" in _error(capsys)


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory, tiny_lm_args) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("cache_lm")
    args = [
        *tiny_lm_args(root),
        f"output_dir={root / 'live'}",
        "deploy.enabled=false",
        "student.train.log_every=1",
        "student.train.grad_accum=2",
        "cache.shard_rows=7",
    ]
    assert main(["train-teacher", *args]) == 0
    return root, args


def test_full_cache_distillation_equals_live_teacher_lm(lm_teacher):
    """Token-level KD and layer-mapped hidden-state features from the cache, with gradient accumulation."""
    root, args = lm_teacher
    assert main(["distill", *args, "--no-tensorboard"]) == 0
    cached = _with_teacher(root, args, "cached", "cache.use=true", "cache.format=full", "cache.features=true")
    assert main(["distill", *cached, "--no-tensorboard"]) == 0  # writes the cache, then distils from it
    live, from_cache = _losses(root / "live"), _losses(root / "cached")
    assert {r["phase"] for r in live} == {"feature_alignment", "soft_label_pretrain", "joint_optimization"}
    for a, b in zip(live, from_cache, strict=True):
        for key in ("loss", "feature", "kd", "ce", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-8), (a["step"], key)


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_sparse_cache_distillation_runs_and_tracks_live_kd(lm_teacher, fmt):
    """k = V top-k buckets hold the whole distribution: the first step's KD equals live KD up to the
    float16 rounding of the log-probabilities. Sampled KD estimates KL + H(p_T) (a constant):
    it runs, stays finite and its CE term is the live one (same student, same labels) on step 1."""
    root, args = lm_teacher
    live_args = [*args, f"output_dir={root / 'kd-live'}", KD_PHASES]
    assert main(["distill", *live_args, f"teacher.model.checkpoint={root / 'live/teacher/model.safetensors'}"]) == 0
    vocab = len(AutoTokenizer.from_pretrained(root / "kd-live" / "student" / "hf", local_files_only=True))
    extra = [f"cache.k={vocab}"] if fmt == "topk" else ["cache.samples=12"]
    cached = _with_teacher(root, args, f"kd-{fmt}", KD_PHASES, "cache.use=true", f"cache.format={fmt}", *extra)
    assert main(["distill", *cached]) == 0
    live, from_cache = _losses(root / "kd-live"), _losses(root / f"kd-{fmt}")
    assert all(math.isfinite(r["loss"]) for r in from_cache) and len(from_cache) == len(live)
    assert from_cache[0]["ce"] == pytest.approx(live[0]["ce"], rel=1e-6)
    if fmt == "topk":
        # fp16 log-probs: relative error <= 2^-11 each, so KL moves by <= 2^-11 * sum p |log p| ~ 1e-3 relative.
        assert from_cache[0]["kd"] == pytest.approx(live[0]["kd"], rel=2e-3)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("data.stdlib.seq_len=24", ("rows",)),
        # Another corpus slice: another BPE tokenizer of the same size, other token rows.
        ("data.stdlib.train_chars=24000", ("rows", "data_sha256", "tokenizer_sha256")),
        ("data.stdlib.pack=false", ("rows", "data_sha256")),
    ],
)
def test_lm_cache_of_other_data_or_tokenizer_refused(lm_teacher, capsys, change, named):
    """Other rows (seq_len, packing) or another tokenizer (its vocabulary) than the cache was written for."""
    root, args = lm_teacher
    made = _with_teacher(root, args, "lm-made", "cache.format=sampled", f"cache.path={root / 'lm_cache'}")
    if not (root / "lm_cache" / "manifest.json").is_file():
        assert main(["cache-teacher", *made]) == 0
    capsys.readouterr()
    out = root / f"lm-mismatch-{change}"
    assert main(["distill", *made, f"output_dir={out}", "cache.use=true", KD_PHASES, change]) == 2
    line = _error(capsys)
    assert "does not match this config" in line and any(f"{key} is" in line for key in named), line
    assert not out.exists()


def test_bad_cache_folder_refused(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not a distilflow manifest"):
        read_manifest(tmp_path)


def test_distill_from_complete_cache_never_loads_hf_teacher(lm_teacher, monkeypatch):
    """A Hugging Face folder teacher (teacher.model.hf.path) with a complete cache: distill reads the cache and
    loads no teacher weights, not even in preflight; the losses equal those of the run that wrote the cache."""
    root, args = lm_teacher
    hf_teacher = [f"teacher.model.hf.path={root / 'live/teacher/hf'}", "teacher.model.hf.config={}"]
    cache = [*hf_teacher, "cache.use=true", "cache.format=full", "cache.features=true", f"cache.path={root / 'hf'}"]
    assert main(["distill", *args, f"output_dir={root / 'hf-writes'}", *cache, "--no-tensorboard"]) == 0
    assert read_manifest(root / "hf")["complete"]

    from transformers import AutoModelForCausalLM

    loads = []

    def no_weights(*_a, **_k):
        loads.append(1)
        raise AssertionError("the teacher's weights must not be loaded when a complete cache is used")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    assert main(["distill", *args, f"output_dir={root / 'hf-reads'}", *cache, "--no-tensorboard"]) == 0
    assert not loads
    writes, reads = _losses(root / "hf-writes"), _losses(root / "hf-reads")
    assert {r["phase"] for r in reads} == {"feature_alignment", "soft_label_pretrain", "joint_optimization"}
    # Both runs read the same cache with the same student: the same computations, so equal losses.
    for a, b in zip(writes, reads, strict=True):
        assert {k: b[k] for k in ("loss", "kd", "ce", "feature") if k in a} == {
            k: a[k] for k in ("loss", "kd", "ce", "feature") if k in a
        }, a["step"]
    # The patch does guard the loading path: without the cache the teacher folder is loaded (and refused here).
    with pytest.raises(AssertionError, match="must not be loaded"):
        main(["distill", *args, f"output_dir={root / 'hf-live'}", *hf_teacher])
    assert loads


def test_run_from_complete_cache_never_loads_hf_teacher_and_hashes_it_once(lm_teacher, monkeypatch):
    """'run' with a given Hugging Face teacher and a complete cache: the teacher's score and cost come from
    the cache's manifest (recorded by the run that wrote it, where the teacher was loaded), its weights
    are never loaded, and its files are hashed once (the identity check), not once per check."""
    root, args = lm_teacher
    hf_teacher = [f"teacher.model.hf.path={root / 'live/teacher/hf'}", "teacher.model.hf.config={}"]
    cache = [*hf_teacher, "cache.use=true", "cache.format=topk", "cache.k=8", f"cache.path={root / 'run-cache'}"]
    phases = ["distill.layer_map=null", KD_PHASES]
    assert main(["run", *args, f"output_dir={root / 'run-writes'}", *cache, *phases, "--no-tensorboard"]) == 0
    written = json.loads((root / "run-writes" / "results.json").read_text())["teacher"]
    recorded = read_manifest(root / "run-cache")["teacher_result"]
    assert recorded["perplexity"] == written["perplexity"] and recorded["params"] == written["params"] > 0

    from transformers import AutoModelForCausalLM

    def no_weights(*_a, **_k):
        raise AssertionError("the teacher's weights must not be loaded when a complete cache is used")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    hashed = []
    real_sha = cache_mod.sha256_files

    def counting(paths):
        if any(p.name == "config.json" for p in paths):  # the teacher's files (shards are hashed too)
            hashed.append(paths)
        return real_sha(paths)

    monkeypatch.setattr(cache_mod, "sha256_files", counting)
    cache_mod.forget_teacher_hashes()
    assert main(["run", *args, f"output_dir={root / 'run-reads'}", *cache, *phases, "--no-tensorboard"]) == 0
    results = json.loads((root / "run-reads" / "results.json").read_text())
    for key in ("perplexity", "loss", "params", "macs_per_token"):
        assert results["teacher"][key] == written[key], key
    assert results["teacher"]["from_cache"] == str(root / "run-cache")
    assert results["student"]["macs_ratio_to_teacher"] == pytest.approx(
        written["macs_per_token"] and results["student"]["macs_per_token"] / written["macs_per_token"]
    )
    assert len(hashed) == 1
    # The students read the same cache from the same init: equal losses.
    for a, b in zip(_losses(root / "run-writes"), _losses(root / "run-reads"), strict=True):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"
        }


def test_complete_cache_of_a_missing_teacher_file_refused(classifier_teacher, capsys):
    """The teacher is not loaded when a complete cache is read, but a given teacher file must still exist:
    its hash is what ties the cache to this teacher."""
    root, args = classifier_teacher
    made = _with_teacher(root, args, "topk", "cache.format=topk", "cache.k=3", f"cache.path={root / 'topk_cache'}")
    if not (root / "topk_cache" / "manifest.json").is_file():
        assert main(["cache-teacher", *made]) == 0
    out = root / "gone-teacher"
    gone = root / "nowhere.safetensors"
    capsys.readouterr()
    assert main(["distill", *made, f"output_dir={out}", "cache.use=true", f"teacher.model.checkpoint={gone}"]) == 2
    line = _error(capsys)
    assert str(gone) in line and "does not exist" in line
    assert not out.exists()
