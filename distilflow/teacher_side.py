"""What the stages set up around a teacher that is not in this process: a teacher served by vLLM (its
client, its outline, the identity checks, its score) and a given teacher whose signals are all in a
complete cache (its score and cost from the cache's manifest).

Neither loads teacher weights. A served teacher is known here by ``teacher.model.hf.path``'s
config.json (its architecture on the meta device: vocabulary size, parameter count) and its tokenizer;
everything else comes from the server, checked before anything is written: the served model's name,
its tokenizer (a probe text tokenized both ways), its vocabulary size (the ids it accepts), that it
gives the asked number of log-probabilities and takes rows of ``seq_len`` tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from distilflow.config import Config
from distilflow.data.cache import cache_dir, read_manifest, reads_cache
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX, Objective, uses_teacher
from distilflow.models.build import count_params
from distilflow.models.hf import causal_lm_outline, linear_macs_per_token
from distilflow.stages import Run
from distilflow.teachers.served import Lookahead, ServedTeacher
from distilflow.teachers.served_client import TeacherClient
from distilflow.train.checkpoint import CHECKPOINT
from distilflow.train.loop import Task

# Held-out rows per scoring request of a served teacher (one id per position: small answers).
SCORE_ROWS = 16


def teacher_elsewhere(cfg: Config) -> bool:
    """Whether no teacher model is loaded here: it is served, or it is given (a folder or checkpoint) and
    distillation reads all its signals from a complete cache (a teacher trained by this run is reused)."""
    return cfg.teacher.server is not None or (bool(cfg.teacher.model.pretrained) and reads_cache(cfg))


def teacher_client(cfg: Config, *, top_k: int | None = None) -> TeacherClient:
    """A client of ``teacher.server`` asking ``top_k`` log-probabilities per position (default its top_k)."""
    server = cfg.teacher.server
    return TeacherClient(
        server.url,
        model=server.model,
        top_k=top_k or server.top_k,
        timeout_s=server.timeout_s,
        max_retries=server.max_retries,
    )


def teacher_outline(run: Run) -> nn.Module:
    """The served teacher's architecture from ``teacher.model.hf.path``'s config.json, on the meta device."""
    return causal_lm_outline(run.cfg.teacher.model.folder, role="teacher")


def student_columns(run: Run, student: nn.Module, outline: nn.Module) -> int:
    """The logit columns the student is trained on beside a served teacher: the shared ids (the cut
    when the embedding sizes differ), else all of the student's."""
    cut = run.work.shared_vocab(student, outline)
    return cut if cut is not None else student.get_output_embeddings().out_features


def shared_vocab_of(run: Run, student: nn.Module, teacher: nn.Module | None) -> int | None:
    """``Workload.shared_vocab`` when the teacher model may not be here: from the teacher model, a complete
    cache's manifest (the columns it holds), or a served teacher's outline."""
    cfg = run.cfg
    if teacher is not None or not teacher_elsewhere(cfg):
        return run.work.shared_vocab(student, teacher)
    if reads_cache(cfg):
        vocab = read_manifest(cache_dir(cfg))["identity"]["vocab_size"]
        return None if vocab == student.get_output_embeddings().out_features else vocab
    return run.work.shared_vocab(student, teacher_outline(run))


def check_served_teacher(run: Run, outline: nn.Module, *, writes_cache: bool) -> None:
    """Before anything is written: the server serves the configured model, with this run's tokenizer and
    the outline's vocabulary, gives the log-probabilities asked (``top_k`` online, ``cache.k`` when
    caching) and takes rows of ``seq_len`` tokens (+1 generated)."""
    cfg = run.cfg
    ks = [cfg.teacher.server.top_k] if not (cfg.cache.use or writes_cache) else [cfg.cache.k]
    client = teacher_client(cfg, top_k=max(ks))
    try:
        vocab = outline.get_output_embeddings().out_features
        info = client.check(tokenizer=run.work.tokenizer, vocab_size=vocab)
    finally:
        client.close()
    seq_len = cfg.data.token_rows.seq_len
    if info.max_model_len is not None and seq_len + 1 > info.max_model_len:
        raise UserError(
            f"teacher server at {client.server.url} ('{info.name}') takes {info.max_model_len} positions; rows of "
            f"data.{cfg.data.source}.seq_len {seq_len} (+1 generated) do not fit; lower it to at most "
            f"{info.max_model_len - 1} or start vLLM with a larger --max-model-len"
        )


