"""Distillation across tokenizers end to end (tasks/cross_tokenizer.py): the stdlib demo with a unigram student.

The teacher reads the corpus with the byte-level BPE, the student (another family, Qwen2) with a
unigram tokenizer; ``distill.cross_tokenizer: auto`` picks the hybrid. References: the run's own
live-teacher losses (the cache must give the same), Python's character counts (bits per character),
and one-line refusals of what cannot work across tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distilflow import teacher_stages
from distilflow.cli import main
from distilflow.config import load_config
from distilflow.tasks.cross_tokenizer import CrossTokenizerWorkload
from distilflow.workload import make_workload

ERROR = "distilflow: error: "
LLAMA = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 4, max_position_embeddings: 96}"
)
QWEN2 = (
    "{model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 96}"
)
FEATURE_PAIR = "distill.feature_layers=[{student: model.layers.0, teacher: model.layers.1}]"


def stdlib_args(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        "threads=1",
        "data.source=stdlib",
        f"data.cache_dir={cache_dir}",
        "data.stdlib.vocab_size=384",
        "data.stdlib.student_tokenizer=unigram",
        "data.stdlib.student_vocab_size=512",
        "data.stdlib.train_chars=30000",
        "data.stdlib.eval_chars=6000",
        "data.stdlib.seq_len=32",
        "data.stdlib.teacher_seq_len=40",
        "teacher.model.arch=hf",
        f"teacher.model.hf.config={LLAMA}",
        "teacher.train.steps=6",
        "teacher.train.batch_size=8",
        "teacher.train.warmup_steps=0",
        "student.model.arch=hf",
        f"student.model.hf.config={QWEN2}",
        "student.train.steps=4",
        "student.train.batch_size=8",
        "student.train.warmup_steps=0",
        "student.train.log_every=1",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        "deploy.enabled=false",
        *extra,
    ]


def student_losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "student" and "loss" in r]


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR), err
    return err[0]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A whole run across tokenizers (teacher, baseline, distilled student)."""
    root = tmp_path_factory.mktemp("xtok")
    args = stdlib_args(root / "live", root / "cache")
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return root, args


def test_auto_distils_with_the_hybrid_and_scores_bits_per_character(live_run):
    root, args = live_run
    results = json.loads((root / "live" / "results.json").read_text())
    assert results["cross_tokenizer"] == "hybrid"
    for stage in ("teacher", "baseline", "student"):
        r = results[stage]
        # Bits per character from the same NLL as perplexity: loss nats per token * tokens / characters.
        assert 0 < r["bits_per_char"] < 16 and math.isfinite(r["perplexity"])
    losses = student_losses(root / "live")
    assert len(losses) == 4 and all("kd_matched" in r and "kd_unmatched" in r for r in losses)
    for r in losses:  # the hybrid's parts add up to its KD term (weights 1 and 1)
        assert r["kd"] == pytest.approx(r["kd_matched"] + r["kd_unmatched"], rel=1e-4)
    # Top-1 agreement compares ids of one vocabulary: across tokenizers it is not logged (docs/DIAGNOSIS.md).
    assert not any("agreement" in r for r in losses)
    assert "bits per char" in (root / "live" / "report.md").read_text()
    # The teacher was trained on its own tokens: its saved tokenizer is the BPE, the student's the unigram.
    teacher_vocab = json.loads((root / "live" / "teacher" / "hf" / "tokenizer.json").read_text())["model"]["type"]
    student_vocab = json.loads((root / "live" / "student" / "hf" / "tokenizer.json").read_text())["model"]["type"]
    assert (teacher_vocab, student_vocab) == ("BPE", "Unigram")


