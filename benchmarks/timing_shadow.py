"""What ran just before a timed call changes its time: size-student's classifier timings (issue 18).

    python benchmarks/timing_shadow.py [--shapes 96 256,256] [--rounds 6] [--repeats 30]

For each MLP shape of the MNIST-1D demo (ort-int8, batch 256, 1 thread), ``--rounds`` timings of
``--repeats`` calls each, the three kinds interleaved timing by timing:

- ``after probe``: each timed call right after deploy/speed.py's probe (how size-student timed a candidate
  alone before session 9: one probe per round);
- ``after largest``: each timed call right after one call of the grid's largest candidate, [2048, 2048]
  (how the interleaved sweep timed its first candidate of each round);
- ``warm``: each timed call right after an untimed call of the same model (size_student.measure now, and
  how a deployed model is called: again and again).

Prints the median p50 / p90 of each kind and its ratio to ``warm``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distilflow.config import load_config
from distilflow.deploy.speed import probe_ms
from distilflow.models.sizing import candidates
from distilflow.size_student import ClassifierSizing, variant


def _one(data, hidden: list[int], folder: Path):
    model = {"arch": "mlp", "mlp": {"hidden": hidden, "dropout": 0.0}}
    (c,) = [
        c
        for c in candidates(model, data.input_shape, data.num_classes, widths=[hidden[0]])
        if c.model["mlp"]["hidden"] == hidden
    ]
    return variant(c, "ort-int8", folder, data.test_x[:2], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["96", "256,256"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizing = ClassifierSizing(
        load_config(None, ["threads=1"]), backend="ort-int8", batch=256, threads=1, repeats=args.repeats, widths=None
    )
    feeds = sizing.feeds
    with tempfile.TemporaryDirectory() as tmp:
        largest = _one(sizing.data, [2048, 2048], Path(tmp))
        befores = {"after probe": probe_ms, "after largest": lambda: largest.logits(feeds)}
        for text in args.shapes:
            v = _one(sizing.data, [int(w) for w in text.split(",")], Path(tmp))
            befores["warm"] = lambda v=v: v.logits(feeds)
            for _ in range(3):
                v.logits(feeds)
            stats: dict[str, list[tuple[float, float]]] = {kind: [] for kind in befores}
            for _ in range(args.rounds):
                for kind, before in befores.items():
                    times = []
                    for _ in range(args.repeats):
                        before()
                        began = time.perf_counter()
                        v.logits(feeds)
                        times.append((time.perf_counter() - began) * 1000)
                    stats[kind].append((np.percentile(times, 50), np.percentile(times, 90)))
            warm = np.median(stats["warm"], axis=0)
            for kind, pairs in stats.items():
                p50, p90 = np.median(pairs, axis=0)
                print(
                    f"mlp [{text}] {kind:14s} p50 {p50:.3f} ms ({p50 / warm[0]:.2f}x warm)  "
                    f"p90 {p90:.3f} ms ({p90 / warm[1]:.2f}x warm)"
                )


if __name__ == "__main__":
    main()
