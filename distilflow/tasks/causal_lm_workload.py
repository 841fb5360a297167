"""The causal-LM workload: tokenizer, token rows, teacher and student of a run, built from its config.

Data comes from ``data.text`` (your files) or ``data.stdlib`` (the built-in corpus, with a BPE
tokenizer trained on it and cached); models from ``model.hf`` (a local folder, or a transformers
config). Teacher and student share one tokenizer here; if their embedding tables differ in size
both logits are cut to the shared ids (:meth:`CausalLMWorkload.shared_vocab`). The task the loop
runs is :class:`~distilflow.tasks.causal_lm.CausalLMTask`. :func:`load_text` finds each side's
tokenizer; when they differ, tasks/cross_tokenizer.py's workload is used instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distilflow.config import Config, TrainConfig
from distilflow.config_teachers import teacher_names
from distilflow.data.batches import batch_indices
from distilflow.data.cache import CacheSource
from distilflow.data.text import Record, check_seq_len, read_records, split, tokenize
from distilflow.errors import UserError
from distilflow.models.build import count_params, forward_macs
from distilflow.models.hf import align_vocab, build_causal_lm, load_causal_lm, load_tokenizer, no_progress_bars
from distilflow.models.layers import find_decoder_layers
from distilflow.tasks.causal_lm import Batch, CausalLMTask, fused_problem, lm_logit_shape, lm_logits


def _stdlib_tokenizer(cfg: Config, texts: list[str], kind: str = "bpe", size: int = 0) -> Any:
    """The built-in demo's byte-level BPE (or a unigram tokenizer) of ``size`` (0: ``vocab_size``),
    trained once per corpus and size and cached."""
    from distilflow.data.stdlib_corpus import train_tokenizer
    from distilflow.data.unigram_tokenizer import train_unigram_tokenizer

    corpus = cfg.data.stdlib
    train, name = (
        (train_unigram_tokenizer, "stdlib-unigram") if kind == "unigram" else (train_tokenizer, "stdlib-tokenizer")
    )
    size = size or corpus.vocab_size
    key = hashlib.sha256(json.dumps([size, corpus.train_chars, "v1"]).encode()).hexdigest()[:12]
    folder = Path(cfg.data.cache_dir).expanduser() / f"{name}-{key}"
    if not (folder / "tokenizer.json").is_file():
        train(texts, size, folder)
    return load_tokenizer(folder)


@dataclass
class LoadedText:
    """A causal-LM run's text: each side's tokenizer (one object when they are the same), the training
    and held-out records, and the bad lines skipped (``data.text.on_error: skip``)."""

    tokenizer: Any
    teacher_tokenizer: Any
    train: list[Record]
    held_out: list[Record]
    skipped: int = 0


def _folder_tokenizer(path: str | None, what: str, trust: bool) -> Any | None:
    return load_tokenizer(path, trust_remote_code=trust, what=what) if path else None


def load_text(cfg: Config) -> LoadedText:
    """The records of ``data.source`` and each side's tokenizer.

    The student's: ``data.<source>.tokenizer``, else the student's model folder, else (stdlib) the
    trained unigram tokenizer when ``student_tokenizer: unigram``, or a trained BPE of
    ``student_vocab_size`` when that is not 0 or ``vocab_size``, else the teacher's. The teacher's:
    ``teacher_tokenizer``, else the teacher's model folder, else the student's from a folder, else
    (stdlib) the trained BPE. So a run names a second tokenizer only where it means one.
    """
    d, rows = cfg.data, cfg.data.token_rows
    student_trust = cfg.student.model.hf is not None and cfg.student.model.hf.trust_remote_code
    given = _folder_tokenizer(rows.tokenizer, "tokenizer folder", student_trust)
    student = given or _folder_tokenizer(cfg.student.model.folder, "student model directory", student_trust)
    if cfg.teachers:  # several teachers read the student's tokens: each folder's tokenizer is checked on load
        folders = [t.model.folder for t in cfg.teachers if t.model.folder]
        teacher = _folder_tokenizer(folders[0], "teacher model directory", student_trust) if folders else None
        student = student or teacher
        teacher = student
    else:
        teacher_trust = cfg.teacher.model.hf is not None and cfg.teacher.model.hf.trust_remote_code
        teacher = _folder_tokenizer(rows.teacher_tokenizer, "teacher tokenizer folder", teacher_trust) or (
            _folder_tokenizer(cfg.teacher.model.folder, "teacher model directory", teacher_trust)
        )
    if d.source == "stdlib":
        from distilflow.data.stdlib_corpus import load_stdlib_corpus

        corpus = load_stdlib_corpus(train_chars=d.stdlib.train_chars, eval_chars=d.stdlib.eval_chars)
        teacher = teacher or student or _stdlib_tokenizer(cfg, corpus.train)
        own_size = d.stdlib.student_vocab_size
        if student is None and d.stdlib.student_tokenizer == "unigram":
            student = _stdlib_tokenizer(cfg, corpus.train, "unigram", own_size or 4096)
        elif student is None and own_size not in (0, d.stdlib.vocab_size):  # a BPE of the student's own size
            student = _stdlib_tokenizer(cfg, corpus.train, "bpe", own_size)
        train_records = [Record(completion=text) for text in corpus.train]
        held_records = [Record(completion=text) for text in corpus.eval]
        return LoadedText(student or teacher, teacher, train_records, held_records)
    student = student or teacher
    if student is None:
        raise UserError(
            "no tokenizer for data.source 'text': set data.text.tokenizer, or give student.model.hf.path or "
            "teacher.model.hf.path (a folder with a tokenizer)"
        )
    text = d.text
    route = {"teacher_column": d.teacher_column, "teachers": teacher_names(cfg)}
    records = read_records(text.path, on_error=text.on_error, **route)
    if text.test_path:
        held_records = read_records(text.test_path, on_error=text.on_error, **route).records
        train_records = records.records
    else:
        train_records, held_records = split(records.records, fraction=text.test_fraction, seed=d.seed)
    if records.skipped:
        first = records.problems[0] if records.problems else ""
        print(f"distilflow: skipped {records.skipped} bad lines (data.on_error=skip); first: {first}", file=sys.stderr)
    return LoadedText(student, teacher or student, train_records, held_records, records.skipped)


class CausalLMWorkload:
    """Builds the tokenizer, token data, teacher and student of a causal-LM run from its config
    (a :class:`~distilflow.workload.Workload`)."""

    kind = "causal_lm"
    per_token = True
    primary_metric = "perplexity"

    cross_tokenizer = "off"
    aligned_kd = None  # the teacher reads the student's tokens
    labelled = True  # the next token of the text

    def __init__(self, cfg: Config, device: torch.device, text: LoadedText | None = None) -> None:
        self.cfg, self.device = cfg, device
        self._loaded: dict[str, nn.Module] = {}
        self._roles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> "teacher" / "student"
        text = text or self.load_records()
        self.skipped = text.skipped
        self.tokenizer, self.teacher_tokenizer = text.tokenizer, text.teacher_tokenizer
        # With data.teacher_column every training token carries its record's teacher ("route").
        routes = cfg.data.teacher_column is not None
        self.train = self.rows(text.train, routes=True) if routes else self.rows(text.train)
        self.held_out = self.rows(text.held_out)

    def with_teacher(self, cfg: Config) -> CausalLMWorkload:
        """This workload (same tokenizer, rows and device) building its teacher from ``cfg.teacher``: one
        named teacher's view of the run (distilflow/teacher_views.py); a teacher folder is loaded anew."""
        other = copy.copy(self)
        other.cfg, other._loaded = cfg, {}
        return other

    def rows(self, records: list[Record], *, routes: bool = False) -> Batch:
        """Token rows ``(N, seq_len)`` of ``records`` (packed when ``pack``; the data section's keys)."""
        rows = self.cfg.data.token_rows
        return tokenize(records, self.tokenizer, seq_len=rows.seq_len, pack=rows.pack, routes=routes)

    def load_records(self) -> LoadedText:
        """The tokenizers, the training records and the held-out records of ``data.source`` (a workload
        whose rows are drawn by code overrides this)."""
        return load_text(self.cfg)

    def role_of(self, model: nn.Module) -> str:
        """``"teacher"`` or ``"student"``: the role ``model`` was built for by :meth:`new_model`."""
        return self._roles.get(model, "student")

    def tokenizer_of(self, role: str) -> Any:
        """The tokenizer of ``role``'s model (one for both here)."""
        return self.tokenizer

    def seq_len_of(self, role: str) -> int:
        """The longest row ``role``'s model reads (``data.<source>.seq_len`` here)."""
        return self.cfg.data.token_rows.seq_len

    def hf_config(self, values: dict[str, Any], role: str = "student") -> dict[str, Any]:
        """The config as given, with vocabulary size and special ids taken from ``role``'s tokenizer if absent."""
        tok = self.tokenizer_of(role)
        filled = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if tok.bos_token_id is not None:
            filled["bos_token_id"] = tok.bos_token_id
        return {**filled, **values}

    def new_model(self, role: str, teacher: nn.Module | None = None) -> nn.Module:
        """A fresh student (or the teacher) as configured; model folders are read once."""
        m = (self.cfg.teacher if role == "teacher" else self.cfg.student).model
        if m.hf.path:
            if role not in self._loaded:
                # A teacher folder is loaded straight in teacher.model.dtype (a 7B teacher never exists in
                # float32); a teacher built from hf_config is trained in float32 and cast before distillation.
                dtype = getattr(torch, m.dtype) if role == "teacher" else torch.float32
                model, tokenizer = load_causal_lm(
                    m.hf.path, role=role, trust_remote_code=m.hf.trust_remote_code, torch_dtype=dtype
                )
                expected = self.tokenizer_of(role)
                align_vocab(tokenizer, expected, len(tokenizer), len(expected))
                self._loaded[role] = model
            # The teacher is frozen and never trained: one instance serves every stage (a 7B teacher
            # is not copied). Students are trained twice (baseline, distilled), so each gets a copy.
            model = self._loaded[role] if role == "teacher" else copy.deepcopy(self._loaded[role])
        else:
            torch.manual_seed(self.model_seed(role))
            init_layers = m.init_from_teacher if role == "student" else None
            model = build_causal_lm(
                self.hf_config(m.hf.config, role),
                role=role,
                teacher=teacher if init_layers else None,
                init_layers=init_layers,
            )
        check_seq_len(self.seq_len_of(role), model)
        self._roles[model] = role
        return model.to(self.device)

    def release_teacher(self) -> None:
        """Forget the loaded teacher folder (Workload.release_teacher)."""
        self._loaded.pop("teacher", None)

    def model_seed(self, role: str) -> int:
        """The seed a fresh model of ``role`` is initialised from: the run's (teacher and students alike)."""
        return self.cfg.seed

    def shared_vocab(self, student: nn.Module, teacher: nn.Module | None) -> int | None:
        """Logit columns a student is trained and scored on: the ids it shares with the teacher
        when their embedding tables differ in size, else all (None)."""
        if teacher is None:
            return None
        teacher_size = teacher.get_output_embeddings().out_features
        student_size = student.get_output_embeddings().out_features
        if teacher_size == student_size:
            return None
        # align_vocab takes the teacher's size first; its notice names both in that order.
        return align_vocab(self.tokenizer, self.tokenizer, teacher_size, student_size)

    def task(
        self,
        stage: str,
        train: TrainConfig,
        seed: int,
        vocab_size: int | None = None,
        *,
        loss_impl: str = "plain",
        chunk_rows: int = 0,
    ) -> CausalLMTask:
        """The rows of ``stage`` (:meth:`stage_rows`) as a task; ``loss_impl``: the stage's resolved one."""
        return self.task_class_of(stage)(
            self.stage_rows(stage),
            self.held_out_of(stage),
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=seed,
            device=self.device,
            vocab_size=vocab_size,
            loss_impl=loss_impl,
            chunk_rows=chunk_rows,
            **self.task_options(stage),
        )

    task_class: type[CausalLMTask] = CausalLMTask

    def task_class_of(self, stage: str) -> type[CausalLMTask]:
        """The task class of ``stage`` (:attr:`task_class` for every stage here)."""
        return self.task_class

    def held_out_of(self, stage: str) -> Batch:
        """The held-out rows ``stage`` is scored on (the same for every stage here)."""
        return self.held_out

    def stage_rows(self, stage: str) -> Batch:
        """What ``stage`` trains on: every stage of a causal-LM run trains on the same rows."""
        return self.train

    def task_options(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of ``stage``'s task class beyond those of :class:`CausalLMTask`."""
        return {}

    def logit_shape(self, model: nn.Module, vocab_size: int | None = None) -> tuple[int, int]:
        """Scored positions per row and logit columns (what ``distill.loss_impl: auto`` decides by)."""
        return lm_logit_shape(model, self.seq_len_of(self.role_of(model)), vocab_size)

    def fused_problem(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot use the fused loss (None: it can)."""
        return fused_problem(model, self.probe(self.role_of(model)))

    def probe(self, role: str = "student") -> Batch:
        """The first two training rows of ``role``'s tokens (the same rows for both here), without labels."""
        return {k: self.train[k][:2].to(self.device) for k in ("input_ids", "attention_mask")}

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return lm_logits(model, batch)

    def layer_paths(self, model: nn.Module) -> list[str]:
        """The decoder blocks' module paths (what ``distill.layer_map`` pairs)."""
        return find_decoder_layers(model)

    def cache_source(self) -> CacheSource:
        """Every stage trains on the same token rows (their routes are not a teacher's input)."""
        return CacheSource({k: v for k, v in self.train.items() if k != "route"}, self.forward, self.tokenizer)

    def facts(self, model: nn.Module) -> dict[str, int]:
        """Parameters, and multiply-accumulates per token of a forward pass over one full row."""
        row = {k: v[:1] for k, v in self.probe(self.role_of(model)).items()}
        macs = forward_macs(model, lambda m: m(**row, use_cache=False))
        return {"params": count_params(model), "macs_per_token": macs // row["input_ids"].shape[1]}

    def save(self, stage_dir: Path, model: nn.Module) -> None:
        """A Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer."""
        folder = stage_dir / "hf"
        with no_progress_bars():
            model.save_pretrained(folder)
        self.tokenizer_of(self.role_of(model)).save_pretrained(folder)

    def test_arrays(self) -> dict[str, np.ndarray]:
        """The held-out rows as numpy arrays (deployment benchmarks and parity checks)."""
        return {k: v.numpy() for k, v in self.held_out.items()}

    def calibration_feeds(self, steps: int, batch: int) -> list[dict[str, np.ndarray]]:
        """``steps`` batches of training rows for static quantization (the article's observe_steps)."""
        rows = len(self.train["input_ids"])
        feeds = []
        for step in range(steps):
            idx = batch_indices(step, num_samples=rows, batch_size=batch, seed=self.cfg.seed)
            feeds.append({k: self.train[k][idx].numpy() for k in ("input_ids", "attention_mask")})
        return feeds

    def save_for_inference(self, folder: Path) -> None:
        """The tokenizer beside the ONNX files, for ``distilflow predict``."""
        self.tokenizer.save_pretrained(folder)

    @torch.no_grad()
    def preview(self, model: nn.Module, samples: int = 3, prompt_tokens: int = 24, new_tokens: int = 40) -> list[dict]:
        """Greedy continuations of the first tokens of a few held-out rows."""
        was_training = model.training
        model.eval()
        out = []
        for row in self.held_out["input_ids"][:samples]:
            prompt = row[:prompt_tokens].unsqueeze(0).to(self.device)
            generated = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            out.append(
                {
                    "prompt": self.tokenizer.decode(prompt[0]),
                    "continuation": self.tokenizer.decode(generated[0, prompt.shape[1] :]),
                }
            )
        model.train(was_training)
        return out
