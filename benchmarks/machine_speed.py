"""Does this machine's speed hold still, and does size-student's speed probe see it when it does not?

    python benchmarks/machine_speed.py [--seconds 1500] [--hidden 32] [--layers 2] [--pause 5]

Builds one LM student of configs/lm_stdlib.yaml (``--layers`` x ``--hidden``, genai-int4, 1 thread) once,
then every ``--pause`` seconds: the speed probe (deploy/speed.py, median of 5), 100 timed generations
(size_student_lm.measure_generation: ms per generated token, p50 / p90), the probe again. One JSON line
per cycle; at the end the cycles split at the midpoint of the fastest and slowest tenth of the model's
p50, with the model's and the probe's medians in each part: how much slower the model ran in the slow
part, and how much slower the probe did.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distilflow.config import load_config, to_dict
from distilflow.deploy.speed import probe_ms
from distilflow.models.sizing_lm import lm_candidates
from distilflow.size_student_lm import LMSizing, lm_variant, measure_generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1500)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pause", type=float, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/lm_stdlib.yaml", ["threads=1", "deploy.enabled=false"])
    sizing = LMSizing(cfg, backend="genai-int4", batch=1, threads=1, repeats=100, widths=None, depths=None)
    shape = to_dict(cfg)["student"]["model"]["hf"]["config"]
    (c,) = lm_candidates(shape, sizing.hf_config, widths=[args.hidden], depths=[args.layers], seed=cfg.seed)
    cycles = []
    with tempfile.TemporaryDirectory() as tmp:
        v = lm_variant(c, "genai-int4", Path(tmp), sizing.work, cfg, 1)
        end = time.time() + args.seconds
        while time.time() < end:
            time.sleep(args.pause)
            before = statistics.median(probe_ms() for _ in range(5))
            (t,) = measure_generation([v], sizing.prompts, cfg.deploy.genai.new_tokens, repeats=100)
            after = statistics.median(probe_ms() for _ in range(5))
            cycle = {
                "t": time.strftime("%T"),
                "probe_before": before,
                "probe_after": after,
                "p50": float(np.percentile(t["token"], 50)),
                "p90": float(np.percentile(t["token"], 90)),
                "load": os.getloadavg()[0],
            }
            cycles.append(cycle)
            print(json.dumps(cycle), flush=True)
    p50 = np.array([x["p50"] for x in cycles])
    split = (np.percentile(p50, 10) + np.percentile(p50, 90)) / 2
    parts = {"fast": [x for x in cycles if x["p50"] < split], "slow": [x for x in cycles if x["p50"] >= split]}
    print(f"\n{c.name}: {len(cycles)} cycles, split at p50 {split:.4f} ms/token")
    medians = {}
    for name, part in parts.items():
        if part:
            medians[name] = (
                statistics.median(x["p50"] for x in part),
                statistics.median(x["probe_after"] for x in part),
            )
            print(
                f"{name}: {len(part)} cycles, model p50 {medians[name][0]:.4f} ms/token, "
                f"probe {medians[name][1]:.2f} ms"
            )
    if len(medians) == 2:
        model = medians["slow"][0] / medians["fast"][0]
        probe = medians["slow"][1] / medians["fast"][1]
        print(f"slow / fast: the model {model:.2f}x, the probe {probe:.2f}x")


if __name__ == "__main__":
    main()
