"""Load-time checks of the ``generate:``, ``on_policy:`` and ``reasoning:`` config sections.

Called from :func:`distilflow.config_checks.validate` with its ``need(ok, key, value, rule)`` helper, so
each failure is the same one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any


def _regex_ok(pattern: str | None) -> bool:
    if pattern is None:
        return True
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def validate_generation(cfg: Any, need: Any) -> None:
    g = cfg.generate
    need(g.n >= 1, "generate.n", g.n, "must be >= 1 (completions per prompt)")
    need(g.batch_size >= 1, "generate.batch_size", g.batch_size, "must be >= 1")
    need(g.temperature >= 0, "generate.temperature", g.temperature, "must be >= 0 (0 = greedy)")
    need(0 < g.top_p <= 1, "generate.top_p", g.top_p, "must be in (0, 1]")
    need(g.max_new_tokens >= 1, "generate.max_new_tokens", g.max_new_tokens, "must be >= 1")
    need(g.min_tokens >= 0, "generate.min_tokens", g.min_tokens, "must be >= 0")
    need(
        g.max_tokens is None or g.max_tokens >= max(g.min_tokens, 1),
        "generate.max_tokens",
        g.max_tokens,
        "must be >= min_tokens and >= 1, or null",
    )
    need(all(s for s in g.stop), "generate.stop", g.stop, "stop strings must be non-empty")
    if g.server.url is not None:
        need(g.backend == "vllm", "generate.server.url", g.server.url, "a served model needs generate.backend=vllm")
        need(
            g.server.url.startswith(("http://", "https://")), "generate.server.url", g.server.url, "http(s)://host:port"
        )
    need(g.server.timeout_s > 0, "generate.server.timeout_s", g.server.timeout_s, "must be > 0")
    need(g.server.max_retries >= 0, "generate.server.max_retries", g.server.max_retries, "must be >= 0")
    need(_regex_ok(g.format), "generate.format", g.format, "must be a valid Python regex")
    need(_regex_ok(g.answer_pattern), "generate.answer_pattern", g.answer_pattern, "must be a valid Python regex")
    need(
        g.verifier in ("none", "exact", "regex", "math") or re.fullmatch(r"[\w.]+:\w+", g.verifier) is not None,
        "generate.verifier",
        g.verifier,
        "use none, exact, regex, math, or 'module.path:function'",
    )
    p = cfg.on_policy
    need(0 <= p.lmbda <= 1, "on_policy.lmbda", p.lmbda, "must be in [0, 1] (0 = off)")
    need(0 <= p.start_fraction < 1, "on_policy.start_fraction", p.start_fraction, "must be in [0, 1)")
    need(p.max_new_tokens >= 1, "on_policy.max_new_tokens", p.max_new_tokens, "must be >= 1")
    need(p.temperature > 0, "on_policy.temperature", p.temperature, "must be > 0 (on-policy samples are sampled)")
    need(0 < p.top_p <= 1, "on_policy.top_p", p.top_p, "must be in (0, 1]")
    if p.lmbda > 0:
        need(cfg.task == "causal_lm", "on_policy.lmbda", p.lmbda, "on-policy distillation needs a causal LM")
        need(
            any("kd" in phase.terms for phase in cfg.distill.phases),
            "on_policy.lmbda",
            p.lmbda,
            "on-policy samples are scored by the teacher: add the 'kd' term to a distill phase",
        )
    r = cfg.reasoning
    need(1 <= r.digits <= 9, "reasoning.digits", r.digits, "must be in 1..9")
    need(2 <= r.operands <= 5, "reasoning.operands", r.operands, "must be in 2..5")
    for key in ("teacher_problems", "gold_problems", "fresh_prompts", "eval_prompts"):
        need(getattr(r, key) >= 1, f"reasoning.{key}", getattr(r, key), "must be >= 1")
    need(len(set(r.methods)) == len(r.methods) and r.methods, "reasoning.methods", r.methods, "distinct, at least one")
    if r.task != "off":
        need(cfg.data.source == "text", "data.source", cfg.data.source, "the reasoning demo uses source 'text'")
