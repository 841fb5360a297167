"""Causal LMs whose teacher and student tokenizers differ: rows aligned across tokenizers (docs/CROSS_TOKENIZER.md).

:func:`causal_lm_workload` reads the text and each side's tokenizer once and decides
``distill.cross_tokenizer``: one tokenizer gives the plain causal-LM workload (a note when a
cross-tokenizer loss was forced); two give :class:`CrossTokenizerWorkload`, unless ``off`` was
forced (then one line). The cross-tokenizer workload aligns every row once (data/align.py,
data/aligned_rows.py): the student trains on its own ids, the teacher runs on its own
(teachers/cross_tokenizer.py), and the KD term compares aligned groups (losses/aligned_kd.py). The
teacher, when trained here, trains on its own tokenization of the training text; every stage is
also scored in bits per character, which compares across tokenizers.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from distilflow.config import Config
from distilflow.data.align import Aligner, Segment
from distilflow.data.aligned_rows import (
    alignment_from_rows,
    alignment_to_rows,
    packed_segments,
    record_segments,
    row_texts,
    student_view,
    teacher_view,
)
from distilflow.data.cache import CacheSource
from distilflow.data.text import Record, tokenize
from distilflow.data.vocab_map import build_vocab_map
from distilflow.errors import UserError
from distilflow.losses.aligned_kd import AlignedKD
from distilflow.losses.objective import IGNORE_INDEX, Targets
from distilflow.models.hf import tokenizer_difference
from distilflow.tasks.causal_lm import Batch, CausalLMTask
from distilflow.tasks.causal_lm_workload import CausalLMWorkload, LoadedText, load_text
from distilflow.teachers.cross_tokenizer import TeacherIdsGuard, teacher_logits


def cross_tokenizer_mode(setting: str, student_tokenizer: Any, teacher_tokenizer: Any) -> str:
    """``off`` (one tokenizer), ``uld`` or ``hybrid``, from ``distill.cross_tokenizer`` and the tokenizers.

    Differing tokenizers with ``off`` forced are refused in one line; one tokenizer with ``uld`` or
    ``hybrid`` forced is a note on stderr, then plain KD (exact and cheaper)."""
    same = student_tokenizer is teacher_tokenizer
    difference = None if same else tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if difference is None:
        if setting in ("uld", "hybrid"):
            print(
                f"distilflow: note: distill.cross_tokenizer {setting}: teacher and student share one tokenizer; "
                "distilling with plain KD",
                file=sys.stderr,
            )
        return "off"
    if setting == "off":
        raise UserError(
            f"distill.cross_tokenizer off: {difference}; set distill.cross_tokenizer to auto, uld or hybrid to "
            "distil across tokenizers, or give both models one tokenizer"
        )
    return "hybrid" if setting == "auto" else setting


def causal_lm_workload(cfg: Config, device: torch.device) -> CausalLMWorkload:
    """The causal-LM workload of ``cfg``: across tokenizers when teacher and student tokenizers differ."""
    text = load_text(cfg)
    mode = cross_tokenizer_mode(cfg.distill.cross_tokenizer, text.tokenizer, text.teacher_tokenizer)
    if mode == "off":
        return CausalLMWorkload(cfg, device, text)
    return CrossTokenizerWorkload(cfg, device, text, mode)


def check_cross_tokenizer_config(cfg: Config) -> None:
    """What a run across tokenizers cannot do, refused in one line before anything is read or written."""
    d, c = cfg.distill, cfg.cache
    where = "across tokenizers"
    if d.loss_impl == "fused":
        raise UserError(
            f"distill.loss_impl fused: {where} the KD term reads the student's logits; use distill.loss_impl=chunked "
            "or plain (auto picks chunked)"
        )
    if any("feature" in phase.terms for phase in d.phases) and d.layer_map is None:
        raise UserError(
            f"distill.feature_layers: a feature phase {where} compares decoder layers at the ends of aligned spans; "
            "give distill.layer_map (uniform or [student, teacher] index pairs) instead, or drop the feature term"
        )
    if c.use and c.format == "sampled":
        raise UserError(
            f"cache.format sampled: {where} the cache holds the teacher's top-k (or full) signals; use "
            "cache.format=topk or full"
        )
    if c.use and d.hybrid_buckets == "span":
        raise UserError(
            f"distill.hybrid_buckets span: {where} the teacher-signal cache is not supported with span buckets yet; "
            "set distill.hybrid_buckets=merged or cache.use=false"
        )
    if c.use and c.features:
        raise UserError(f"cache.features: {where} teacher features are not cached; set cache.features=false")
    if cfg.teacher is not None and cfg.teacher.server is not None:  # its requests and answers are in one vocabulary
        raise UserError(
            f"teacher.server: a served teacher is not supported {where} (the server is checked against the "
            "student's tokenizer and scores one tokenizer's rows); serve a teacher with the student's tokenizer, "
            "or drop teacher.server so that the teacher (teacher.model.hf.path) runs here or from its cache"
        )
    kd_only = [phase.name for phase in d.phases if "kd" in phase.terms and "ce" not in phase.terms]
    if kd_only:  # allowed (a user may know better), but the measured demo says why it is a poor default
        print(
            f"distilflow: note: distill.phases {kd_only} have kd without ce: {where} the KD term does not teach "
            "the student which of its own pieces comes next, so keep ce in every phase (docs/CROSS_TOKENIZER.md, 5)",
            file=sys.stderr,
        )


def spelled_prefix(spelling: list[bytes | None], ids: list[int]) -> tuple[str, list[int]]:
    """The text of the longest prefix of sampled ``ids`` that spells whole UTF-8 characters, and that
    prefix: it stops at a token without text (a special token) and drops a partly written character."""
    parts: list[bytes] = []
    for token in ids:
        piece = spelling[token] if 0 <= token < len(spelling) else None
        if piece is None:
            break
        parts.append(piece)
    while parts:
        try:
            return b"".join(parts).decode("utf-8"), ids[: len(parts)]
        except UnicodeDecodeError:
            parts.pop()
    return "", []


class CrossTokenizerTask(CausalLMTask):
    """Aligned rows: the student trains and is scored on its own ids; the targets carry the alignment.

    ``kd_mask`` marks the logit row that predicts each group's first token and ``feature_mask`` each
    group's last token, so the KD and feature terms divide by the step's groups. ``prompts``: each
    training row's prompt segment (on-policy sampling continues it), ``aligner`` re-aligns samples.
    """

    def __init__(self, *args: Any, aligner: Aligner, prompts: list[Segment | None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aligner, self.prompts = aligner, prompts

    def targets(self, batch: Batch) -> Targets:
        labels = batch["labels"][:, 1:]  # (B, T_s - 1)
        alignment = alignment_from_rows({k: v for k, v in batch.items() if k != "sampled"})
        kd_mask = torch.zeros_like(labels, dtype=torch.bool)
        kd_mask[alignment.batch, alignment.student.first - 1] = True
        feature_mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        feature_mask[alignment.batch, alignment.student.last] = True
        return Targets(labels=labels, kd_mask=kd_mask, feature_mask=feature_mask, alignment=alignment)

    def continued_rows(
        self,
        batch: Batch,
        prompts: list[list[int]],
        samples: list[tuple[list[int], bool]],
        *,
        pad: int,
        eos: int | None,
    ) -> Batch:
        """On-policy rows across tokenizers: each sample, cut at its last whole character, is the text of
        a scored segment that keeps the student's sampled ids, after the row's prompt segment; the
        teacher reads the text re-tokenized (data/align.py aligns it like any row)."""
        spelling = self.aligner.student.spelling
        rows = []
        for row, (ids, finished) in zip(batch["row"].tolist(), samples):
            text, kept = spelled_prefix(spelling, ids)
            stopped = finished and len(kept) == len(ids)
            rows.append([self.prompts[row], Segment(text, scored=True, eos=stopped, student_ids=tuple(kept))])
        alignment = self.aligner(rows)
        columns = alignment_to_rows(alignment, row_texts(rows)[1])
        out = {key: value.to(self.device) for key, value in columns.items()}
        out["sampled"] = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        return out


class CrossTokenizerWorkload(CausalLMWorkload):
    """A causal-LM workload whose teacher has its own tokenizer (a :class:`~distilflow.workload.Workload`)."""

    def __init__(self, cfg: Config, device: torch.device, text: LoadedText, mode: str) -> None:
        check_cross_tokenizer_config(cfg)
        self.cfg, self.device, self.cross_tokenizer = cfg, device, mode
        self._loaded: dict[str, nn.Module] = {}
        self._roles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.skipped = text.skipped
        self.tokenizer, self.teacher_tokenizer = text.tokenizer, text.teacher_tokenizer
        rows = cfg.data.token_rows
        self.teacher_seq = rows.teacher_seq_len or rows.seq_len
        # A slow tokenizer (no character offsets) is refused here, in one line.
        self.aligner = Aligner(
            self.tokenizer, self.teacher_tokenizer, student_seq_len=rows.seq_len, teacher_seq_len=self.teacher_seq
        )
        vocab_map = build_vocab_map(self.tokenizer, self.teacher_tokenizer) if mode == "hybrid" else None
        d = cfg.distill
        self.aligned_kd = AlignedKD(
            mode, vocab_map, d.hybrid_matched_weight, d.hybrid_unmatched_weight, d.hybrid_buckets
        )
        self._train_records, self._teacher_train = text.train, None
        self.train, self.prompts = self.aligned_rows(text.train)
        self.held_out, _ = self.aligned_rows(text.held_out)

    def aligned_rows(self, records: list[Record]) -> tuple[Batch, list[Segment | None]]:
        """The aligned columns of ``records`` (packed when ``pack``) and each row's prompt segment."""
        rows = self.cfg.data.token_rows
        key = f"data.{self.cfg.data.source}.pack"
        if rows.pack:
            if any(record.prompt or record.messages for record in records):
                raise UserError(
                    f"{key}: across tokenizers only plain documents are packed; set {key}=false for prompt/completion "
                    "or chat records"
                )
            segments = packed_segments(
                [record.completion for record in records],
                self.tokenizer,
                self.teacher_tokenizer,
                student_seq_len=rows.seq_len,
                teacher_seq_len=self.teacher_seq,
            )
        else:
            segments = [record_segments(record, self.tokenizer, self.teacher_tokenizer) for record in records]
        if not segments:
            raise UserError(f"no rows of text to align (seq_len {rows.seq_len}); check the data")
        alignment = self.aligner(segments)
        columns = alignment_to_rows(alignment, row_texts(segments)[1])
        scored = (columns["labels"] != IGNORE_INDEX).any(dim=1)  # (N,)
        if not scored.any():
            raise UserError(f"no row has a completion token within seq_len={rows.seq_len}; shorten prompts or raise it")
        if not scored.all():
            warnings.warn(
                f"dropped {int((~scored).sum())} of {len(scored)} rows with no completion token", stacklevel=2
            )
        keep = np.flatnonzero(scored.numpy())
        prompts = [segments[i][0] if not segments[i][0].scored else None for i in keep]
        return {key: value[scored] for key, value in columns.items()}, prompts

    def teacher_rows(self) -> Batch:
        """The teacher's own token rows of the training text (``teacher_seq_len``), for a teacher trained here."""
        if self._teacher_train is None:
            rows = self.cfg.data.token_rows
            self._teacher_train = tokenize(
                self._train_records, self.teacher_tokenizer, seq_len=self.teacher_seq, pack=rows.pack
            )
        return self._teacher_train

    def tokenizer_of(self, role: str) -> Any:
        return self.teacher_tokenizer if role == "teacher" else self.tokenizer

    def seq_len_of(self, role: str) -> int:
        return self.teacher_seq if role == "teacher" else self.cfg.data.token_rows.seq_len

    def shared_vocab(self, student: nn.Module, teacher: nn.Module | None) -> int | None:
        """None: across tokenizers no logit columns are cut (the vocabularies are not one)."""
        return None

    # The teacher trains on its own token rows; every student on the aligned rows. Both are scored on the
    # same held-out text, each on its own tokens (perplexity) and in bits per character.

    def task_class_of(self, stage: str) -> type[CausalLMTask]:
        return CausalLMTask if stage == "teacher" else CrossTokenizerTask

    def held_out_of(self, stage: str) -> Batch:
        return teacher_view(self.held_out) if stage == "teacher" else student_view(self.held_out)

    def task_options(self, stage: str) -> dict[str, Any]:
        return {} if stage == "teacher" else {"aligner": self.aligner, "prompts": self.prompts}

    def stage_rows(self, stage: str) -> Batch:
        return self.teacher_rows() if stage == "teacher" else self.train

    def fused_problem(self, model: nn.Module) -> str | None:
        if self.role_of(model) == "student":
            return "across tokenizers the KD term reads the student's logits"
        return super().fused_problem(model)

    def probe(self, role: str = "student") -> Batch:
        prefix = "teacher_" if role == "teacher" else ""
        return {key: self.train[prefix + key][:2].to(self.device) for key in ("input_ids", "attention_mask")}

    def cache_source(self) -> CacheSource:
        """The aligned rows; the teacher runs on its own ids (the first batch guarded), and the cache also
        keeps the log-probability of each next teacher token (what merging a group's span needs)."""
        guard = TeacherIdsGuard(self.tokenizer, self.teacher_tokenizer)
        return CacheSource(
            dict(self.train),
            lambda model, batch: teacher_logits(model, batch, guard),
            self.tokenizer,
            teacher_tokenizer=self.teacher_tokenizer,
            next_ids="teacher_input_ids",
        )

    def test_arrays(self) -> dict[str, np.ndarray]:
        """The held-out rows of the student's tokens (what the exported student reads)."""
        return {k: self.held_out[k].numpy() for k in ("input_ids", "attention_mask", "labels")}