def served_signals(run: Run, student: nn.Module, task: Task, objective: Objective) -> tuple[ServedTeacher, Task]:
    """The served teacher's signals for the student stage, and the task that sends their requests ahead:
    the next step's too when batches are a pure function of the step (not with on-policy sampling),
    only for steps whose phase uses the teacher."""
    cfg = run.cfg
    vocab = student_columns(run, student, teacher_outline(run))
    teacher = ServedTeacher(teacher_client(cfg), vocab_size=vocab, device=run.work.device)
    lookahead = Lookahead(
        task,
        teacher,
        next_step=cfg.on_policy.lmbda == 0,
        total_steps=cfg.student.train.steps,
        wanted=lambda step: uses_teacher(objective.phase(step).terms),
    )
    return teacher, lookahead


def stopped_note(run: Run, stage: str) -> str:
    """What a stage stopped by its teacher's server keeps, for the error line."""
    checkpoint = run.stage_dir(stage) / CHECKPOINT
    if checkpoint.is_file():
        return f"{stage} stopped; its last checkpoint {checkpoint} is kept and the same command resumes from it"
    return f"{stage} stopped before its first checkpoint; the same command starts it again"


def outline_facts(outline: nn.Module) -> dict[str, int]:
    """A teacher's cost without its weights: parameters, and the linear layers' multiply-accumulates per
    token (the FLOP counter's figure for an SDPA decoder on CPU; see models/hf.linear_macs_per_token)."""
    return {"params": count_params(outline), "macs_per_token": linear_macs_per_token(outline)}


def served_teacher_result(run: Run) -> dict[str, Any]:
    """The served teacher scored as a local one is (``Task.evaluate``: perplexity, mean token loss over
    the held-out labels), from the server's log-probabilities of the held-out tokens, with its cost
    from its outline."""
    cfg = run.cfg
    arrays = {k: torch.from_numpy(v) for k, v in run.work.test_arrays().items()}
    client = teacher_client(cfg, top_k=1)
    total, count = 0.0, 0
    try:
        for start in range(0, len(arrays["input_ids"]), SCORE_ROWS):
            rows = {k: v[start : start + SCORE_ROWS] for k, v in arrays.items()}
            log_probs = client.token_log_probs(rows["input_ids"], rows["attention_mask"])  # (B, T - 1)
            scored = rows["labels"][:, 1:] != IGNORE_INDEX
            picked = log_probs[scored].double()
            if bool(torch.isnan(picked).any()):
                raise UserError(
                    f"teacher server at {client.server.url}: no log-probability for a held-out token; cannot score"
                )
            total -= float(picked.sum())
            count += int(scored.sum())
    finally:
        client.close()
    loss = total / max(count, 1)
    server = cfg.teacher.server
    return {
        "perplexity": math.exp(min(loss, 700.0)),
        "loss": loss,
        "steps": 0,
        "loaded_from": f"model '{server.model}' served at {server.url}",
        **outline_facts(teacher_outline(run)),
    }


def cached_teacher_result(cfg: Config) -> dict[str, Any]:
    """A given teacher's score and cost as recorded in the complete cache that stands in for it (a cache
    written before they were recorded has none: the result says so)."""
    folder = cache_dir(cfg)
    recorded = read_manifest(folder).get("teacher_result")
    if recorded:
        return {**recorded, "from_cache": str(folder)}
    return {
        "steps": 0,
        "from_cache": str(folder),
        "note": "the teacher was not loaded (its signals come from the cache) and the cache records no score or "
        "cost for it; run cache-teacher again into a new cache.path to record them",
    }


def elsewhere_result(run: Run) -> dict[str, Any]:
    """The result of a teacher not loaded here (:func:`teacher_elsewhere`): recorded in the complete cache
    that stands in for it, else scored by its server."""
    return cached_teacher_result(run.cfg) if reads_cache(run.cfg) else served_teacher_result(run)