def test_held_out_bits_per_character_count_each_character_once(live_run):
    """The characters bits per character divide by are those of the tokens predicted (all but each row's
    first token), on each side: the two sides' totals are the same text, give or take the first tokens."""
    root, args = live_run
    work = make_workload(load_config(None, args), torch.device("cpu"))
    assert isinstance(work, CrossTokenizerWorkload)
    held = work.held_out
    for prefix in ("", "teacher_"):
        chars = held[prefix + "chars"]
        real = held[prefix + "attention_mask"].bool()
        assert int(chars[~real].sum()) == 0
    student_total, teacher_total = int(held["chars"].sum()), int(held["teacher_chars"].sum())
    assert student_total == teacher_total  # both sides spell the same held-out characters
    # Each stage's bits per character are its mean token NLL (results' loss) times its predicted tokens,
    # over those tokens' characters: the same NLL, two denominators.
    results = json.loads((root / "live" / "results.json").read_text())
    for stage, prefix in (("teacher", "teacher_"), ("student", "")):
        labels = held[prefix + "labels"][:, 1:]
        scored = labels != -100
        tokens, chars = int(scored.sum()), int(held[prefix + "chars"][:, 1:][scored].sum())
        expected = results[stage]["loss"] * tokens / math.log(2) / chars
        assert results[stage]["bits_per_char"] == pytest.approx(expected, rel=1e-9)


def test_a_full_cache_across_tokenizers_gives_the_live_teachers_losses(live_run, monkeypatch):
    root, args = live_run
    cached = [*args, f"output_dir={root / 'cached'}", "cache.use=true", "cache.format=full"]
    cached.append(f"teacher.model.checkpoint={root / 'live' / 'teacher' / 'model.safetensors'}")
    assert main(["cache-teacher", *cached]) == 0
    manifest = json.loads((root / "cached" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["identity"]["cross_tokenizer"] is True

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher must not be loaded when a complete cache is used")

    monkeypatch.setattr(teacher_stages, "teacher_stage", no_teacher)
    assert main(["distill", *cached, "--no-tensorboard"]) == 0
    live, from_cache = student_losses(root / "live"), student_losses(root / "cached")
    for a, b in zip(live, from_cache, strict=True):
        for key in ("loss", "kd", "kd_matched", "kd_unmatched", "ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_topk_cache_of_every_id_across_tokenizers_gives_the_live_losses(live_run):
    """With k = the teacher's vocabulary the top-k path (sparse ULD and hybrid buckets) is the dense loss
    but for the cache's float16 log-probabilities (losses/uld.py's unit tests cover k < V)."""
    root, args = live_run
    cached = [*args, f"output_dir={root / 'topk'}", "cache.use=true", "cache.format=topk", "cache.k=384"]
    cached.append(f"teacher.model.checkpoint={root / 'live' / 'teacher' / 'model.safetensors'}")
    assert main(["cache-teacher", *cached]) == 0
    assert main(["distill", *cached, "--no-tensorboard"]) == 0
    live, topk = student_losses(root / "live"), student_losses(root / "topk")
    for a, b in zip(live, topk, strict=True):
        for key in ("loss", "kd", "kd_matched", "kd_unmatched", "ce"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-4), (a["step"], key)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["distill.phases=[{name: f, fraction: 1.0, terms: [feature]}]", FEATURE_PAIR],
            "a feature phase across tokenizers",
        ),
        (["distill.loss_impl=fused"], "distill.loss_impl fused: across tokenizers"),
        (["cache.use=true", "cache.format=sampled"], "cache.format sampled: across tokenizers"),
        (["distill.cross_tokenizer=off"], "distill.cross_tokenizer off: teacher and student tokenizers differ"),
        (["cache.use=true", "distill.hybrid_buckets=span"], "distill.hybrid_buckets span: across tokenizers"),
    ],
)
def test_what_cannot_work_across_tokenizers_is_refused_in_one_line(tmp_path, live_run, capsys, extra, message):
    root, _ = live_run
    out = tmp_path / "refused"
    assert main(["run", *stdlib_args(out, root / "cache", *extra)]) == 2
    assert message in one_error(capsys)
    assert not out.exists()


