"""``distilflow size-student`` for causal-LM students: export each candidate, time its generation.

Latency of an LM candidate is **ms per generated token**: greedy generation at ``--batch`` rows from
a prompt of ``deploy.genai.prompt_tokens`` tokens (the first tokens of held-out rows), exactly
``deploy.genai.new_tokens`` new tokens; the time from the first new token to the last, over the
``new_tokens - 1`` steps after it (the prompt pass is reported beside it as ``prefill_ms``). With
the backend the user ships:

- ``torch``: transformers ``generate`` in eager PyTorch, KV cache on (deploy/lm_bench.py);
- ``ort-fp32`` / ``ort-int8``: the full-sequence ONNX export ``deploy`` writes (deploy/export.py; int8:
  deploy/quantize.py's dynamic int8), one pass over the whole sequence per new token (that export has
  no KV cache, so this is what a user of it gets);
- ``genai-int4``: ONNX Runtime GenAI's int4 build, as ``deploy`` makes it (deploy/genai.py, with
  ``deploy.genai``'s block size, accuracy level and embedding setting), its generator (KV cache).

Every candidate generates once per round, ``--repeats`` rounds after one warm-up round
(interleaved: drift on a shared machine hits all alike); p50 / p90 over the rounds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distilflow.config import Config, to_dict
from distilflow.deploy.speed import median, probe_ms
from distilflow.errors import UserError
from distilflow.models.sizing import Candidate
from distilflow.models.sizing_lm import lm_candidates
from distilflow.size_student_choice import Timing


def preflight(cfg: Config, backend: str) -> None:
    """One line for an LM config that size-student cannot vary, before anything is built."""
    hf = cfg.student.model.hf
    if cfg.reasoning.task != "off":
        raise UserError("size-student sizes causal-LM students of text data; the reasoning demo's config is not one")
    if hf is None or hf.path or not hf.config:
        raise UserError(
            "size-student builds LM candidates from student.model.hf.config (a transformers config); "
            f"student.model.hf.path {getattr(hf, 'path', None)!r} is a fixed model: give hf.config instead"
        )
    if hf.init_layers:
        raise UserError(
            f"student.model.hf.init_layers {hf.init_layers} lists one teacher layer per configured student layer; "
            "size-student changes the depth: remove it (or set it after sizing)"
        )
    if isinstance(cfg.distill.layer_map, list):
        raise UserError(
            "distill.layer_map pairs layers of the configured student depth; size-student changes the depth: "
            "use layer_map: uniform"
        )
    g = cfg.deploy.genai
    if g.new_tokens < 2:
        raise UserError(f"deploy.genai.new_tokens {g.new_tokens}: LM latency is per token after the first; give >= 2")


def lm_variant(c: Candidate, backend: str, folder: Path, work: Any, cfg: Config, threads: int) -> Any:
    """A :class:`~distilflow.deploy.lm_bench.GenVariant` of the candidate as ``backend`` ships it."""
    from distilflow.deploy import lm_bench, ort_session
    from distilflow.models.hf import no_progress_bars

    hf_dir = folder / "hf"
    with no_progress_bars():
        c.module.save_pretrained(hf_dir)
    work.save_for_inference(hf_dir)
    if backend == "torch":
        return lm_bench.torch_variant(c.name, hf_dir, threads)
    if backend == "genai-int4":
        from distilflow.deploy.genai import build, read_hf_config, unsupported_reason

        reason = unsupported_reason(read_hf_config(hf_dir), cfg.deploy.genai.execution_provider)
        if reason:
            raise UserError(f"--backend genai-int4: {reason}; candidate {c.name}")
        genai_dir = build(hf_dir, folder / "genai-int4", "int4", cfg.deploy.genai)
        shutil.rmtree(hf_dir)
        return lm_bench.genai_variant(c.name, genai_dir, threads)
    from distilflow.deploy.export import export_onnx

    rows = work.test_arrays()
    example = {k: torch.from_numpy(rows[k][:2]) for k in ("input_ids", "attention_mask")}
    onnx = export_onnx(c.module, example, folder / "model.onnx", kind="causal_lm")
    if backend == "ort-int8":
        from distilflow.deploy.quantize import ort_dynamic

        onnx = ort_dynamic(onnx, folder / "model.int8.onnx")
    spec = {"kind": "ort-lm", "path": str(onnx), "threads": threads}
    session = ort_session(onnx, threads)
    return lm_bench.GenVariant(c.name, lm_bench.ort_generate_fn(session), None, onnx.stat().st_size, spec)


def teacher_macs(cfg: Config, work: Any) -> int:
    """The teacher's MACs per token (linear layers), from its config alone (a model on the meta device)."""
    from distilflow.models.hf import build_causal_lm, causal_lm_outline, linear_macs_per_token

    hf = cfg.teacher.model.hf
    if hf is not None and hf.path:
        return linear_macs_per_token(causal_lm_outline(hf.path))
    with torch.device("meta"):
        return linear_macs_per_token(build_causal_lm(work.hf_config(hf.config, "teacher"), role="teacher"))


