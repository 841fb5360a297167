"""``distilflow <command> [CONFIG] [dotted.key=value ...]``.

Bad input of any kind (a UserError) prints one line ``distilflow: error: ...`` and exits 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

from distilflow.cli_args import parse_args
from distilflow.errors import UserError


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load(args: list[str]):
    """The config of ``[CONFIG] [key=value ...]``; CONFIG may be a run folder (its saved config.yaml)."""
    import dataclasses

    from distilflow.config import load_config
    from distilflow.train import dist

    path, overrides = _split(args)
    with dist.input_checks():  # the same config on every rank: rank 0 alone says what is wrong with it
        if path is None or not Path(path).is_dir():
            return load_config(path, overrides)
        saved = Path(path) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"'{path}' is a folder without config.yaml; give a YAML config file or a run folder")
        # The folder is the run, wherever it was first written.
        return dataclasses.replace(load_config(saved, overrides), output_dir=str(path))


def _cmd_print_config(ns) -> int:
    from distilflow.config import describe

    print(describe(_load(ns.args)))
    return 0


def _print_results(results: dict) -> None:
    from distilflow.report import model_rows

    rows = model_rows(results)
    first = next(r for _, r in rows if "accuracy" in r or "perplexity" in r)
    metric = "perplexity" if "perplexity" in first else "accuracy"
    cost = "macs" if "macs" in first else "macs_per_token"
    bpc = "bits_per_char" in first  # across tokenizers: perplexities are per own token, bits per character compare
    width = max(10, *(len(label) for label, _ in rows))
    print(f"{'model':<{width}} {metric:>10}{' bits/char' if bpc else ''} {'params':>12} {cost:>14}")
    for label, r in rows:
        # A teacher known by its cache alone (one that recorded no score) has none.
        value = f"{r[metric]:>10.4f}" if metric in r else f"{'cache':>10}"
        per_char = f" {r.get('bits_per_char', math.nan):>9.4f}" if bpc else ""
        print(f"{label:<{width}} {value}{per_char} {r.get('params', 0):>12,} {r.get(cost, 0):>14,}")
    if "note" in results.get("teacher", {}):
        print(f"teacher: {results['teacher']['note']}")


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


def _cmd_diagnose(ns) -> int:
    from distilflow.diagnose import diagnose_run, diagnosis_lines

    print("\n".join(diagnosis_lines(diagnose_run(ns.run_dir).to_dict())).rstrip())
    return 0


def _cmd_size_student(ns) -> int:
    from distilflow.size_student import parse_widths, size_student, summary_line
    from distilflow.size_student_choice import MARGIN

    out = Path(ns.out)
    sizing = {"latency_ms": ns.latency_ms, "max_params": ns.max_params, "max_macs": ns.max_macs}
    sizing.update(batch=ns.batch, backend=ns.backend, threads=ns.threads, max_memory_mb=ns.max_memory_mb)
    sizing.update(widths=parse_widths(ns.widths), depths=parse_widths(ns.depths, "--depths"))
    sizing.update(repeats=ns.repeats, confirm=ns.confirm, slow_retries=ns.slow_retries)
    sizing.update(margin=MARGIN if ns.margin is None else ns.margin)
    result = size_student(_load(ns.args), **sizing, out=out)
    print(summary_line(result, out))
    return 0


def _metric_line(role: str, result: dict) -> str:
    metric = "perplexity" if "perplexity" in result else "accuracy"
    return f"{role} {metric} {result[metric]:.4f}"


def _cmd_train_teacher(ns) -> int:
    from distilflow.pipeline import open_run
    from distilflow.teacher_stages import teacher_stage
    from distilflow.teacher_views import teacher_views

    run = open_run(_load(ns.args))
    for view in teacher_views(run):  # teacher:, or each named teacher of teachers: (not one known by its cache)
        if view.cache_only:
            continue
        _, result = teacher_stage(view.run, log_tensorboard=not ns.no_tensorboard)
        label = f"teacher '{view.name}'" if view.named else "teacher"
        print(f"{_metric_line(label, result)}; weights in {view.run.stage_dir('teacher')}")
    return 0


def _cmd_distill(ns) -> int:
    from distilflow.pipeline import distill_stage, open_run, refuse_reasoning_demo
    from distilflow.teacher_stages import check_distill_teachers, distill_teachers

    cfg = _load(ns.args)
    refuse_reasoning_demo(cfg)
    # A complete teacher cache or a server stands in for its teacher (teacher_views.stand_in: it is then not
    # loaded at all). Checked before open_run, which saves the config: a refused command writes nothing.
    check_distill_teachers(cfg)
    run = open_run(cfg)
    teacher, teacher_result = distill_teachers(run)
    _, result = distill_stage(run, teacher, log_tensorboard=not ns.no_tensorboard, teacher_result=teacher_result)
    print(f"{_metric_line('student', result)}; weights in {run.stage_dir('student')}")
    return 0


def _cmd_eval(ns) -> int:
    from distilflow.pipeline import load_trained, open_run
    from distilflow.stages import has_weights, stage_loss_impl
    from distilflow.teacher_side import served_teacher_result, teacher_outline
    from distilflow.teacher_views import stand_in, student_vocab, teacher_views

    cfg = _load(ns.args)
    stages = [ns.model] if ns.model else ["teacher", "baseline", "student"]
    unknown = [stage for stage in stages if stage not in ("teacher", "baseline", "student")]
    if unknown:
        raise UserError(f"--model {unknown[0]!r} is not allowed; use teacher, baseline or student")
    run = open_run(cfg)
    views = teacher_views(run)
    kinds = [stand_in(view.cfg, "eval", own_cache=view.own_cache) for view in views]  # "cache", "server", None
    # Students are scored as in training: over the vocabulary they share with the teachers (whose
    # sizes, not weights, decide it; a served teacher's from its config.json).
    references = [
        view.run.work.new_model("teacher") if kind is None else teacher_outline(view.run) if kind == "server" else None
        for view, kind in zip(views, kinds)
    ]
    results: dict = {}
    for stage in stages:
        # The teacher: each named one with teachers: (one known by its cache alone has no model to score).
        teachers = [(view, kind, view.run) for view, kind in zip(views, kinds) if kind != "cache"]
        for view, kind, stage_run in teachers if stage == "teacher" else [(None, None, run)]:
            if kind == "server":  # scored by the server, as in training (one teacher only)
                results[stage] = served_teacher_result(stage_run)
                continue
            given = view is not None and view.given
            if not given and not has_weights(stage_run.stage_dir(stage)):
                if ns.model:
                    raise UserError(
                        f"no trained {stage} in '{stage_run.stage_dir(stage)}'; train it first with 'distilflow run'"
                    )
                continue
            model = load_trained(stage_run, stage)
            vocab = student_vocab(run, model, references) if stage != "teacher" else None
            train = stage_run.cfg.teacher.train if stage == "teacher" else cfg.student.train
            impl = stage_loss_impl(cfg, run.work, train, [model], vocab)  # evaluated as it was trained
            task = run.work.task(stage, train, cfg.seed, vocab, loss_impl=impl, chunk_rows=cfg.distill.loss_chunk_rows)
            scored = {**task.evaluate(model), **run.work.facts(model)}
            if view is not None and view.named:
                results.setdefault("teachers", {})[view.name] = scored
            else:
                results[stage] = scored
    if not results:
        raise UserError(f"no trained models in '{run.dir}'; run 'distilflow run' with this config first")
    _print_results(results)
    print(json.dumps(results))
    return 0


def _trained_student(ns):
    from distilflow.pipeline import load_trained, open_run

    run = open_run(_load(ns.args))
    return run, load_trained(run, "student")


def _cmd_export(ns) -> int:
    from distilflow.deploy.stage import export_student

    run, student = _trained_student(ns)
    path, parity = export_student(run.work, student, run.cfg.deploy, run.dir / "deploy")
    print(f"exported {path}; ONNX Runtime vs eager on test inputs: {parity}")
    return 0


def _cmd_quantize(ns) -> int:
    from distilflow.deploy.quantize import quantized_summary
    from distilflow.deploy.stage import export_student, quantize_student

    run, student = _trained_student(ns)
    out = run.dir / "deploy"
    path, parity = export_student(run.work, student, run.cfg.deploy, out)
    print(f"exported {path} ({parity})")
    for name, qpath in quantize_student(run.work, path, run.cfg.deploy, out).items():
        print(f"{name}: {qpath} ({qpath.stat().st_size:,} bytes; nodes {quantized_summary(qpath)})")
    return 0


def _cmd_bench(ns) -> int:
    from distilflow.deploy.stage import deploy

    run, student = _trained_student(ns)
    info = deploy(run.work, student, run.cfg.deploy, run.dir / "deploy")
    print(info["table_markdown"])
    for note in info["notes"]:
        print(note)
    print(f"JSON in {run.dir / 'deploy' / 'bench.json'}")
    return 0


def _cmd_cache_teacher(ns) -> int:
    from distilflow.data.cache import cache_dir, cache_summary
    from distilflow.pipeline import open_run
    from distilflow.teacher_stages import cache_teachers

    run = open_run(_load(ns.args), writes_cache=True)
    began = time.monotonic()
    for view, manifest in cache_teachers(run):
        print(f"{cache_summary(manifest, cache_dir(view.cfg))}; {time.monotonic() - began:.1f} s")
    return 0


def _cmd_predict(ns) -> int:
    from distilflow.deploy.predict import predict

    if ns.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {ns.max_new_tokens} is not allowed; use 1 or more")
    if Path(ns.model).is_dir():
        from distilflow.deploy.lm_predict import predict_lm
        from distilflow.generate.sampling import sampling_from_flags

        flags = dict(sample=ns.sample, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed)
        sampling = sampling_from_flags(ns.max_new_tokens, **flags, stop=ns.stop)
        return predict_lm(ns.model, ns.input, sampling, each_line=ns.each_line, chat=not ns.raw, threads=ns.threads)
    print(predict(ns.model, ns.input, tokenizer_path=ns.tokenizer, max_new_tokens=ns.max_new_tokens))
    return 0


def _cmd_generate(ns) -> int:
    from distilflow.generate.sharded import run_generate_sharded

    summary = run_generate_sharded(_load(ns.args))  # the plain generator in one process; split under torchrun
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items())) or "none"
    print(
        f"kept {summary['kept']}, rejected {summary['rejected']} ({reasons}), duplicates {summary['duplicates']}; "
        f"{summary['generated_prompts']} prompts generated, {summary['already_done']} already done; "
        f"{summary['tokens_per_s']} tokens/s; {summary['samples_in_file']} samples in {summary['output']}"
    )
    return 0


HANDLERS = {
    "run": _cmd_run,
    "resume": _cmd_resume,
    "diagnose": _cmd_diagnose,
    "size-student": _cmd_size_student,
    "train-teacher": _cmd_train_teacher,
    "distill": _cmd_distill,
    "cache-teacher": _cmd_cache_teacher,
    "eval": _cmd_eval,
    "print-config": _cmd_print_config,
    "export": _cmd_export,
    "quantize": _cmd_quantize,
    "bench": _cmd_bench,
    "predict": _cmd_predict,
    "generate": _cmd_generate,
}


# Libraries whose log notes are not about the user's work: transformers imports torchao when it is
# installed (notes about CUDA-only kernels, and the torch pytree deprecations those trigger), the ONNX
# exporters narrate their passes.
_NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "torch.onnx",
    "torch.export",
    "onnxscript",
    "onnx_ir",
    "transformers",
)


def _quiet_libraries() -> None:
    """Keep other libraries' warnings and notes off the user's terminal (``--verbose`` shows them).

    Our own notices (``warnings.warn`` in distilflow, e.g. a vocabulary cut) are kept.
    """
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"distilflow(\.|$)")


def _error_of(exc: Exception, world) -> UserError | None:
    """``exc`` as the one line to print: a UserError, a collective that failed, a failure of the disk in a
    writer we do not wrap; None for anything else (a bug: its traceback is shown)."""
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, RuntimeError) and world.comm_failure(exc) is not None:
        return world.comm_failure(exc)
    from distilflow.storage import disk_errno, write_failure

    code = disk_errno(exc)
    if code is None:
        return None
    return write_failure(getattr(exc, "filename", None) or "a file of this command", code)


def _quiet_writer_threads() -> None:
    """A writer thread (TensorBoard's) that hits a full disk: its traceback is not shown; the main thread
    meets the same error at its next write and says it in one line."""
    import threading

    from distilflow.storage import disk_errno

    default = threading.excepthook

    def hook(args) -> None:
        if args.exc_value is None or disk_errno(args.exc_value) is None:
            default(args)

    threading.excepthook = hook


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--verbose" not in args:
        _quiet_libraries()
    _quiet_writer_threads()
    from distilflow.train import dist

    launched = dist.World()  # this process's place under torchrun, known before the group is joined
    try:
        with dist.input_checks():
            launched = dist.env_world()
        if not launched.is_main:  # under torchrun rank 0 prints the results (and errors of the inputs)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        with dist.input_checks():
            ns = parse_args(argv)
        return HANDLERS[ns.command](ns)
    except Exception as exc:
        world = dist.current() if dist.current().distributed else launched
        error = _error_of(exc, world)
        if error is None:
            raise
        # Errors every rank meets alike (a refused config) are printed once, by rank 0; a rank's own
        # (a failed write, a dead peer) by that rank, saying which it is.
        if world.is_main or not error.rank_0_reports:
            where = f" (rank {world.rank} of {world.size})" if world.distributed and not error.rank_0_reports else ""
            print(f"distilflow: error{where}: {error}", file=sys.stderr)
        if isinstance(error, dist.DistError):  # a broken process group cannot be torn down cleanly
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("distilflow: interrupted; the last checkpoint is kept, 'distilflow resume' continues", file=sys.stderr)
        if dist.current().distributed:
            # Every rank is interrupted at once (Ctrl-C under torchrun): tearing the process group down
            # races the peers' exit, and gloo aborts the process (SIGABRT) when a peer has gone first.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    finally:
        dist.shutdown()  # leave the torchrun process group, if one was joined


if __name__ == "__main__":
    raise SystemExit(main())