def test_a_kd_only_phase_across_tokenizers_is_a_note(live_run, capsys):
    root, _ = live_run
    phases = "distill.phases=[{name: soft, fraction: 0.5, terms: [kd]}, {name: joint, fraction: 0.5, terms: [kd, ce]}]"
    make_workload(load_config(None, stdlib_args(root / "unused", root / "cache", phases)), torch.device("cpu"))
    assert "note: distill.phases ['soft'] have kd without ce: across tokenizers" in capsys.readouterr().err
    make_workload(load_config(None, stdlib_args(root / "unused", root / "cache")), torch.device("cpu"))
    assert "kd without ce" not in capsys.readouterr().err


def test_a_served_teacher_across_tokenizers_is_refused_before_the_server_is_asked(tmp_path, live_run, capsys):
    root, _ = live_run
    out = tmp_path / "served"
    served = [f"teacher.model.hf.path={root / 'live' / 'teacher' / 'hf'}", "teacher.server.model=teacher"]
    served += ["teacher.server.url=http://127.0.0.1:9", "distill.temperature=1.0"]  # nothing listens at :9
    args = [a for a in stdlib_args(out, root / "cache", *served) if not a.startswith("teacher.model.hf.config")]
    assert main(["distill", *args]) == 2
    assert "teacher.server: a served teacher is not supported across tokenizers" in one_error(capsys)
    assert not out.exists()


def test_a_feature_phase_with_a_layer_map_compares_groups(tmp_path, live_run):
    root, _ = live_run
    extra = ["distill.layer_map=uniform", "distill.phases=[{name: f, fraction: 1.0, terms: [feature, kd]}]"]
    args = stdlib_args(tmp_path / "features", root / "cache", *extra)
    args.append(f"teacher.model.checkpoint={root / 'live' / 'teacher' / 'model.safetensors'}")
    assert main(["distill", *args, "--no-tensorboard"]) == 0
    losses = student_losses(tmp_path / "features")
    assert all(r["feature"] > 0 and math.isfinite(r["feature"]) for r in losses)


def test_span_buckets_distil_and_log_both_parts(tmp_path, live_run):
    root, _ = live_run
    args = stdlib_args(tmp_path / "span", root / "cache", "distill.hybrid_buckets=span")
    args.append(f"teacher.model.checkpoint={root / 'live' / 'teacher' / 'model.safetensors'}")
    assert main(["distill", *args, "--no-tensorboard"]) == 0
    losses = student_losses(tmp_path / "span")
    baseline = student_losses(root / "live")
    assert len(losses) == 4 and all(
        r["kd"] == pytest.approx(r["kd_matched"] + r["kd_unmatched"], rel=1e-4) for r in losses
    )
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in losses)
    assert losses[0]["kd"] != pytest.approx(baseline[0]["kd"], rel=1e-3)  # another loss than the merged buckets
    assert losses[0]["ce"] == pytest.approx(baseline[0]["ce"], rel=1e-4)  # the same student, rows and first step


def test_one_tokenizer_with_a_cross_tokenizer_loss_forced_is_a_note_then_plain_kd(tmp_path, live_run, capsys):
    root, _ = live_run
    args = stdlib_args(tmp_path / "same", root / "cache", "data.stdlib.student_tokenizer=bpe")
    args += ["distill.cross_tokenizer=uld", "data.stdlib.teacher_seq_len=0", "data.stdlib.student_vocab_size=0"]
    work = make_workload(load_config(None, args), torch.device("cpu"))
    assert work.cross_tokenizer == "off" and work.aligned_kd is None
    assert "distill.cross_tokenizer uld: teacher and student share one tokenizer; distilling with plain KD" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("size", [0, 384])
