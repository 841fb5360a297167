"""The reasoning demo's workload: arithmetic problems with worked solutions (distilflow/data/arith.py).

A causal-LM workload (:class:`~distilflow.tasks.causal_lm_workload.CausalLMWorkload`) whose data is drawn by
code and whose rows differ per stage: the teacher learns the teacher problems' worked solutions,
the ``sft`` student the small gold set, every other student the teacher's verified traces (set by
the traces stage, :attr:`ReasoningWorkload.traces`). Every stage is scored by exact match of the
greedy final answer on the held-out prompts (:class:`ExactMatchTask`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distilflow.config import Config
from distilflow.data.arith import ANSWER_PATTERN, Problem, arith_tokenizer, make_problems, max_tokens
from distilflow.data.text import Record, tokenize
from distilflow.errors import UserError
from distilflow.generate.backends import sample_ids
from distilflow.generate.sampling import Sampling
from distilflow.generate.verify import exact_match, extract_answer
from distilflow.tasks.causal_lm import Batch, CausalLMTask
from distilflow.tasks.causal_lm_workload import CausalLMWorkload, LoadedText


class ExactMatchTask(CausalLMTask):
    """A causal-LM task scored by exact match of the final answer on held-out prompts (greedy)."""

    primary_metric = "exact_match"

    def __init__(self, *args: Any, problems: list[Problem], tokenizer: Any, max_new_tokens: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.problems, self.tokenizer, self.max_new_tokens = problems, tokenizer, max_new_tokens

    def evaluate(self, model: nn.Module, batch_size: int = 250) -> dict[str, float]:
        return {"exact_match": exact_match_accuracy(model, self.tokenizer, self.problems, self.max_new_tokens)}


@torch.no_grad()
def exact_match_accuracy(
    model: nn.Module, tokenizer: Any, problems: list[Problem], max_new_tokens: int, batch_size: int = 250
) -> float:
    """Share of problems whose greedy completion's final answer equals Python's integer sum."""
    correct = 0
    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        outputs = sample_ids(
            model, prompts, sampling=greedy, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        for problem, (ids, _) in zip(chunk, outputs):
            extracted = extract_answer(tokenizer.decode(ids, skip_special_tokens=True), ANSWER_PATTERN)
            correct += extracted is not None and exact_match(extracted, problem.answer)
    return correct / len(problems)


def solutions(problems: list[Problem]) -> list[Record]:
    """Prompt + worked-solution records of ``problems``."""
    return [Record(prompt=p.prompt, completion=p.solution) for p in problems]


class ReasoningWorkload(CausalLMWorkload):
    """The demo's problem sets, character tokenizer, models and per-stage tasks (a
    :class:`~distilflow.workload.Workload`). Students start from ``seed + 1`` (the teacher from ``seed``),
    all from the same weights."""

    primary_metric = "exact_match"

    def __init__(self, cfg: Config, device: torch.device) -> None:
        r = cfg.reasoning
        need = max_tokens(r.digits, r.operands)
        if need > cfg.data.text.seq_len:
            raise UserError(
                f"config key 'data.text.seq_len': {cfg.data.text.seq_len} is too short for {r.operands} operands of "
                f"{r.digits} digits; use at least {need}"
            )
        self.max_new_tokens = need - r.operands * (r.digits + 1)
        self.traces: list[Record] = []  # the teacher's verified traces, once the traces stage has run
        super().__init__(cfg, device)

    def load_records(self) -> LoadedText:
        """Four disjoint problem sets drawn with ``data.seed``: the teacher's, gold, fresh prompts, held out."""
        r = self.cfg.reasoning
        self.teacher_set, self.gold, self.fresh, self.held = make_problems(
            [r.teacher_problems, r.gold_problems, r.fresh_prompts, r.eval_prompts],
            digits=r.digits,
            operands=r.operands,
            seed=self.cfg.data.seed,
        )
        tokenizer = arith_tokenizer()  # teacher and students share it
        return LoadedText(tokenizer, tokenizer, solutions(self.teacher_set), solutions(self.held))

    def rows(self, records: list[Record]) -> Batch:
        """One record per row, padded (prompt + solution + eos fit ``data.text.seq_len``)."""
        return tokenize(records, self.tokenizer, seq_len=self.cfg.data.text.seq_len, pack=False)

    def model_seed(self, role: str) -> int:
        return self.cfg.seed if role == "teacher" else self.cfg.seed + 1

    task_class = ExactMatchTask

    def stage_rows(self, stage: str) -> Batch:
        """What ``stage`` trains on: teacher problems, the gold set (``sft``), else the verified traces."""
        if stage == "teacher":
            return self.train
        if stage == "sft":
            return self.rows(solutions(self.gold))
        if not self.traces:
            raise UserError(f"reasoning stage '{stage}' trains on the teacher's traces; none are verified yet")
        return self.rows(self.traces)

    def task_options(self, stage: str) -> dict[str, Any]:
        return {"problems": self.held, "tokenizer": self.tokenizer, "max_new_tokens": self.max_new_tokens}

    def preview(self, model: nn.Module) -> list[dict[str, str]]:
        """Exact match is the demo's evidence; no continuations are shown."""
        return []
