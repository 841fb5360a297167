"""Shared fixtures: one MNIST-1D cache per session and the overrides of a tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# MNIST-1D sizes used by every tiny run: 200 samples -> 160 train / 40 test, 64 transfer samples.
TINY_NUM_SAMPLES = 200
TINY_TRANSFER = 64


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data.cache_dir shared by the session, so each MNIST-1D set is generated once."""
    return tmp_path_factory.mktemp("mnist1d-cache")


@pytest.fixture(scope="session")
def tiny_overrides(mnist_cache: Path):
    """``tiny_overrides(output_dir)`` -> the dotted overrides of a run that takes about a second.

    A 2-block CNN teacher (6 steps) and an MLP student (10 steps: phases 2 / 5 / 3) on a tiny
    MNIST-1D; the student checkpoints every 4 steps so that a run can be interrupted and resumed.
    The deploy stage (export, quantization, benchmark: seconds) is off; tests/deploy turns it on.
    """

    def make(output_dir: Path | str) -> list[str]:
        return [
            f"output_dir={output_dir}",
            f"data.cache_dir={mnist_cache}",
            f"data.mnist1d.num_samples={TINY_NUM_SAMPLES}",
            f"data.mnist1d.transfer_size={TINY_TRANSFER}",
            "threads=1",
            "teacher.model.cnn.channels=[8, 8]",
            "teacher.train.steps=6",
            "teacher.train.batch_size=32",
            "teacher.train.warmup_steps=1",
            "teacher.train.log_every=2",
            "student.model.mlp.hidden=[32, 32]",
            "student.model.mlp.dropout=0.1",
            "student.train.steps=10",
            "student.train.batch_size=32",
            "student.train.warmup_steps=1",
            "student.train.log_every=1",
            "student.train.eval_every=5",
            "student.train.checkpoint_every=4",
            "deploy.enabled=false",
        ]

    return make


def _tiny_llama(hidden: int, layers: int) -> str:
    return (
        f"{{model_type: llama, hidden_size: {hidden}, intermediate_size: {2 * hidden}, num_hidden_layers: {layers}, "
        "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true}"
    )


def refuse_causal_lm_loads(patch: pytest.MonkeyPatch) -> list:
    """transformers' ``AutoModelForCausalLM.from_pretrained`` made to raise under ``patch``: any attempt to
    load teacher weights fails the test. Returns the list of attempts (its arguments)."""
    from transformers import AutoModelForCausalLM

    loads: list = []

    def refuse(*args, **kwargs):
        loads.append(args)
        raise AssertionError("the served teacher's weights must never be loaded")

    patch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    return loads


@pytest.fixture
def never_loaded(monkeypatch) -> list:
    """Teacher weights cannot be loaded in this test (``refuse_causal_lm_loads``); the attempts."""
    return refuse_causal_lm_loads(monkeypatch)


@pytest.fixture(scope="session")
def refuse_loads():
    """``refuse_causal_lm_loads`` for fixtures of a wider scope (with their own ``pytest.MonkeyPatch``)."""
    return refuse_causal_lm_loads


@pytest.fixture(scope="session")
def tiny_lm_args():
    """``tiny_lm_args(root)`` -> CLI arguments of the built-in stdlib LM demo made tiny (seconds):
    a 20,000-character corpus, 300-token BPE, rows of 32, teacher hidden 32 x 2 layers (6 steps),
    students hidden 16 x 1 layer (10 steps). Tests append their own eval/log/deploy settings."""

    def args(root: Path) -> list[str]:
        return [
            "configs/lm_stdlib.yaml",
            f"output_dir={root / 'run'}",
            f"data.cache_dir={root / 'cache'}",
            "data.stdlib.train_chars=20000",
            "data.stdlib.eval_chars=5000",
            "data.stdlib.vocab_size=300",
            "data.stdlib.seq_len=32",
            "threads=1",
            f"teacher.model.hf.config={_tiny_llama(32, 2)}",
            f"student.model.hf.config={_tiny_llama(16, 1)}",
            "teacher.train.steps=6",
            "teacher.train.batch_size=8",
            "teacher.train.warmup_steps=1",
            "student.train.steps=10",
            "student.train.batch_size=8",
            "student.train.warmup_steps=1",
            "student.train.eval_every=5",
            "distill.kd_weight.warmup_steps=2",
        ]

    return args


@pytest.fixture(scope="session")
def arith_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (hidden 32, 2 layers, 4 heads, 64 positions, seed 0) with the
    arithmetic character tokenizer: a model for ``generate`` that loads in a fraction of a second."""
    from distilflow.data.arith import arith_tokenizer
    from distilflow.data.stdlib_corpus import tiny_llama_config
    from distilflow.models.hf import build_causal_lm

    folder = tmp_path_factory.mktemp("arith-llama")
    tokenizer = arith_tokenizer()
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden=32, layers=2, heads=4, max_positions=64, **special)
    build_causal_lm(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Runs set ``threads=1`` (torch.set_num_threads); give later tests the count they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loss_calls(monkeypatch):
    """Spies on the loss functions: a list of ``(stage, implementation, chunk_rows)``, one per call.

    The stage is the one ``fit`` is training; the implementation is ``plain`` (the objective's plain
    terms), ``chunked`` or ``fused`` (the objective's one-pass terms, with the chunk size they were
    given), or ``fused eval`` (a causal-LM task's held-out cross-entropy on hidden states).
    """
    from distilflow import stages
    from distilflow.losses import objective
    from distilflow.tasks import causal_lm

    calls: list[tuple[str, str, int | None]] = []
    current = {"stage": None}
    real_fit = stages.fit

    def fit(**kwargs):
        current["stage"] = kwargs["stage"]
        return real_fit(**kwargs)

    def spy(function, name):
        def wrapper(*args, **kwargs):
            calls.append((current["stage"], name, kwargs.get("chunk_rows")))
            return function(*args, **kwargs)

        return wrapper

    real_plain = objective.Objective.plain_terms

    def plain_terms(self, *args, **kwargs):
        calls.append((current["stage"], "plain", None))
        return real_plain(self, *args, **kwargs)

    monkeypatch.setattr(stages, "fit", fit)
    monkeypatch.setattr(objective.Objective, "plain_terms", plain_terms)
    monkeypatch.setattr(objective, "chunked_kd_ce", spy(objective.chunked_kd_ce, "chunked"))
    monkeypatch.setattr(objective, "fused_kd_ce", spy(objective.fused_kd_ce, "fused"))
    monkeypatch.setattr(causal_lm, "fused_kd_ce", spy(causal_lm.fused_kd_ce, "fused eval"))
    return calls


@pytest.fixture
def labels_read(monkeypatch):
    """``labels_read()`` spies on the objective from then on and returns a list that gets one entry per
    call: whether any label (not ``IGNORE_INDEX``) reached it (label-free runs must give only False)."""
    from distilflow.losses.objective import IGNORE_INDEX, Objective

    seen: list[bool] = []
    real = Objective.forward

    def forward(self, step, student, teacher, targets, rows):
        seen.append(bool((targets.labels != IGNORE_INDEX).any()))
        return real(self, step, student, teacher, targets, rows)

    def start() -> list[bool]:
        monkeypatch.setattr(Objective, "forward", forward)
        return seen

    return start
