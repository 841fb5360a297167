"""The causal-LM workload: tokenizer, token rows, teacher and student of a run, built from its config.

Data comes from ``data.text`` (your files) or ``data.stdlib`` (the built-in corpus, with a BPE
tokenizer trained on it and cached); models from ``model.hf`` (a local folder, or a transformers
config). Teacher and student share one tokenizer; if their embedding tables differ in size both
logits are cut to the shared ids (:meth:`CausalLMWorkload.shared_vocab`). The task the loop runs is
:class:`~distilflow.tasks.causal_lm.CausalLMTask`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distilflow.config import Config, TrainConfig
from distilflow.data.batches import batch_indices
from distilflow.data.cache import CacheSource
from distilflow.data.text import Record, check_seq_len, read_records, split, tokenize
from distilflow.errors import UserError
from distilflow.models.build import count_params, forward_macs
from distilflow.models.hf import align_vocab, build_causal_lm, load_causal_lm, load_tokenizer, no_progress_bars
from distilflow.models.layers import find_decoder_layers
from distilflow.tasks.causal_lm import Batch, CausalLMTask, fused_problem, lm_logit_shape, lm_logits


def _stdlib_tokenizer(cfg: Config, texts: list[str]) -> Any:
    """The built-in demo's byte-level BPE, trained once per corpus and size and cached."""
    from distilflow.data.stdlib_corpus import train_tokenizer

    corpus = cfg.data.stdlib
    key = hashlib.sha256(json.dumps([corpus.vocab_size, corpus.train_chars, "v1"]).encode()).hexdigest()[:12]
    folder = Path(cfg.data.cache_dir).expanduser() / f"stdlib-tokenizer-{key}"
    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(texts, corpus.vocab_size, folder)
    return load_tokenizer(folder)


class CausalLMWorkload:
    """Builds the tokenizer, token data, teacher and student of a causal-LM run from its config
    (a :class:`~distilflow.workload.Workload`)."""

    kind = "causal_lm"
    per_token = True
    primary_metric = "perplexity"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._loaded: dict[str, nn.Module] = {}
        self.skipped = 0
        self.tokenizer, train_records, held_records = self.load_records()
        self.train, self.held_out = self.rows(train_records), self.rows(held_records)

    def rows(self, records: list[Record]) -> Batch:
        """Token rows ``(N, seq_len)`` of ``records`` (packed when ``pack``; the data section's keys)."""
        rows = self.cfg.data.token_rows
        return tokenize(records, self.tokenizer, seq_len=rows.seq_len, pack=rows.pack)

    def load_records(self) -> tuple[Any, list[Record], list[Record]]:
        """The tokenizer, the training records and the held-out records of ``data.source``."""
        d = self.cfg.data
        if d.source == "stdlib":
            from distilflow.data.stdlib_corpus import load_stdlib_corpus

            corpus = load_stdlib_corpus(train_chars=d.stdlib.train_chars, eval_chars=d.stdlib.eval_chars)
            train_records = [Record(completion=text) for text in corpus.train]
            held_records = [Record(completion=text) for text in corpus.eval]
            return self._tokenizer() or _stdlib_tokenizer(self.cfg, corpus.train), train_records, held_records
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise UserError(
                "no tokenizer for data.source 'text': set data.text.tokenizer, or give student.model.hf.path or "
                "teacher.model.hf.path (a folder with a tokenizer)"
            )
        text = d.text
        records = read_records(text.path, on_error=text.on_error)
        if text.test_path:
            train_records, held_records = records.records, read_records(text.test_path, on_error=text.on_error).records
        else:
            train_records, held_records = split(records.records, fraction=text.test_fraction, seed=d.seed)
        self.skipped = records.skipped
        if records.skipped:
            first = records.problems[0] if records.problems else ""
            print(
                f"distilflow: skipped {records.skipped} bad lines (data.on_error=skip); first: {first}", file=sys.stderr
            )
        return tokenizer, train_records, held_records

    def _tokenizer(self) -> Any | None:
        c = self.cfg
        sources = (
            ("tokenizer folder", c.data.token_rows.tokenizer),
            ("student model directory", c.student.model.folder),
            ("teacher model directory", c.teacher.model.folder),
        )
        for what, path in sources:
            if path:
                return load_tokenizer(path, trust_remote_code=c.student.model.hf.trust_remote_code, what=what)
        return None

    def hf_config(self, values: dict[str, Any]) -> dict[str, Any]:
        """The config as given, with vocabulary size and special ids taken from the tokenizer if absent."""
        tok = self.tokenizer
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
                align_vocab(tokenizer, self.tokenizer, len(tokenizer), len(self.tokenizer))
                self._loaded[role] = model
            # The teacher is frozen and never trained: one instance serves every stage (a 7B teacher
            # is not copied). Students are trained twice (baseline, distilled), so each gets a copy.
            model = self._loaded[role] if role == "teacher" else copy.deepcopy(self._loaded[role])
        else:
            torch.manual_seed(self.model_seed(role))
            init_layers = m.init_from_teacher if role == "student" else None
            model = build_causal_lm(
                self.hf_config(m.hf.config),
                role=role,
                teacher=teacher if init_layers else None,
                init_layers=init_layers,
            )
        check_seq_len(self.cfg.data.token_rows.seq_len, model)
        return model.to(self.device)

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
        return self.task_class(
            self.stage_rows(stage),
            self.held_out,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=seed,
            device=self.device,
            vocab_size=vocab_size,
            loss_impl=loss_impl,
            chunk_rows=chunk_rows,
            **self.task_options(),
        )

    task_class: type[CausalLMTask] = CausalLMTask

    def stage_rows(self, stage: str) -> Batch:
        """What ``stage`` trains on: every stage of a causal-LM run trains on the same rows."""
        return self.train

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`task_class` beyond those of :class:`CausalLMTask`."""
        return {}

    def logit_shape(self, model: nn.Module, vocab_size: int | None = None) -> tuple[int, int]:
        """Scored positions per row and logit columns (what ``distill.loss_impl: auto`` decides by)."""
        return lm_logit_shape(model, self.cfg.data.token_rows.seq_len, vocab_size)

    def fused_problem(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot use the fused loss (None: it can)."""
        return fused_problem(model, self.probe())

    def probe(self) -> Batch:
        return {k: v[:2].to(self.device) for k, v in self.train.items() if k != "labels"}

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return lm_logits(model, batch)

    def layer_paths(self, model: nn.Module) -> list[str]:
        """The decoder blocks' module paths (what ``distill.layer_map`` pairs)."""
        return find_decoder_layers(model)

    def cache_source(self) -> CacheSource:
        """Every stage trains on the same token rows."""
        return CacheSource(dict(self.train), self.forward, self.tokenizer)

    def facts(self, model: nn.Module) -> dict[str, int]:
        """Parameters, and multiply-accumulates per token of a forward pass over one full row."""
        row = {k: v[:1] for k, v in self.probe().items()}
        macs = forward_macs(model, lambda m: m(**row, use_cache=False))
        return {"params": count_params(model), "macs_per_token": macs // row["input_ids"].shape[1]}

    def save(self, stage_dir: Path, model: nn.Module) -> None:
        """A Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer."""
        folder = stage_dir / "hf"
        with no_progress_bars():
            model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

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
