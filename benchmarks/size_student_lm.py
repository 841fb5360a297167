"""Issue 18 on the LM demo: the shape size-student chooses per budget, whether it keeps meeting the
budget, and the perplexity the budget buys.

    python benchmarks/size_student_lm.py sweep [--backend genai-int4] [--batch 1] [--out DIR]
    python benchmarks/size_student_lm.py choose --budgets 0.08,0.12,0.2 [--margin 0.2] [--sweep DIR] [--out DIR]
    python benchmarks/size_student_lm.py train --budget 0.08 [--teacher PATH] [--steps 400] [--out DIR]
    python benchmarks/size_student_lm.py table [--steps 400] [--out DIR]

One phase per command, so that a shared machine's slots interleave:

1. ``sweep``: ``size_student`` on configs/lm_stdlib.yaml with every candidate of the built-in grid
   (``--repeats`` interleaved rounds, 30 by default; latency = ms per generated token, see
   distilflow/size_student_lm.py), the rows kept in ``DIR/sweep/sizing.json``;
2. ``choose``: for each budget, size-student's choice from those rows (the most MACs per token whose
   p90 meets it less ``--margin``, size-student's 20 % by default; then confirmed alone ``--confirm`` times:
   ``confirm_choice``), its student.yaml written to
   ``DIR/sizing-<budget>/``, then the chosen shape built again from scratch (GenAI build) and re-measured
   10 more times (each as many generations as the sweep's repeats, after a warm-up, independent of the
   confirmation, the speed probe beside it): how many of the 10 p90s (and p50s) meet the budget itself
   (not the budget less the margin), as
   first taken and with a miss in a slow window taken again (``remeasure``);
3. ``train``: ``distilflow run`` on that student.yaml, the demo teacher reused (``--teacher``): baseline
   and distilled perplexity of the chosen shape (``--steps``: 400 by default, half the demo's 800, for
   time; another count is written beside it as ``train-<budget>-<steps>.json``);
4. ``table``: the markdown table of budget -> shape -> perplexity.

``--sweep DIR`` (default ``DIR/sweep`` of ``--out``) lets several ``choose`` runs (other margins, each with its
own ``--out``) share one sweep.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from size_student import remeasure, remeasured_row  # benchmarks/size_student.py (this script's folder)

from distilflow.config import load_config
from distilflow.size_student import size_student, sized_config
from distilflow.size_student_choice import MARGIN, choose, confirm_choice
from distilflow.size_student_report import write_outputs

REMEASURES = 10
CONFIG = "configs/lm_stdlib.yaml"


def _config(args, extra: list[str] | None = None):
    base = ["threads=1", "deploy.enabled=false", f"data.cache_dir={args.cache}", *(extra or [])]
    return load_config(CONFIG, base)


def sweep(args) -> None:
    cfg = _config(args)
    # Budgets every candidate meets: the sweep only measures (latency, and peak RSS in a child per candidate).
    limits = {"latency_ms": 1e6, "max_memory_mb": 1e6, "batch": args.batch, "backend": args.backend}
    size_student(cfg, **limits, out=args.out / "sweep", confirm=0, repeats=args.repeats)
    result = json.loads((args.out / "sweep" / "sizing.json").read_text())
    for r in result["candidates"]:
        print(
            f"{r['name']:28s} {r['macs']:>10,} MACs/token  p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f} ms/token  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )


def choose_phase(args) -> None:
    from distilflow.size_student_lm import LMSizing

    torch.set_num_threads(1)
    result = json.loads(((args.sweep or args.out / "sweep") / "sizing.json").read_text())
    cfg = _config(args)
    b = result["budget"]
    repeats = result["repeats"]  # the sweep's: confirmations and re-measurements time as many generations
    sizing = LMSizing(cfg, backend=b["backend"], batch=b["batch"], threads=1, repeats=repeats, widths=None, depths=None)
    rows = []
    for budget in [float(x) for x in args.budgets.split(",")]:
        limits = {**b, "latency_ms": budget, "max_memory_mb": None, "margin": args.margin}
        swept = choose(result["candidates"], limits)
        reference = result.get("speed_probe", {}).get("sweep_p50_ms")
        chosen, tried = confirm_choice(result["candidates"], limits, sizing.retime, args.confirm, reference)
        write_outputs(
            args.out / f"sizing-{budget:g}",
            sized_config(cfg, chosen["model"]),
            chosen,
            {**result, "budget": limits, "chosen": chosen["name"], "confirmed": tried},
        )
        again = remeasure(sizing, chosen, budget, reference)  # each a fresh build, timed alone
        row = remeasured_row(budget, chosen, again)
        row.update(sweep_choice=swept["name"], confirmed=tried, sweep_load=result["load_average"])
        row.update(backend=b["backend"], batch=b["batch"], peak_rss_mb=chosen.get("peak_rss_mb"))
        row.update(size_bytes=chosen["size_bytes"], margin=args.margin)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "choose.json").write_text(json.dumps(rows, indent=2))


def _tag(budget: float, steps: int) -> str:
    """The name of a trained run: the budget, and the steps unless the default 400."""
    return f"{budget:g}" if steps == 400 else f"{budget:g}-{steps}"


def train(args) -> None:
    from distilflow.pipeline import run_all

    budget = float(args.budget)
    tag = _tag(budget, args.steps)
    extra = [f"output_dir={args.out / f'run-{tag}'}", f"student.train.steps={args.steps}"]
    extra.append(f"teacher.model.checkpoint={args.teacher}")
    cfg = load_config(args.out / f"sizing-{budget:g}" / "student.yaml", extra)
    results = run_all(cfg, log_tensorboard=False)
    row = {
        "budget": budget,
        "teacher": results["teacher"]["perplexity"],
        "baseline": results["baseline"]["perplexity"],
        "student": results["student"]["perplexity"],
        "student_params": results["student"]["params"],
        "student_macs_per_token": results["student"]["macs_per_token"],
        "steps": args.steps,
        "load": os.getloadavg()[0],
    }
    (args.out / f"train-{tag}.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row))


def table(args) -> None:
    rows = json.loads((args.out / "choose.json").read_text())
    r0 = rows[0]
    margin = f", chosen with a {r0['margin'] * 100:g} % margin" if r0.get("margin") else ", no margin"
    print(
        f"\n{r0['backend']}, batch {r0['batch']}, 1 thread, ms per generated token{margin}; {REMEASURES} "
        "re-measurements against the budget itself"
    )
    print(
        "| budget ms/token | chosen shape | params | MACs/token | p90 when chosen | re-measured p90 <= budget | "
        "as first taken | p50 <= budget | p90 range | size MB | peak RSS MB | baseline ppl | distilled ppl | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        path = args.out / f"train-{_tag(r['budget'], args.steps)}.json"  # the runs of table's --steps
        t = json.loads(path.read_text()) if path.is_file() else None
        ppl = f"{t['baseline']:.2f} | {t['student']:.2f}" if t else "- | -"
        print(
            f"| {r['budget']:g} | {r['shape']} | {r['params']:,} | {r['macs']:,} | {r['p90']:.3f} | "
            f"{r['meet_p90']}/{REMEASURES} | {r['meet_p90_first']}/{REMEASURES} | {r['meet_p50']}/{REMEASURES} | "
            f"{r['p90_range'][0]:.3f}-"
            f"{r['p90_range'][1]:.3f} | {r['size_bytes'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} | {ppl} | "
            f"{r['load']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=["sweep", "choose", "train", "table"])
    parser.add_argument("--budgets", default="0.08,0.12,0.2")
    parser.add_argument("--budget", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default="genai-int4")
    parser.add_argument("--teacher", default="/tmp/new-lm/teacher/model.safetensors")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30, help="sweep: size-student's --repeats")
    parser.add_argument("--confirm", type=int, default=3, help="size-student's --confirm for the choice")
    parser.add_argument("--margin", type=float, default=MARGIN, help="size-student's --margin for the choice")
    parser.add_argument("--sweep", type=Path, default=None, help="choose: the sweep's folder (default OUT/sweep)")
    parser.add_argument("--cache", default="~/.cache/distilflow")
    parser.add_argument("--out", type=Path, default=Path("runs/size-student-lm"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"sweep": sweep, "choose": choose_phase, "train": train, "table": table}[args.phase](args)


if __name__ == "__main__":
    main()