def test_a_bpe_student_of_the_teachers_size_or_none_given_shares_the_teachers_tokenizer(tmp_path, live_run, size):
    root, _ = live_run
    args = stdlib_args(tmp_path / "same", root / "cache", "data.stdlib.student_tokenizer=bpe")
    args += [f"data.stdlib.student_vocab_size={size}", "data.stdlib.teacher_seq_len=0"]
    work = make_workload(load_config(None, args), torch.device("cpu"))
    assert work.cross_tokenizer == "off" and work.tokenizer is work.teacher_tokenizer


def test_a_bpe_student_of_its_own_size_distils_across_tokenizers(tmp_path, live_run):
    """A larger BPE trained on the same text continues the teacher's merges: every teacher token is one
    of the student's, with the same id, and each student token spells whole teacher tokens (1:n groups)."""
    root, _ = live_run
    # Its own cache folder: a second stdlib-tokenizer-* in the shared one would be a surprise to other tests.
    args = stdlib_args(tmp_path / "own", tmp_path / "cache", "data.stdlib.student_tokenizer=bpe")
    work = make_workload(load_config(None, args), torch.device("cpu"))  # stdlib_args: student_vocab_size 512
    assert work.cross_tokenizer == "hybrid"
    assert (len(work.tokenizer), len(work.teacher_tokenizer)) == (512, 384)
    assert json.loads(work.tokenizer.backend_tokenizer.to_str())["model"]["type"] == "BPE"
    student_vocab = work.tokenizer.get_vocab()
    assert all(student_vocab.get(token) == i for token, i in work.teacher_tokenizer.get_vocab().items())
    vocab_map = work.aligned_kd.vocab_map
    assert vocab_map.teacher_ids.tolist() == vocab_map.student_ids.tolist() == list(range(384))
    student_tokens = (work.train["group"] >= 0).sum(1)
    teacher_tokens = (work.train["teacher_group"] >= 0).sum(1)
    groups = [len(set(row[row >= 0].tolist())) for row in work.train["group"]]
    assert (student_tokens == torch.tensor(groups)).all() and (teacher_tokens >= student_tokens).all()


def test_a_slow_teacher_tokenizer_is_refused_in_one_line(tmp_path, live_run, capsys):
    from transformers import ByT5Tokenizer

    root, _ = live_run
    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")  # no tokenizer.json: no character offsets
    (tmp_path / "byt5" / "vocab.txt").write_text("")  # past load_tokenizer's folder check (ByT5 needs no file)
    out = tmp_path / "refused"
    args = stdlib_args(out, root / "cache", f"data.stdlib.teacher_tokenizer={tmp_path / 'byt5'}")
    assert main(["run", *args]) == 2
    assert "the teacher tokenizer (ByT5Tokenizer) is a slow tokenizer without character offsets" in one_error(capsys)
    assert not out.exists()


def test_chat_records_with_a_chat_template_on_one_side_only_are_refused(tmp_path, live_run, capsys):
    from distilflow.models.hf import load_tokenizer

    root, _ = live_run
    (unigram,) = (root / "cache").glob("stdlib-unigram-*")
    (bpe,) = (root / "cache").glob("stdlib-tokenizer-*")
    student = load_tokenizer(unigram)
    student.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    student.save_pretrained(tmp_path / "student_tok")
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "def f(): pass"}, {"role": "assistant", "content": "return None"}]
    data.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(8)))
    out = tmp_path / "refused"
    args = stdlib_args(out, root / "cache", "data.source=text", f"data.text.path={data}", "data.text.pack=false")
    args += [f"data.text.tokenizer={tmp_path / 'student_tok'}", f"data.text.teacher_tokenizer={bpe}"]
    args = [a for a in args if not a.startswith("data.stdlib.")] + ["data.text.seq_len=32"]
    assert main(["run", *args]) == 2
    assert "the student tokenizer has a chat template and the teacher tokenizer has none" in one_error(capsys)
    assert not out.exists()


