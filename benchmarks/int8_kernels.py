"""int8 logit error and accuracy per ONNX Runtime kernel path: format x reduce_range x per-channel.

    python benchmarks/int8_kernels.py --out /tmp/int8k [--run-dir RUN] [--cpus native Haswell-v4 SandyBridge]

Builds every variant once, natively (the fitted MLP of tests/deploy and, with --run-dir, the student
of a finished MNIST-1D run), then measures the same files on each CPU: 'native' is this machine,
any other name is a qemu-x86_64 CPU model (TCG user-mode emulation: ONNX Runtime picks its kernels
from the emulated CPUID, e.g. Haswell-v4 = AVX2 without VNNI, SandyBridge = AVX without AVX2).
Prints one Markdown table per CPU: error of the logits against the eager fp32 model (max and mean,
relative to the largest |logit|), accuracy, agreement with the fp32 argmax, and natively the
latency of a 64-row call. Batches of 64 rows, as the deploy table's quality column. "noise z":
the int8 logits' distance from their noise-free value in units of the rounding-noise std that the
scales imply (the model of the tests, tests/deploy/int8_reference.py; about 1 rms and below 6 at
most when the kernel computes exact integer sums), for the formats distilflow ships.

Formats are named activations x weights: U8S8 = uint8 activations, int8 weights (dynamic default);
S8S8 = symmetric int8 activations (static default; ONNX Runtime shifts them to uint8 on x86, so the
GEMM is U8S8 there too); U8U8 = uint8 weights. ``+x64qp`` = the session option
``session.x64quantprecision=1``, with which ONNX Runtime rewrites int8 weights to uint8 at load time
on CPUs whose U8S8 kernel can saturate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
X64_PRECISION = "session.x64quantprecision"

# (id, method, activation_type, weight_type, reduce_range, per_channel, x64 precision session option)
VARIANTS = [
    ("dynamic U8S8", "dynamic", "uint8", "int8", False, False, False),
    ("dynamic U8S8 per-channel", "dynamic", "uint8", "int8", False, True, False),
    ("dynamic U8S8 reduce_range", "dynamic", "uint8", "int8", True, False, False),
    ("dynamic U8S8 reduce_range per-channel", "dynamic", "uint8", "int8", True, True, False),
    ("dynamic U8U8", "dynamic", "uint8", "uint8", False, False, False),
    ("dynamic U8U8 per-channel", "dynamic", "uint8", "uint8", False, True, False),
    ("dynamic U8S8 +x64qp", "dynamic", "uint8", "int8", False, False, True),
    ("static S8S8", "static", "int8", "int8", False, False, False),
    ("static S8S8 per-channel", "static", "int8", "int8", False, True, False),
    ("static S8S8 reduce_range", "static", "int8", "int8", True, False, False),
    ("static S8S8 reduce_range per-channel", "static", "int8", "int8", True, True, False),
    ("static U8S8", "static", "uint8", "int8", False, False, False),
    ("static U8S8 reduce_range", "static", "uint8", "int8", True, False, False),
    ("static U8U8", "static", "uint8", "uint8", False, False, False),
    ("static S8S8 +x64qp", "static", "int8", "int8", False, False, True),
]


def _file_name(variant_id: str) -> str:
    return variant_id.replace(" ", "_").replace("+", "") + ".onnx"


def build_model(folder: Path, model, fp32: Path, x: np.ndarray, y: np.ndarray, calibration: list) -> dict:
    """Every variant of one model in ``folder``, and its held-out data with the eager fp32 logits."""
    import torch

    from distilflow.deploy.quantize import ort_dynamic, ort_static, strip_metadata

    sys.path.insert(0, str(ROOT))
    from tests.deploy.int8_reference import linear_names

    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    np.savez(folder / "data.npz", x=x, y=y, reference=reference)
    for variant_id, method, activations, weights, reduce_range, per_channel, _ in VARIANTS:
        dst = folder / _file_name(variant_id)
        common = {"per_channel": per_channel, "reduce_range": reduce_range, "weight_type": weights}
        if method == "dynamic":
            ort_dynamic(fp32, dst, **common)
        else:
            ort_static(fp32, dst, calibration, activation_type=activations, **common)
        strip_metadata(dst)
    return {"fp32": fp32.name, "rows": len(x), "linears": linear_names(model)}


def build(out: Path, run_dir: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.deploy.int8_reference import blobs, calibration_feeds, fitted_mlp

    models = {}
    folder = out / "fitted_mlp"
    folder.mkdir(parents=True, exist_ok=True)
    model, fp32 = fitted_mlp(folder)
    x, y = blobs(400, seed=2)
    models["fitted_mlp"] = build_model(folder, model, fp32, x.numpy(), y.numpy(), calibration_feeds())
    if run_dir:
        import torch

        from distilflow.deploy.export import export_onnx
        from distilflow.pipeline import config_of_run, load_trained, open_run

        run = open_run(config_of_run(run_dir))
        student = load_trained(run, "student").float().cpu().eval()
        data = run.work.test_arrays()
        folder = out / "mnist1d_student"
        folder.mkdir(parents=True, exist_ok=True)
        example = {"x": torch.from_numpy(data["x"][:2])}
        fp32 = export_onnx(student, example, folder / "student.onnx", kind="classifier")
        dep = run.cfg.deploy
        calibration = run.work.calibration_feeds(dep.observe_steps, dep.calibration_batch)
        models["mnist1d_student"] = build_model(folder, student, fp32, data["x"], data["y"], calibration)
    (out / "manifest.json").write_text(json.dumps(models, indent=1))
    return models


def _session(path: Path, x64_precision: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if x64_precision:
        options.add_session_config_entry(X64_PRECISION, "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(session, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _latency_ms(session, x: np.ndarray, iterations: int = 200) -> float:
    feeds = {"x": np.ascontiguousarray(x[:64])}
    for _ in range(10):
        session.run(["logits"], feeds)
    times = []
    for _ in range(iterations):
        began = time.perf_counter()
        session.run(["logits"], feeds)
        times.append(time.perf_counter() - began)
    return float(np.median(times) * 1000)


def noise_z(path: Path, method: str, names: list[str], x: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|int8 logits - their noise-free value| / noise std (tests/deploy/int8_reference.py), per batch of 64."""
    from tests.deploy.int8_reference import int8_expectation, mlp_int8_ops

    ops = mlp_int8_ops(names, path, method)
    parts = []
    for i in range(0, len(x), 64):
        expected, sigma = int8_expectation(ops, x[i : i + 64])
        parts.append(np.abs(got[i : i + 64] - expected) / (sigma + 1e-5 * np.abs(expected).max()))
    return np.concatenate(parts)


