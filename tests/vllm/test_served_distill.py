"""The served teacher through the commands against a real vLLM CPU server: a ``cache-teacher`` from the
server equals one from the same teacher in this process, its score equals the local evaluation, and
distillation from the server tracks distillation from the local top-k cache, with the teacher's weights
never loaded in the student's process.

Tolerances: served and local log-probabilities agree to about 1e-6 (float32 on both sides, different
kernels; bounded by ATOL = 1e-4 in test_served_teacher.py). The caches hold float16: two float32 values
within ATOL round to float16 values at most one float16 spacing apart (2^-10 of the value's binade,
<= 2^-10 |v|), so cached values agree within ATOL + 2^-10 |v|. Losses: a float16 cache shifts each
position's KD by the rounding of its log-probabilities (up to 2^-11 |log p| relative, <= 1e-2 of the
sum here); the served (float32) and cached (float16) runs then follow slightly different gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distilflow.cli import main
from distilflow.config import load_config
from distilflow.data.cache import read_manifest
from distilflow.workload import make_workload

from .launch import MODEL_NAME

K = 20
ATOL = 1e-4
KD_PHASES = "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]"


def lm_args(tiny_lm_args, root: Path, served_dir: Path, *extra: str) -> list[str]:
    return [
        *tiny_lm_args(root),
        f"teacher.model.hf.path={served_dir}",
        "teacher.model.hf.config={}",
        "distill.layer_map=null",
        KD_PHASES,
        "deploy.enabled=false",
        "student.train.log_every=1",
        f"cache.k={K}",
        *extra,
    ]


def served_keys(vllm_server) -> list[str]:
    return [
        f"teacher.server.url={vllm_server.url}",
        f"teacher.server.model={MODEL_NAME}",
        f"teacher.server.top_k={K}",
        "teacher.server.max_retries=1",
    ]


def shards(folder: Path) -> dict[str, torch.Tensor]:
    parts = [load_file(folder / s["file"]) for s in read_manifest(folder)["shards"]]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def student_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "student" and "loss" in r]


@pytest.fixture(scope="module")
def caches(module_vllm_server, served_dir, tiny_lm_args, tmp_path_factory, refuse_loads):
    """The same teacher cached in this process and from the server (whose weights are then never loaded)."""
    root = tmp_path_factory.mktemp("served-caches")
    local = lm_args(tiny_lm_args, root / "local", served_dir, f"cache.path={root / 'local-cache'}")
    assert main(["cache-teacher", *local]) == 0
    with pytest.MonkeyPatch.context() as patch:
        loads = refuse_loads(patch)
        served = lm_args(
            tiny_lm_args,
            root / "served",
            served_dir,
            f"cache.path={root / 'served-cache'}",
            *served_keys(module_vllm_server),
        )
        assert main(["cache-teacher", *served]) == 0
        assert not loads
    return root, local, served


def test_cache_from_the_server_equals_the_local_teachers(caches, reference_model):
    root, local_args, _ = caches
    local_manifest, served_manifest = read_manifest(root / "local-cache"), read_manifest(root / "served-cache")
    local_id, served_id = local_manifest["identity"], served_manifest["identity"]
    differ = {key for key in local_id if local_id[key] != served_id[key]}
    assert differ == {"teacher_sha256", "teacher_dtype", "teacher_served"}  # same rows, tokenizer, k, vocabulary
    assert served_id["teacher_served"] == MODEL_NAME and served_id["tokenizer_sha256"]
    local, served = shards(root / "local-cache"), shards(root / "served-cache")
    rows = make_workload(load_config(local_args[0], local_args[1:]), torch.device("cpu")).cache_source().rows
    with torch.no_grad():
        logits = reference_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]
    ranked = torch.log_softmax(logits.float(), dim=-1).topk(K + 1, dim=-1).values  # (N, T - 1, K + 1)
    mask = rows["attention_mask"].bool()
    real = mask[:, 1:] & mask[:, :-1]
    assert int(real.sum()) > 1000
    # Values: both largest first, so compared slot by slot whatever the order of tied ids.
    local_values, served_values = local["logprobs"].float()[real], served["logprobs"].float()[real]
    gap = (served_values - local_values).abs()
    print(f"cached values, served vs local: max |diff| {gap.max():.2e}")
    assert bool((gap <= ATOL + 2**-10 * local_values.abs()).all())
    # Ids: exactly where rounding cannot reorder them (tie-aware, as in test_served_teacher.py).
    boundary_clear = (ranked[..., K - 1] - ranked[..., K] > 2 * ATOL) & real
    order_clear = ((ranked[..., :-1] - ranked[..., 1:]).amin(-1) > 2 * ATOL) & real
    assert boundary_clear.sum() >= 0.9 * real.sum() and order_clear.sum() >= 0.5 * real.sum()
    assert torch.equal(served["ids"][order_clear], local["ids"][order_clear])
    assert torch.equal(served["ids"][boundary_clear].sort(-1).values, local["ids"][boundary_clear].sort(-1).values)


def test_served_teachers_score_and_cost_equal_the_local_teachers(caches):
    """Recorded in each cache's manifest: the local teacher evaluated here (Task.evaluate, and its FLOP count),
    the served one scored from the server's log-probabilities of the held-out tokens (and its config.json)."""
    root, _, _ = caches
    local = read_manifest(root / "local-cache")["teacher_result"]
    served = read_manifest(root / "served-cache")["teacher_result"]
    print(f"teacher held-out loss: local {local['loss']:.7f} served {served['loss']:.7f}")
    assert served["loss"] == pytest.approx(local["loss"], rel=1e-5)
    assert served["perplexity"] == pytest.approx(local["perplexity"], rel=1e-5)
    assert (served["params"], served["macs_per_token"]) == (local["params"], local["macs_per_token"])


def test_distillation_from_the_server_tracks_the_local_cache(
    caches, vllm_server, tiny_lm_args, served_dir, never_loaded
):
    """Every run here gets its teacher's signals from a complete cache or the server: none loads it."""
    root, local_args, _ = caches
    from_local_cache = [*local_args, f"output_dir={root / 'distill-local'}", "cache.use=true"]
    assert main(["distill", *from_local_cache, "--no-tensorboard"]) == 0
    online = lm_args(tiny_lm_args, root / "online", served_dir, *served_keys(vllm_server))
    assert main(["distill", *online, "--no-tensorboard"]) == 0
    from_served_cache = lm_args(
        tiny_lm_args,
        root / "from-served-cache",
        served_dir,
        *served_keys(vllm_server),
        f"cache.path={root / 'served-cache'}",
        "cache.use=true",
    )
    assert main(["distill", *from_served_cache, "--no-tensorboard"]) == 0
    assert not never_loaded
    runs = {
        "local cache": student_rows(root / "distill-local"),
        "online": student_rows(root / "online" / "run"),
        "served cache": student_rows(root / "from-served-cache" / "run"),
    }
    for name, rows in runs.items():
        print(name, [round(r["kd"], 6) for r in rows])
    reference = runs["local cache"]
    assert len(reference) == 10 and all(r["kd"] > 0 and math.isfinite(r["kd"]) for r in reference)
    for name in ("online", "served cache"):
        for a, b in zip(reference, runs[name], strict=True):
            assert b["kd"] == pytest.approx(a["kd"], rel=1e-2), (name, a["step"])
            assert b["ce"] == pytest.approx(a["ce"], rel=1e-3), (name, a["step"])
