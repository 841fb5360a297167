"""PyTorch-native int8 backends side by side on a finished run's student: torchao vs torch.ao.

    python benchmarks/torch_int8.py RUN_DIR [--threads 1] [--iterations 20]

Prints a Markdown table (size, latency at the run's deploy batch sizes, quality) for torch fp32,
torchao int8 (dynamic activations, int8 weights) and torch.ao's deprecated quantize_dynamic.
"""

from __future__ import annotations

import argparse

import torch

from distilflow.deploy.bench import benchmark, markdown, torch_variant
from distilflow.deploy.quantize import torch_int8
from distilflow.pipeline import config_of_run, load_trained, open_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    run = open_run(config_of_run(args.run_dir))
    student = load_trained(run, "student").float().cpu()
    kind = run.work.kind
    torch.set_num_threads(args.threads)
    variants = [torch_variant("torch_fp32", student, kind)]
    for backend in ("torchao", "torch_ao"):
        model, used = torch_int8(student, backend=backend)
        variants.append(torch_variant(f"torch_int8_{used}", model, kind))
    sizes = run.cfg.deploy.batch_sizes
    table = benchmark(variants, run.work.test_arrays(), kind=kind, batch_sizes=sizes, iterations=args.iterations)
    print(markdown(table, kind=kind, batch_sizes=sizes, threads=args.threads))


if __name__ == "__main__":
    main()
