"""Peak memory of a shipped model, measured for real: the peak RSS of a fresh child process.

The child imports only the runtime the variant needs, loads the model from its files and runs the
workload once, then prints its peak resident set (VmHWM) before loading (the runtime alone) and at
the end. That peak is what a device must have free to run the model: runtime libraries, weights,
activations, the KV cache. Kinds of ``spec``:

- ``torch``: a Hugging Face folder, ``generate`` of ``new_tokens`` after ``prompts`` (KV cache);
- ``genai``: an ONNX Runtime GenAI folder, the same generation;
- ``ort-lm``: a full-sequence causal-LM ONNX file, the same generation (the whole sequence each step);
- ``ort``: a classifier ONNX file, one call on ``batch`` rows of zeros of ``input_shape``;
- ``torch-classifier``: a built-in MLP / CNN (``model``: its ``student.model`` section) loaded from a
  safetensors file, one call as for ``ort``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from distilflow.deploy import ort_session


def peak_memory_mb(spec: dict[str, Any]) -> dict[str, float]:
    """``{"peak_rss_mb", "runtime_rss_mb"}`` of a fresh child running ``spec``; NaN when the child failed."""
    done = subprocess.run(
        [sys.executable, "-m", "distilflow.deploy.memory", json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"peak_rss_mb": float("nan"), "runtime_rss_mb": float("nan")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_kib() -> int:
    """This process's peak resident set. VmHWM belongs to the address space made at exec; ru_maxrss
    (the fallback off Linux) can carry the parent's peak when the child was forked from it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(job: dict[str, Any]) -> None:
    """Load one variant, run it once, print peak RSS (MB) before and after loading it."""
    kind = job["kind"]
    if kind in ("torch", "genai", "ort-lm"):
        from distilflow.deploy import lm_bench

        if kind == "torch":
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(job["threads"])
            runtime = peak_rss_kib()
            model = AutoModelForCausalLM.from_pretrained(job["path"], local_files_only=True).float().eval()
            fn = lm_bench.torch_generate_fn(model, job["pad"])
        elif kind == "genai":
            import onnxruntime_genai  # noqa: F401  (the runtime is part of the baseline)

            runtime = peak_rss_kib()
            fn = lm_bench.genai_generate_fn(lm_bench.open_model(job["path"], job["threads"]))
        else:
            import onnxruntime  # noqa: F401

            runtime = peak_rss_kib()
            fn = lm_bench.ort_generate_fn(ort_session(job["path"], job["threads"]))
        fn(np.array(job["prompts"], dtype=np.int64), job["new_tokens"])
    else:
        rows = np.zeros((job["batch"], *job["input_shape"]), dtype=np.float32)
        if kind == "ort":
            import onnxruntime  # noqa: F401

            runtime = peak_rss_kib()
            ort_session(job["path"], job["threads"]).run(["logits"], {"x": rows})
        else:
            import torch
            from safetensors.torch import load_file

            from distilflow.models.zoo import CNN, MLP

            torch.set_num_threads(job["threads"])
            runtime = peak_rss_kib()
            model = job["model"]
            if model["arch"] == "mlp":
                module = MLP(job["input_shape"], job["num_classes"], model["mlp"]["hidden"], dropout=0.0)
            else:
                section = model["cnn"]
                dims = 1 if model["arch"] == "cnn1d" else 2
                module = CNN(
                    job["input_shape"], job["num_classes"], section["channels"], section["kernel_size"], dims=dims
                )
            module.load_state_dict(load_file(job["path"]))
            with torch.no_grad():
                module.eval()(torch.from_numpy(rows))
    peak = peak_rss_kib()
    print(json.dumps({"peak_rss_mb": round(peak / 1024, 1), "runtime_rss_mb": round(runtime / 1024, 1)}))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
