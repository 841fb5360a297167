"""The built-in reasoning demo (``reasoning.task: arith``): R1-style distillation end to end.

Stages, each reused when finished (and resumed from its checkpoint when not):

1. data: arithmetic problems drawn by code (distilflow/data/arith.py) in four disjoint sets:
   the teacher's training problems with worked solutions, a small gold set with worked solutions
   (what the student may use without a teacher), fresh prompts with reference answers only, and
   held-out prompts;
2. teacher: trained on its problems (cross-entropy on the solution tokens);
3. traces: the teacher writes ``generate.n`` traces per fresh prompt (``generate.*`` sampling);
   the format filter and the exact-match verifier reject wrong ones (distilflow/generate);
4. students, equal steps and the same initial weights: ``sft`` on the gold solutions,
   ``seq_kd`` on the verified traces, ``seq_token_kd`` on the traces plus token-level KD from the
   teacher (``distill.*``: phases, divergence, KD-weight schedule as configured), ``gkd`` on-policy
   (``on_policy.lmbda`` of the steps sample continuations from the student; generalised JSD with
   ``distill.jsd_beta``, the rest are the traces);
5. held-out exact match of the final answer (greedy decoding) for the teacher and every student;
   results.json and report.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distilflow.config import Config, read_yaml, to_dict
from distilflow.data.arith import ANSWER_PATTERN, FORMAT, Problem, arith_tokenizer, make_problems, max_tokens
from distilflow.data.text import Record, read_records, tokenize
from distilflow.errors import UserError
from distilflow.generate.backends import Sampling, TransformersBackend, sample_ids
from distilflow.generate.prompts import Prompt
from distilflow.generate.runner import generate_to_file
from distilflow.generate.verify import Checker, exact_match, extract_answer
from distilflow.generate.writer import SampleWriter
from distilflow.losses.objective import Objective
from distilflow.models.build import count_params
from distilflow.models.hf import build_student, no_progress_bars
from distilflow.pipeline import RESULT, Run, _load_finished, _train, stage_loss_impl, supervised_objective
from distilflow.schedules import phase_boundaries
from distilflow.tasks.causal_lm import CausalLMTask, fused_problem, lm_logit_shape
from distilflow.train.checkpoint import WEIGHTS, write_json, write_text, write_weights
from distilflow.train.loop import LiveTeacher

METHODS = {
    "sft": "SFT on gold worked solutions",
    "seq_kd": "sequence-level KD (verified teacher traces)",
    "seq_token_kd": "sequence-level + token-level KD",
    "gkd": "on-policy GKD",
}


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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _check_folder(cfg: Config) -> None:
    saved = cfg.run_dir / "config.yaml"
    if saved.is_file() and read_yaml(saved) != to_dict(cfg):
        raise UserError(
            f"output_dir '{cfg.run_dir}' holds a run with a different config; choose another output_dir, "
            "or 'distilflow resume' it with its own config"
        )


class Demo:
    """Paths, data and models shared by the stages of one reasoning run."""

    def __init__(self, cfg: Config, log_tensorboard: bool) -> None:
        from distilflow.pipeline import resolve_device

        self.cfg, self.log_tensorboard = cfg, log_tensorboard
        self.dir = cfg.run_dir
        self.device = resolve_device(cfg.device)
        r = cfg.reasoning
        self.seq_len = cfg.data.seq_len
        need = max_tokens(r.digits, r.operands)
        if need > self.seq_len:
            raise UserError(
                f"config key 'data.seq_len': {self.seq_len} is too short for {r.operands} operands of {r.digits} "
                f"digits; use at least {need}"
            )
        self.tokenizer = arith_tokenizer()
        self.teacher_set, self.gold, self.fresh, self.held = make_problems(
            [r.teacher_problems, r.gold_problems, r.fresh_prompts, r.eval_prompts],
            digits=r.digits,
            operands=r.operands,
            seed=cfg.data.seed,
        )
        self.max_new_tokens = need - r.operands * (r.digits + 1)

    def hf_config(self, values: dict[str, Any]) -> dict[str, Any]:
        tok = self.tokenizer
        filled = {
            "vocab_size": len(tok),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
        }
        return {**filled, **values}

    def new_model(self, role: str, seed: int) -> nn.Module:
        model_cfg = (self.cfg.teacher if role == "teacher" else self.cfg.student).model
        torch.manual_seed(seed)
        return build_student(self.hf_config(model_cfg.hf_config), role=role).to(self.device)

    per_token = True

    def rows(self, records: list[Record]) -> dict[str, torch.Tensor]:
        return tokenize(records, self.tokenizer, seq_len=self.seq_len, pack=False)

    def logit_shape(self, model: nn.Module, vocab_size: int | None = None) -> tuple[int, int]:
        return lm_logit_shape(model, self.seq_len, vocab_size)

    def fused_problem(self, model: nn.Module) -> str | None:
        return fused_problem(model, self.rows([Record(prompt=p.prompt, completion=p.solution) for p in self.held[:1]]))

    def task(self, records: list[Record], train, seed: int, *, loss_impl: str, chunk_rows: int) -> ExactMatchTask:
        held = self.rows([Record(prompt=p.prompt, completion=p.solution) for p in self.held[:8]])
        return ExactMatchTask(
            self.rows(records),
            held,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=seed,
            device=self.device,
            problems=self.held,
            tokenizer=self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            loss_impl=loss_impl,
            chunk_rows=chunk_rows,
        )

    def train_stage(self, stage: str, model: nn.Module, objective: Objective, task, **extra) -> dict:
        """Train (or reuse) ``stage``; returns its result dict."""
        # The pipeline's stage mechanics (reuse a finished stage; fit with its metrics log); they read
        # only the config and the run folder, so the demo needs no workload of the pipeline's kinds.
        run, folder = Run(self.cfg, None), self.dir / stage
        done = _load_finished(run, stage, model)
        if done is not None:
            return done
        result = _train(run, stage, model, objective, task, self.log_tensorboard, **extra)
        write_weights(folder / WEIGHTS, model.state_dict(), {"stage": stage})
        # A Hugging Face folder as well: 'distilflow generate' and from_pretrained load it.
        with no_progress_bars():
            model.save_pretrained(folder / "hf")
        self.tokenizer.save_pretrained(str(folder / "hf"))
        summary = {
            **result.metrics,
            "accuracy": result.metrics["exact_match"],
            "params": count_params(model),
            "steps": result.steps,
            "train_seconds": round(result.seconds, 2),
        }
        if hasattr(task, "on_policy_steps"):
            summary["on_policy_steps"] = task.on_policy_steps
        write_json(folder / RESULT, summary)
        return summary


def _distill_objective(cfg: Config, divergence: str, loss_impl: str) -> Objective:
    d, steps = cfg.distill, cfg.student.train.steps
    return Objective(
        phase_boundaries(d.phases, steps),
        total_steps=steps,
        kd_schedule=d.kd_weight,
        temperature=d.temperature,
        divergence=divergence,
        jsd_beta=d.jsd_beta,
        ce_weight=d.ce_weight,
        per_token=True,
        loss_impl=loss_impl,
        chunk_rows=d.loss_chunk_rows,
    )


def _check_phases(cfg: Config) -> None:
    d = cfg.distill
    if any("feature" in p.terms for p in d.phases):
        raise UserError(
            "config key 'distill.phases': the reasoning demo distils logits only; use the kd and ce terms "
            "(e.g. [{name: joint_optimization, fraction: 1.0, terms: [kd, ce]}])"
        )


def traces_stage(demo: Demo, teacher: nn.Module) -> dict:
    """The teacher's verified traces for the fresh prompts (resumable: finished prompts are skipped)."""
    g = demo.cfg.generate
    path = demo.dir / "data" / "traces.jsonl"
    writer = SampleWriter(path)
    prompts = [
        Prompt(id=str(i), text=p.prompt, answer=p.answer, where=f"fresh prompt {i}") for i, p in enumerate(demo.fresh)
    ]
    checker = Checker(verifier=exact_match, answer_pattern=ANSWER_PATTERN, format=FORMAT)
    torch.manual_seed(demo.cfg.seed + 5)
    stats = generate_to_file(
        prompts,
        TransformersBackend(teacher, demo.tokenizer, batch_size=g.batch_size),
        checker,
        writer,
        n=g.n,
        sampling=Sampling(max_new_tokens=demo.max_new_tokens, temperature=g.temperature, top_p=g.top_p),
        dedup=g.dedup,
        prompts_per_call=max(1, g.batch_size // g.n),
        budget_model=teacher,
        show_progress=sys.stderr.isatty(),
    )
    # Counts over the whole file (an interrupted run adds its earlier prompts from the progress file).
    kept = sum(row.get("kept", 0) for row in writer.finished.values())
    rejected: dict[str, int] = {}
    for row in writer.finished.values():
        for reason, count in row.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + count
    info = {
        "prompts": len(prompts),
        "samples": len(prompts) * g.n,
        "kept": kept,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "duplicates": sum(row.get("duplicates", 0) for row in writer.finished.values()),
        "prompts_with_a_kept_trace": sum(1 for row in writer.finished.values() if row.get("kept", 0)),
        "tokens_per_s_this_call": stats.as_dict()["tokens_per_s"],
        "path": str(path),
    }
    write_json(demo.dir / "data" / "traces_summary.json", info)
    return info


def run_reasoning(cfg: Config, log_tensorboard: bool = True) -> dict:
    """All stages of the demo; writes results.json and report.md into the run folder."""
    began = time.monotonic()
    _check_phases(cfg)
    _check_folder(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    demo = Demo(cfg, log_tensorboard)
    demo.dir.mkdir(parents=True, exist_ok=True)
    write_text(demo.dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    demo.tokenizer.save_pretrained(str(demo.dir / "tokenizer"))
    data = demo.dir / "data"
    for name, problems in (("teacher_train", demo.teacher_set), ("gold", demo.gold), ("held_out", demo.held)):
        rows = [{"prompt": p.prompt, "completion": p.solution, "answer": p.answer} for p in problems]
        _write_jsonl(data / f"{name}.jsonl", rows)
    fresh = [{"id": str(i), "prompt": p.prompt, "answer": p.answer} for i, p in enumerate(demo.fresh)]
    _write_jsonl(data / "fresh_prompts.jsonl", fresh)
    timings: dict[str, float] = {}

    # Teacher.
    mark = time.monotonic()
    teacher = demo.new_model("teacher", cfg.seed)
    teacher_records = [Record(prompt=p.prompt, completion=p.solution) for p in demo.teacher_set]
    chunk_rows = cfg.distill.loss_chunk_rows
    impl = stage_loss_impl(cfg, demo, cfg.teacher.train, [teacher])
    teacher_task = demo.task(teacher_records, cfg.teacher.train, cfg.seed, loss_impl=impl, chunk_rows=chunk_rows)
    objective = supervised_objective(cfg.teacher.train.steps, impl, chunk_rows)
    teacher_result = demo.train_stage("teacher", teacher, objective, teacher_task)
    teacher.eval()
    timings["teacher"] = time.monotonic() - mark

    # Traces.
    mark = time.monotonic()
    traces = traces_stage(demo, teacher)
    timings["traces"] = time.monotonic() - mark
    if traces["kept"] == 0:
        raise UserError("the teacher wrote no verified trace; train it longer (teacher.train.steps) or check the task")
    trace_records = read_records(data / "traces.jsonl").records

    # Students: same init, same steps, same batch size.
    students: dict[str, dict] = {}
    train = cfg.student.train
    for method in cfg.reasoning.methods:
        mark = time.monotonic()
        model = demo.new_model("student", cfg.seed + 1)
        records = (
            [Record(prompt=p.prompt, completion=p.solution) for p in demo.gold] if method == "sft" else trace_records
        )
        distilled = method not in ("sft", "seq_kd")
        impl = stage_loss_impl(cfg, demo, train, [model, teacher] if distilled else [model])
        task = demo.task(records, train, cfg.seed + 2, loss_impl=impl, chunk_rows=chunk_rows)
        extra: dict[str, Any] = {}
        if not distilled:
            objective = supervised_objective(train.steps, impl, chunk_rows)
        else:
            from distilflow.tasks.on_policy import on_policy_task

            objective = _distill_objective(cfg, "jsd" if method == "gkd" else cfg.distill.divergence, impl)
            if method == "gkd":
                task = on_policy_task(
                    task, model, cfg.on_policy, demo.tokenizer, seed=cfg.seed + 3, total_steps=train.steps
                )
            extra["teacher"] = LiveTeacher(teacher, task, None)
        students[method] = {**demo.train_stage(method, model, objective, task, **extra), "data": METHODS[method]}
        timings[method] = time.monotonic() - mark
        print(f"[reasoning] {method}: exact match {students[method]['exact_match']:.3f}", file=sys.stderr)

    results: dict[str, Any] = {
        "name": cfg.name,
        "task": {
            "digits": cfg.reasoning.digits,
            "operands": cfg.reasoning.operands,
            "teacher_problems": len(demo.teacher_set),
            "gold_problems": len(demo.gold),
            "fresh_prompts": len(demo.fresh),
            "eval_prompts": len(demo.held),
        },
        "teacher": teacher_result,
        "traces": traces,
        "students": students,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(time.monotonic() - began, 2),
    }
    write_json(demo.dir / "results.json", results)
    from distilflow.report import write_reasoning_report

    write_reasoning_report(demo.dir, cfg, results)
    print(reasoning_table(results))
    return results


def reasoning_table(results: dict) -> str:
    lines = [f"{'model':<14} {'exact match':>11} {'params':>9}  data"]
    t = results["teacher"]
    problems = results["task"]["teacher_problems"]
    lines.append(f"{'teacher':<14} {t['exact_match']:>11.3f} {t['params']:>9,}  {problems} worked solutions")
    for method, r in results["students"].items():
        lines.append(f"{method:<14} {r['exact_match']:>11.3f} {r['params']:>9,}  {r['data']}")
    tr = results["traces"]
    lines.append(f"traces: kept {tr['kept']}, rejected {tr['rejected']} {tr['rejected_by_reason']}")
    return "\n".join(lines)
