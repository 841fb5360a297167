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
from torch import nn

from distilflow.config import Config
from distilflow.data.arith import ANSWER_PATTERN, FORMAT
from distilflow.data.text import read_records
from distilflow.device import resolve_device
from distilflow.errors import UserError
from distilflow.generate.backends import TransformersBackend
from distilflow.generate.prompts import Prompt
from distilflow.generate.runner import generate_to_file
from distilflow.generate.sampling import Sampling
from distilflow.generate.verify import Checker, exact_match
from distilflow.generate.writer import SampleWriter
from distilflow.models.build import count_params
from distilflow.stages import (
    Run,
    check_output_dir,
    distill_objective,
    finish_stage,
    load_finished,
    save_config,
    stage_loss_impl,
    supervised_objective,
    train_stage,
)
from distilflow.tasks.reasoning import ReasoningWorkload
from distilflow.teachers.live import LiveTeacher
from distilflow.train.checkpoint import write_json, write_text
from distilflow.workload import make_workload

METHODS = {
    "sft": "SFT on gold worked solutions",
    "seq_kd": "sequence-level KD (verified teacher traces)",
    "seq_token_kd": "sequence-level + token-level KD",
    "gkd": "on-policy GKD",
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def reasoning_stage(run: Run, stage: str, model: nn.Module, objective, task, log_tensorboard: bool, **extra) -> dict:
    """Train (or reuse) ``stage`` through the same stage functions as the pipeline; its result dict."""
    done = load_finished(run, stage, model)
    if done is not None:
        return done
    result = train_stage(run, stage, model, objective, task, log_tensorboard=log_tensorboard, **extra)
    facts = {"accuracy": result.metrics["exact_match"], "params": count_params(model)}
    if hasattr(task, "on_policy_steps"):
        facts["on_policy_steps"] = task.on_policy_steps
    return finish_stage(run, stage, model, result, facts=facts)


def _check_phases(cfg: Config) -> None:
    d = cfg.distill
    if any("feature" in p.terms for p in d.phases):
        raise UserError(
            "config key 'distill.phases': the reasoning demo distils logits only; use the kd and ce terms "
            "(e.g. [{name: joint_optimization, fraction: 1.0, terms: [kd, ce]}])"
        )


def traces_stage(run: Run, teacher: nn.Module) -> dict:
    """The teacher's verified traces for the fresh prompts (resumable: finished prompts are skipped)."""
    work: ReasoningWorkload = run.work
    g = run.cfg.generate
    path = run.dir / "data" / "traces.jsonl"
    writer = SampleWriter(path)
    prompts = [
        Prompt(id=str(i), text=p.prompt, answer=p.answer, where=f"fresh prompt {i}") for i, p in enumerate(work.fresh)
    ]
    checker = Checker(verifier=exact_match, answer_pattern=ANSWER_PATTERN, format=FORMAT)
    torch.manual_seed(run.cfg.seed + 5)
    stats = generate_to_file(
        prompts,
        TransformersBackend(teacher, work.tokenizer, batch_size=g.batch_size),
        checker,
        writer,
        n=g.n,
        sampling=Sampling(max_new_tokens=work.max_new_tokens, temperature=g.temperature, top_p=g.top_p),
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
    write_json(run.dir / "data" / "traces_summary.json", info)
    return info


def run_reasoning(cfg: Config, log_tensorboard: bool = True) -> dict:
    """All stages of the demo; writes results.json and report.md into the run folder."""
    began = time.monotonic()
    _check_phases(cfg)
    check_output_dir(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work: ReasoningWorkload = make_workload(cfg, resolve_device(cfg.device))
    run = Run(cfg, work)
    save_config(cfg)
    work.tokenizer.save_pretrained(str(run.dir / "tokenizer"))
    data = run.dir / "data"
    for name, problems in (("teacher_train", work.teacher_set), ("gold", work.gold), ("held_out", work.held)):
        rows = [{"prompt": p.prompt, "completion": p.solution, "answer": p.answer} for p in problems]
        _write_jsonl(data / f"{name}.jsonl", rows)
    fresh = [{"id": str(i), "prompt": p.prompt, "answer": p.answer} for i, p in enumerate(work.fresh)]
    _write_jsonl(data / "fresh_prompts.jsonl", fresh)
    timings: dict[str, float] = {}
    chunk_rows = cfg.distill.loss_chunk_rows

    # Teacher.
    mark = time.monotonic()
    teacher = work.new_model("teacher")
    impl = stage_loss_impl(cfg, work, cfg.teacher.train, [teacher])
    teacher_task = work.task("teacher", cfg.teacher.train, cfg.seed, loss_impl=impl, chunk_rows=chunk_rows)
    objective = supervised_objective(cfg.teacher.train.steps, impl, chunk_rows)
    teacher_result = reasoning_stage(run, "teacher", teacher, objective, teacher_task, log_tensorboard)
    teacher.eval()
    timings["teacher"] = time.monotonic() - mark

    # Traces.
    mark = time.monotonic()
    traces = traces_stage(run, teacher)
    timings["traces"] = time.monotonic() - mark
    if traces["kept"] == 0:
        raise UserError("the teacher wrote no verified trace; train it longer (teacher.train.steps) or check the task")
    work.traces = read_records(data / "traces.jsonl").records

    # Students: same init, same steps, same batch size.
    students: dict[str, dict] = {}
    train = cfg.student.train
    for method in cfg.reasoning.methods:
        mark = time.monotonic()
        model = work.new_model("student")
        distilled = method not in ("sft", "seq_kd")
        impl = stage_loss_impl(cfg, work, train, [model, teacher] if distilled else [model])
        task = work.task(method, train, cfg.seed + 2, loss_impl=impl, chunk_rows=chunk_rows)
        extra: dict[str, Any] = {}
        if not distilled:
            objective = supervised_objective(train.steps, impl, chunk_rows)
        else:
            from distilflow.tasks.on_policy import on_policy_task

            divergence = "jsd" if method == "gkd" else cfg.distill.divergence
            objective = distill_objective(
                cfg.distill, train.steps, loss_impl=impl, per_token=True, divergence=divergence
            )
            if method == "gkd":
                task = on_policy_task(
                    task, model, cfg.on_policy, work.tokenizer, seed=cfg.seed + 3, total_steps=train.steps
                )
            extra["teacher"] = LiveTeacher(teacher, task, None)
        result = reasoning_stage(run, method, model, objective, task, log_tensorboard, **extra)
        students[method] = {**result, "data": METHODS[method]}
        timings[method] = time.monotonic() - mark
        print(f"[reasoning] {method}: exact match {students[method]['exact_match']:.3f}", file=sys.stderr)

    results: dict[str, Any] = {
        "name": cfg.name,
        "task": {
            "digits": cfg.reasoning.digits,
            "operands": cfg.reasoning.operands,
            "teacher_problems": len(work.teacher_set),
            "gold_problems": len(work.gold),
            "fresh_prompts": len(work.fresh),
            "eval_prompts": len(work.held),
        },
        "teacher": teacher_result,
        "traces": traces,
        "students": students,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds": round(time.monotonic() - began, 2),
    }
    write_json(run.dir / "results.json", results)
    from distilflow.report import write_reasoning_report

    write_reasoning_report(run.dir, cfg, results)
    print(reasoning_table(results))
    return results


def reasoning_table(results: dict) -> str:
    lines = [f"{'model':<14} {'exact match':>11} {'params':>9}  data"]
    teacher = results["teacher"]
    problems = results["task"]["teacher_problems"]
    lines.append(
        f"{'teacher':<14} {teacher['exact_match']:>11.3f} {teacher['params']:>9,}  {problems} worked solutions"
    )
    for method, r in results["students"].items():
        lines.append(f"{method:<14} {r['exact_match']:>11.3f} {r['params']:>9,}  {r['data']}")
    tr = results["traces"]
    lines.append(f"traces: kept {tr['kept']}, rejected {tr['rejected']} {tr['rejected_by_reason']}")
    return "\n".join(lines)