def test_generate_traces_train_a_student_of_another_tokenizer_with_and_without_kd(tmp_path, live_run):
    """Sequence-level KD across tokenizers (docs/CROSS_TOKENIZER.md): ``generate`` decodes the teacher's samples
    with its own BPE and writes text; a student on the unigram tokenizer trains on that text with CE alone (no
    alignment), and with the hybrid KD term added the same records are aligned like any other text.

    References: the generated completions are the teacher's decoding (its own tokenizer's round trip), and the
    student's scored tokens per row are the unigram tokenizer's own count for the completion."""
    from distilflow.models.hf import load_tokenizer

    root, _ = live_run
    teacher_hf = root / "live" / "teacher" / "hf"
    (unigram,) = (root / "cache").glob("stdlib-unigram-*")
    heads = ["def parse(", "import os\n", "class Reader:\n    ", "for line in ", "return self.", "if name is "]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(heads)))
    traces = tmp_path / "traces.jsonl"
    generate = [f"output_dir={tmp_path / 'gen'}", "threads=1", f"generate.model={teacher_hf}"]
    generate += [f"generate.prompts={prompts}", f"generate.output={traces}", "generate.n=2", "generate.verifier=none"]
    generate += ["generate.max_new_tokens=12", "generate.keep_truncated=true", "generate.temperature=1.0", "seed=3"]
    assert main(["generate", *generate]) == 0
    samples = [json.loads(line) for line in traces.read_text().splitlines()]
    assert len(samples) >= 4 and {s["prompt"] for s in samples} <= set(heads)
    teacher_tok = load_tokenizer(teacher_hf)
    for s in samples:  # text the teacher's BPE writes back unchanged: no ids of either side are carried
        assert (
            teacher_tok.decode(teacher_tok(s["completion"], add_special_tokens=False)["input_ids"]) == s["completion"]
        )

    def on_traces(out: Path, terms: str) -> list[str]:
        own = ("data.stdlib.", "teacher.model.hf.config", "distill.phases")  # replaced below
        args = [a for a in stdlib_args(out, root / "cache") if not a.startswith(own)]
        args += ["data.source=text", f"data.text.path={traces}", "data.text.pack=false", "data.text.seq_len=64"]
        args += [f"data.text.tokenizer={unigram}", f"data.text.teacher_tokenizer={teacher_hf}"]  # 64: no row is cut
        return [
            *args,
            f"teacher.model.hf.path={teacher_hf}",
            f"distill.phases=[{{name: p, fraction: 1.0, terms: {terms}}}]",
        ]

    # CE alone: the student reads the teacher's text with its own tokenizer; the teacher is not consulted.
    assert main(["distill", *on_traces(tmp_path / "sft", "[ce]")]) == 0
    sft = student_losses(tmp_path / "sft")
    assert len(sft) == 4 and all(math.isfinite(r["ce"]) and "kd" not in r for r in sft)
    # + the hybrid (its two parts logged): the same records aligned across tokenizers, each side on its own ids.
    assert main(["distill", *on_traces(tmp_path / "kd", "[kd, ce]")]) == 0
    kd = student_losses(tmp_path / "kd")
    assert len(kd) == 4 and all(r["kd"] == pytest.approx(r["kd_matched"] + r["kd_unmatched"], rel=1e-4) for r in kd)
    assert json.loads((tmp_path / "kd" / "student" / "result.json").read_text())["bits_per_char"] > 0
    # The student's rows: its own tokens of prompt + completion, loss on the completion's tokens only.
    work = make_workload(load_config(None, on_traces(tmp_path / "kd", "[kd, ce]")), torch.device("cpu"))
    assert isinstance(work, CrossTokenizerWorkload)
    student_tok = load_tokenizer(unigram)
    rows = [work.train["labels"], work.held_out["labels"]]
    scored = sorted(int(n) for labels in rows for n in (labels != -100).sum(dim=1))
    completion_ids = [student_tok(s["completion"], add_special_tokens=False)["input_ids"] for s in samples]
    expected = sorted(len(ids) + 1 for ids in completion_ids)  # + the EOS that ends each completion
    assert scored == expected