def measure_generation(
    variants: list[Any], prompts: np.ndarray, new_tokens: int, *, repeats: int, probe: list[float] | None = None
) -> list[dict]:
    """Per variant its per-round ms per generated token and prefill ms, the variants interleaved; one
    speed probe (ms, deploy/speed.py) per timed round appended to ``probe`` when given."""
    times: list[dict[str, list[float]]] = [{"token": [], "prefill": []} for _ in variants]
    for round_ in range(repeats + 1):  # round 0: warm-up
        if round_ and probe is not None:
            probe.append(probe_ms())
        for i, variant in enumerate(variants):
            first, rest = variant.generate(prompts, new_tokens)
            if round_:
                times[i]["token"].append(rest / (new_tokens - 1) * 1000)
                times[i]["prefill"].append(first * 1000)
    return times


class LMSizing:
    """The causal-LM candidates of one config, each timed as ``backend`` ships it (ms per generated
    token); :meth:`retime` builds one of them again from its config and times it alone. The sweep's
    speed probe samples (one per round) are kept in ``sweep_probe``."""

    def __init__(
        self,
        cfg: Config,
        *,
        backend: str,
        batch: int,
        threads: int,
        repeats: int,
        widths: list[int] | None,
        depths: list[int] | None,
    ) -> None:
        from distilflow.deploy import lm_bench
        from distilflow.workload import make_workload

        preflight(cfg, backend)
        self.cfg, self.backend, self.threads, self.repeats = cfg, backend, threads, repeats
        self.widths, self.depths = widths, depths
        self.sweep_probe: list[float] = []
        self.work = make_workload(cfg, torch.device("cpu"))
        try:
            self.prompts = lm_bench.prompt_rows(self.work.test_arrays(), batch, cfg.deploy.genai.prompt_tokens)
        except ValueError as exc:
            raise UserError(f"deploy.genai.prompt_tokens: {exc}; lower it or raise data's seq_len") from None

    def hf_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` (a student hf.config) with vocabulary size and special ids from the student's tokenizer."""
        return self.work.hf_config(config, "student")

    def rows(self, *, memory: bool) -> list[dict[str, Any]]:
        """One measured row per candidate (ordered by MACs per token, then parameters), interleaved."""
        import tempfile

        from distilflow.deploy import lm_bench

        cfg, g = self.cfg, self.cfg.deploy.genai
        section = to_dict(cfg)["student"]["model"]
        # The built-in grid stops at the teacher's cost (a student as costly is no distillation); given widths stay.
        found = lm_candidates(
            section["hf"]["config"],
            self.hf_config,
            widths=self.widths,
            depths=self.depths,
            seed=cfg.seed,
            max_macs=None if self.widths else teacher_macs(cfg, self.work),
        )
        positions = getattr(found[0].module.config, "max_position_embeddings", None)
        if positions is not None and g.prompt_tokens + g.new_tokens > positions:
            raise UserError(
                f"deploy.genai.prompt_tokens + new_tokens = {g.prompt_tokens + g.new_tokens} exceeds the student's "
                f"{positions} positions (max_position_embeddings); lower one of them"
            )
        with tempfile.TemporaryDirectory(prefix="size-student-") as tmp:
            variants = []
            for i, c in enumerate(found):
                (Path(tmp) / str(i)).mkdir()
                variants.append(lm_variant(c, self.backend, Path(tmp) / str(i), self.work, cfg, self.threads))
                c.module = None  # the exported files are what is timed; free the eager copy
            times = measure_generation(
                variants, self.prompts, g.new_tokens, repeats=self.repeats, probe=self.sweep_probe
            )
            peaks = [lm_bench.peak_memory_mb(v.spec, self.prompts, g.new_tokens) if memory else {} for v in variants]
        rows = []
        for c, v, t, peak in zip(found, variants, times, peaks):
            rows.append(
                {
                    "name": c.name,
                    "model": {**section, "hf": {**section["hf"], "config": c.model}},
                    "params": c.params,
                    "macs": c.macs,
                    "p50_ms": float(np.percentile(t["token"], 50)),
                    "p90_ms": float(np.percentile(t["token"], 90)),
                    "prefill_ms": float(np.median(t["prefill"])),
                    "size_bytes": v.size_bytes,
                    **peak,
                }
            )
        return rows

    def retime(self, row: dict[str, Any]) -> Timing:
        """ms per token of ``row``'s shape built and exported again, timed alone."""
        import tempfile

        shape = row["model"]["hf"]["config"]
        (c,) = lm_candidates(
            shape,
            self.hf_config,
            widths=[shape["hidden_size"]],
            depths=[shape["num_hidden_layers"]],
            seed=self.cfg.seed,
        )
        if (c.params, c.macs) != (row["params"], row["macs"]):  # the grid's rules must rebuild the same shape
            raise RuntimeError(f"{row['name']} rebuilt as {c.name} with {c.params:,} params, not {row['params']:,}")
        with tempfile.TemporaryDirectory(prefix="size-student-") as tmp:
            v = lm_variant(c, self.backend, Path(tmp), self.work, self.cfg, self.threads)
            probe: list[float] = []
            new_tokens = self.cfg.deploy.genai.new_tokens
            (t,) = measure_generation([v], self.prompts, new_tokens, repeats=self.repeats, probe=probe)
        return Timing(float(np.percentile(t["token"], 50)), float(np.percentile(t["token"], 90)), median(probe))
