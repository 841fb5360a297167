"""The command line of ``distilflow``: its commands, their flags and positional arguments (argparse).

A usage error is a UserError (one line ``distilflow: error: ...``, exit 2; distilflow/cli.py prints it).
"""

from __future__ import annotations

import argparse

from distilflow.errors import UserError

COMMANDS = {
    "run": "train the teacher (or reuse it), a no-teacher baseline and the distilled student; "
    "evaluate all three; write results.json and report.md",
    "train-teacher": "train (or reuse) the teacher only",
    "distill": "distil the student from the trained teacher of this run (or teacher.model.checkpoint)",
    "cache-teacher": "run the teacher once over the training rows and save its outputs (cache.*) for distill",
    "eval": "evaluate the trained models of a run on its test split",
    "export": "export the run's trained student to ONNX and check it against the eager model",
    "quantize": "export, then int8-quantize the student with ONNX Runtime (deploy.methods)",
    "bench": "export, quantize and benchmark every variant side by side (size, latency, quality)",
    "predict": "run an exported ONNX model (fp32 or int8) on an input file with ONNX Runtime alone",
    "print-config": "print the resolved config with a description of every field",
    "generate": "sample completions from the teacher for a prompt set, filter and verify them, and append "
    "the kept ones to a resumable JSONL file (generate.*)",
    "resume": "continue the run in RUN_DIR with the config saved there",
    "diagnose": "print the Diagnosis of the run in RUN_DIR (finished or interrupted) from its metrics alone",
    "size-student": "measure candidate student shapes with the backend you ship and write the largest that meets "
    "a latency budget as a config (no training)",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError: one line on stderr and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    """``distilflow``'s parser: one sub-command per entry of :data:`COMMANDS`, with its own flags."""
    parser = _Parser(
        prog="distilflow",
        description="Knowledge distillation for PyTorch. With no CONFIG the built-in default "
        "(configs/mnist1d.yaml: a 1-D CNN teacher distilled into an MLP on MNIST-1D) is used.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and log notes")
        if name == "predict":
            p.add_argument(
                "model",
                help="an .onnx file written by 'distilflow export' or 'quantize'; for streaming generation a "
                "language-model folder: ONNX Runtime GenAI (deploy/genai-<precision>) or Hugging Face (student/hf)",
            )
            p.add_argument("input", help="classifier: .npz (x) or .csv; language model: a text file, or the text")
            p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's folder)")
            p.add_argument("--max-new-tokens", type=int, default=48, help="language models: tokens to generate")
            lm = p.add_argument_group("language-model folders (streaming generation)")
            lm.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
            lm.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (> 0)")
            lm.add_argument("--top-k", type=int, default=50, help="--sample: keep the k likeliest tokens (0 = all)")
            lm.add_argument("--top-p", type=float, default=1.0, help="--sample: nucleus probability in (0, 1]")
            lm.add_argument("--seed", type=int, default=0, help="--sample: random seed")
            lm.add_argument("--stop", action="append", default=[], help="repeatable: output ends before it")
            lm.add_argument("--each-line", action="store_true", help="a text file holds one prompt per line")
            lm.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
            lm.add_argument("--threads", type=int, default=0, help="CPU threads (0 = the runtime's default)")
            continue
        if name in ("resume", "diagnose"):
            p.add_argument("run_dir", help="a run folder written by 'distilflow run'")
        else:
            p.add_argument(
                "args",
                nargs="*",
                metavar="[CONFIG] [key=value ...]",
                help="an optional YAML config file (or a run folder: its saved config), then dotted overrides "
                "such as student.train.steps=500",
            )
        if name == "eval":
            p.add_argument(
                "--model",
                default=None,
                help="teacher, baseline or student (default: all trained models of the run)",
            )
        if name in ("run", "train-teacher", "distill", "resume"):
            p.add_argument("--no-tensorboard", action="store_true", help="write metrics.jsonl only")
        if name == "size-student":
            p.add_argument("--latency-ms", type=float, default=None, help="p90 budget, ms per call (LM: per token)")
            p.add_argument("--max-memory-mb", type=float, default=None, help="peak RSS budget of the inference process")
            p.add_argument("--max-params", type=int, default=None, help="parameter budget (alone or with the others)")
            p.add_argument("--max-macs", type=int, default=None, help="MACs-per-sample budget")
            p.add_argument("--batch", type=int, default=1, help="rows per call (default 1)")
            p.add_argument("--backend", default="ort-int8", help="ort-int8 (default), ort-fp32, torch or genai-int4")
            p.add_argument("--threads", type=int, default=1, help="CPU threads of every candidate (default 1)")
            p.add_argument("--repeats", type=int, default=30, help="interleaved timed calls per candidate")
            p.add_argument(
                "--confirm",
                type=int,
                default=3,
                help="re-time the latency choice alone this many times, each a fresh build; a miss moves to the "
                "next smaller candidate (default 3, 0 = off)",
            )
            p.add_argument(
                "--slow-retries",
                type=int,
                default=3,
                help="a re-timing that misses while the machine's speed probe runs 1.3x slower than in the sweep "
                "is taken again after 30 s, this many times in a row at most (default 3)",
            )
            p.add_argument(
                "--margin",
                type=float,
                default=None,
                help="share of --latency-ms kept free: choose and confirm on p90 <= budget x (1 - margin), for the "
                "spread between timings minutes apart (default 0.2; 0 = the budget itself)",
            )
            p.add_argument("--widths", default=None, help="comma-separated mlp widths, cnn channels or LM hidden")
            p.add_argument("--depths", default=None, help="comma-separated decoder depths (LM students)")
            p.add_argument("--out", default="sizing", help="folder for student.yaml, report.md, latency.png")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command and its arguments of ``argv`` (default ``sys.argv[1:]``); a usage error is a UserError."""
    parser = build_parser()
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
