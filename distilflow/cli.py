"""``distilflow <command> [CONFIG] [dotted.key=value ...]``.

Bad input of any kind (a UserError) prints one line ``distilflow: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distilflow.errors import UserError

COMMANDS = {
    "run": "train the teacher (or reuse it), a no-teacher baseline and the distilled student; "
    "evaluate all three; write results.json and report.md",
    "train-teacher": "train (or reuse) the teacher only",
    "distill": "distil the student from the trained teacher of this run (or teacher.model.checkpoint)",
    "eval": "evaluate the trained models of a run on its test split",
    "print-config": "print the resolved config with a description of every field",
    "resume": "continue the run in RUN_DIR with the config saved there",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError: one line on stderr and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message}; see '{self.prog} --help'")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distilflow",
        description="Knowledge distillation for PyTorch. With no CONFIG the built-in default "
        "(configs/mnist1d.yaml: a 1-D CNN teacher distilled into an MLP on MNIST-1D) is used.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "resume":
            p.add_argument("run_dir", help="a run folder written by 'distilflow run'")
        else:
            p.add_argument(
                "args",
                nargs="*",
                metavar="[CONFIG] [key=value ...]",
                help="an optional YAML config file, then dotted overrides such as student.train.steps=500",
            )
        if name == "eval":
            p.add_argument(
                "--model",
                default=None,
                help="teacher, baseline or student (default: all trained models of the run)",
            )
        if name in ("run", "train-teacher", "distill", "resume"):
            p.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
    return parser


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load(args: list[str]):
    from distilflow.config import load_config

    path, overrides = _split(args)
    return load_config(path, overrides)


def _cmd_print_config(ns) -> int:
    from distilflow.config import describe

    print(describe(_load(ns.args)))
    return 0


def _print_results(results: dict) -> None:
    print(f"{'model':<10} {'accuracy':>9} {'params':>10} {'MACs':>10}")
    for stage in ("teacher", "baseline", "student"):
        if stage in results:
            r = results[stage]
            print(f"{stage:<10} {r['accuracy']:>9.4f} {r.get('params', 0):>10,} {r.get('macs', 0):>10,}")


def _cmd_run(ns, cfg=None) -> int:
    from distilflow.pipeline import run_all

    cfg = cfg or _load(ns.args)
    results = run_all(cfg, log_tensorboard=not ns.no_tensorboard)
    _print_results(results)
    out = cfg.run_dir
    print(f"wall {results['wall_seconds']} s; results in {out / 'results.json'}, report {out / 'report.md'}")
    return 0


def _cmd_resume(ns) -> int:
    from distilflow.pipeline import config_of_run

    return _cmd_run(ns, config_of_run(ns.run_dir))


def _cmd_train_teacher(ns) -> int:
    from distilflow.pipeline import open_run, teacher_stage

    run = open_run(_load(ns.args))
    _, result = teacher_stage(run, log_tensorboard=not ns.no_tensorboard)
    print(f"teacher accuracy {result['accuracy']:.4f}; weights in {run.stage_dir('teacher')}")
    return 0


def _cmd_distill(ns) -> int:
    from distilflow.models.build import build_model, load_weights
    from distilflow.pipeline import distill_stage, open_run

    cfg = _load(ns.args)
    run = open_run(cfg)
    source = cfg.teacher.model.checkpoint or run.stage_dir("teacher")
    if not cfg.teacher.model.checkpoint and not (Path(source) / "model.safetensors").is_file():
        raise UserError(
            f"no trained teacher in '{source}'; run 'distilflow train-teacher' with this config first, "
            "or set teacher.model.checkpoint=PATH"
        )
    teacher = build_model(cfg.teacher.model, run.data.input_shape, run.data.num_classes, "teacher").to(run.device)
    load_weights(teacher, source, "teacher")
    _, result = distill_stage(run, teacher.eval(), log_tensorboard=not ns.no_tensorboard)
    print(f"student accuracy {result['accuracy']:.4f}; weights in {run.stage_dir('student')}")
    return 0


def _cmd_eval(ns) -> int:
    from distilflow.models.build import build_model, load_weights
    from distilflow.pipeline import model_facts, open_run
    from distilflow.tasks import ClassifierTask

    cfg = _load(ns.args)
    run = open_run(cfg)
    stages = [ns.model] if ns.model else ["teacher", "baseline", "student"]
    unknown = [s for s in stages if s not in ("teacher", "baseline", "student")]
    if unknown:
        raise UserError(f"--model {unknown[0]!r} is not allowed; use teacher, baseline or student")
    task = ClassifierTask(
        run.data.train_x[:1],
        run.data.train_y[:1],
        test_x=run.data.test_x,
        test_y=run.data.test_y,
        batch_size=1,
        grad_accum=1,
        seed=0,
        device=run.device,
    )
    results = {}
    for stage in stages:
        stage_cfg = cfg.teacher if stage == "teacher" else cfg.student
        source = (
            cfg.teacher.model.checkpoint
            if stage == "teacher" and cfg.teacher.model.checkpoint
            else run.stage_dir(stage)
        )
        if not Path(source).exists() or (Path(source).is_dir() and not (Path(source) / "model.safetensors").is_file()):
            if ns.model:
                raise UserError(f"no trained {stage} in '{source}'; train it first with 'distilflow run'")
            continue
        model = build_model(stage_cfg.model, run.data.input_shape, run.data.num_classes, stage).to(run.device)
        load_weights(model, source, stage)
        results[stage] = {**task.evaluate(model), **model_facts(run, model)}
    if not results:
        raise UserError(f"no trained models in '{run.dir}'; run 'distilflow run' with this config first")
    _print_results(results)
    print(json.dumps(results))
    return 0


HANDLERS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "train-teacher": _cmd_train_teacher,
    "distill": _cmd_distill,
    "eval": _cmd_eval,
    "print-config": _cmd_print_config,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option, so overrides after
    # --no-tensorboard come back as extras; they belong to the same list, in the same order.
    unknown = [a for a in extra if a.startswith("-") or not hasattr(ns, "args")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        ns.args = [*ns.args, *extra]
    if not hasattr(ns, "no_tensorboard"):
        ns.no_tensorboard = True
    return ns


def main(argv: list[str] | None = None) -> int:
    try:
        ns = _parse(argv)
        return HANDLERS[ns.command](ns)
    except UserError as exc:
        print(f"distilflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distilflow: interrupted; the last checkpoint is kept, 'distilflow resume' continues", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
