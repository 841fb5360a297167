"""MNIST-1D students of one teacher, of two teachers combined, with the input-adaptive KD weight, and
label-free, over several seeds, at equal student steps (the built-in default config otherwise).

    python benchmarks/multi_teacher_mnist1d.py [--seeds 0 1 2] [--out DIR] [--teacher-steps N] [--only NAME ...]
        [key=value ...]

Per seed: two 1-D CNN teachers of the default architecture, from seeds ``seed`` and ``seed + 1000``
(``train-teacher`` of a two-teacher config), then each variant's student by ``distilflow distill``
with both teachers given as checkpoints (the same teachers for every variant of a seed):

- ``cnn``, ``cnn2``: one teacher (``teacher:``), the default progressive plan (the labelled default run);
- ``mean``, ``entropy``, ``correctness``: both teachers (``teachers:``), ``distill.combine.rule``;
- ``adaptive_kd``: teacher ``cnn`` with ``distill.adaptive`` (entropy, prefer confident, tau 1);
- ``label_free``: teacher ``cnn``, ``distill.label_free`` (phases feature 0.2 -> kd 0.8, no ``ce``).

Prints each student's held-out accuracy per seed, then mean +- std per variant (markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

from distilflow.cli import main as cli

FEATURE_PLAN = (
    "distill.phases=[{name: feature_alignment, fraction: 0.2, terms: [feature]}, "
    "{name: soft, fraction: 0.8, terms: [kd]}]"
)
TEACHERS = (
    "teachers=[{{name: cnn, model: {{arch: cnn1d}}, seed: {a}, train: {{steps: {steps}}}}}, "
    "{{name: cnn2, model: {{arch: cnn1d}}, seed: {b}, train: {{steps: {steps}}}}}]"
)
VARIANTS = {
    "cnn": ["one:cnn"],
    "cnn2": ["one:cnn2"],
    "mean": ["distill.combine.rule=mean"],
    "entropy": ["distill.combine.rule=entropy"],
    "correctness": ["distill.combine.rule=correctness"],
    "adaptive_kd": ["one:cnn", "distill.adaptive={source: entropy, prefer: confident, tau: 1.0}"],
    "label_free": ["one:cnn", "distill.label_free=true", FEATURE_PLAN],
}


def variant_args(name: str, folder: Path, teachers: Path, seed: int, steps: int, overrides: list[str]) -> list[str]:
    """The ``distill`` arguments of one variant: one teacher (``one:<name>``) or both, given."""
    spec = VARIANTS[name]
    base = [f"output_dir={folder}", f"seed={seed}", "deploy.enabled=false", *overrides]
    one = [s.split(":", 1)[1] for s in spec if s.startswith("one:")]
    rest = [s for s in spec if not s.startswith("one:")]
    if one:
        arch = "teacher.model.arch=cnn1d"
        return [*base, arch, f"teacher.model.checkpoint={teachers / one[0] / 'teacher'}", *rest, "--no-tensorboard"]
    given = [f"teachers.{n}.model.checkpoint={teachers / n / 'teacher'}" for n in ("cnn", "cnn2")]
    both = TEACHERS.format(a=seed, b=seed + 1000, steps=steps)
    return [*base, both, "distill.feature_teacher=cnn", *given, *rest, "--no-tensorboard"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench-multi-teacher")
    parser.add_argument("--teacher-steps", type=int, default=2000, help="each teacher's training steps")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    table: dict[str, list[float]] = {name: [] for name in args.only}
    teacher_acc: dict[str, list[float]] = {"cnn": [], "cnn2": []}
    began = time.monotonic()
    for seed in args.seeds:
        root = Path(args.out) / f"seed{seed}"
        pair = root / "teachers"
        both = TEACHERS.format(a=seed, b=seed + 1000, steps=args.teacher_steps)
        common = [f"seed={seed}", "deploy.enabled=false", *args.overrides, "distill.feature_teacher=cnn"]
        assert cli(["train-teacher", f"output_dir={pair}", both, *common, "--no-tensorboard"]) == 0
        for name in teacher_acc:
            result = json.loads((pair / "teachers" / name / "teacher" / "result.json").read_text())
            teacher_acc[name].append(result["accuracy"])
        for name in args.only:
            folder = root / name
            assert (
                cli(
                    [
                        "distill",
                        *variant_args(name, folder, pair / "teachers", seed, args.teacher_steps, args.overrides),
                    ]
                )
                == 0
            )
            accuracy = json.loads((folder / "student" / "result.json").read_text())["accuracy"]
            table[name].append(accuracy)
            print(f"seed {seed} {name}: {100 * accuracy:.2f} % ({time.monotonic() - began:.0f} s)", flush=True)

    def cell(values: list[float]) -> str:
        spread = sample_std(values)
        return f"{100 * statistics.mean(values):.2f} +- {100 * spread:.2f}"

    print(f"\n| variant | student test accuracy % (mean +- std, seeds {' '.join(map(str, args.seeds))}) | per seed |")
    print("|---|---|---|")
    for name, values in {**{f"teacher {k}": v for k, v in teacher_acc.items()}, **table}.items():
        print(f"| {name} | {cell(values)} | {' / '.join(f'{100 * v:.1f}' for v in values)} |")
    print(f"\ntotal {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