def measure(out: Path, timed: bool) -> dict:
    """Every variant of every model on the CPU this process runs on (native or emulated)."""
    sys.path.insert(0, str(ROOT))
    from distilflow.deploy.int8_kernels import kernel_report

    result = {"kernels": kernel_report(), "models": {}}
    for name, info in json.loads((out / "manifest.json").read_text()).items():
        folder = out / name
        data = np.load(folder / "data.npz")
        x, y, reference = data["x"], data["y"], data["reference"]
        scale = float(np.abs(reference).max())
        rows = {}
        for variant_id, method, activations, weights, *_, x64_precision in [("fp32", *[None] * 5, False), *VARIANTS]:
            path = folder / (info["fp32"] if variant_id == "fp32" else _file_name(variant_id))
            session = _session(path, x64_precision)
            got = _logits(session, x)
            error = np.abs(got - reference)
            # The noise model covers the shipped formats: dynamic U8S8, static S8S8 (symmetric activations).
            modelled = weights == "int8" and (method == "dynamic" or activations == "int8")
            z = noise_z(path, method, info["linears"], x, got) if modelled else None
            rows[variant_id] = {
                "z_max": None if z is None else float(z.max()),
                "z_rms": None if z is None else float(np.sqrt((z**2).mean())),
                "max_rel": float(error.max() / scale),
                "mean_rel": float(error.mean() / scale),
                "accuracy": float((got.argmax(-1) == y).mean()),
                "agreement": float((got.argmax(-1) == reference.argmax(-1)).mean()),
                "latency_ms_b64": _latency_ms(session, x) if timed else None,
            }
        result["models"][name] = rows
    return result


def run_on(cpu: str, out: Path) -> dict:
    """:func:`measure` in a child process, natively or under ``qemu-x86_64 -cpu <cpu>``."""
    command = [sys.executable, __file__, "--measure", str(out)]
    if cpu != "native":
        command = ["qemu-x86_64", "-cpu", cpu, *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if cpu.startswith(("SandyBridge", "IvyBridge")):
        # numpy's OpenBLAS misreads these emulated CPUs and runs an instruction they lack (float64
        # matmuls of the noise model die); name its core. ONNX Runtime's kernels are not affected.
        env["OPENBLAS_CORETYPE"] = "Sandybridge"
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        noise = "qemu-x86_64: warning"
        errors = "\n".join(line for line in done.stderr.splitlines() if noise not in line)
        raise SystemExit(f"measuring on {cpu} failed (exit {done.returncode}):\n{errors[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(cpu: str, result: dict) -> str:
    k = result["kernels"]
    lines = [
        f"### {cpu}: torch CPU capability {k['cpu_capability']}, probe: {k['kernel_path']}",
        "",
        f"/proc/cpuinfo int8 flags (the host's, also under qemu): {' '.join(k['cpu_flags']) or 'none'}; "
        f"ONNX Runtime {k['onnxruntime']}.",
        "",
    ]
    timed = cpu == "native"
    head = ["model", "variant", "max err / max|logit|", "mean err / max|logit|", "accuracy", "argmax = fp32"]
    head += ["noise z max / rms"]
    head += ["p50 ms b64", "vs dynamic U8S8"] if timed else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, rows in result["models"].items():
        base = rows["dynamic U8S8"]["latency_ms_b64"]
        for variant_id, row in rows.items():
            cells = [model, variant_id, f"{row['max_rel']:.4f}", f"{row['mean_rel']:.5f}"]
            cells += [f"{row['accuracy']:.4f}", f"{row['agreement']:.4f}"]
            cells.append("" if row["z_max"] is None else f"{row['z_max']:.1f} / {row['z_rms']:.2f}")
            if timed:
                cells += [f"{row['latency_ms_b64']:.3f}", f"{base / row['latency_ms_b64']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/int8-kernels")
    parser.add_argument("--run-dir", help="a finished MNIST-1D run whose student is measured too")
    parser.add_argument("--cpus", nargs="+", default=["native", "Haswell-v4", "SandyBridge"])
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: measure this folder
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), timed=os.environ.get("INT8_TIMED") == "1")))
        return
    out = Path(args.out)
    build(out, args.run_dir)
    results = {}
    for cpu in args.cpus:
        os.environ["INT8_TIMED"] = "1" if cpu == "native" else "0"
        results[cpu] = run_on(cpu, out)
        print(table(cpu, results[cpu]) + "\n", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"JSON in {out / 'results.json'}")


if __name__ == "__main__":
    main()
