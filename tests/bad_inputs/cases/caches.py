"""Teacher-signal caches (cache.use, cache.path): manifests and shards that are damaged or of another config."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..case import CACHED, case

RUN = ("run", *CACHED, "--no-tensorboard")
ELSEWHERE = ("run", *CACHED, "cache.path=$dir/cache", "--no-tensorboard")  # the cache without its run


def run_copy(change: Callable[[Path], None] | None = None, *, cache_only: bool = False):
    """A maker copying the kit's run folder (or only its teacher_cache) and applying ``change`` to the copy's
    cache folder."""

    def make(path: Path, kit) -> None:
        shutil.copytree(kit.run / "teacher_cache" if cache_only else kit.run, path)
        if change is not None:
            change(path if cache_only else path / "teacher_cache")

    return make


def manifest_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """A change of the cache's manifest.json: ``edit(manifest)`` changes it in place (what it returns is
    ignored, so that ``lambda m: m.pop(key)`` reads as it does)."""

    def change(folder: Path) -> None:
        path = folder / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return change


def write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _flip_byte(folder: Path) -> None:
    shard = folder / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])


def _set(key: str, value):
    def edit(manifest: dict) -> None:
        manifest["shards"][0][key] = value

    return edit


CASES = [
    case(
        "cache-manifest-not-json",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(write("manifest.json", b"{oops"))},
    ),
    case(
        "cache-manifest-a-list", RUN, "is not a distilflow manifest", {"out": run_copy(write("manifest.json", b"[]"))}
    ),
    case(
        "cache-manifest-no-shards",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(lambda m: m.pop("shards")))},
    ),
    case(
        "cache-manifest-shards-not-list",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(lambda m: m.update(shards={"a": 1})))},
    ),
    case(
        "cache-manifest-rows-not-pair",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(_set("rows", "0:64")))},
    ),
    case(
        "cache-manifest-bytes-not-int",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(_set("bytes", "many")))},
    ),
    case(
        "cache-manifest-file-not-string",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(_set("file", 3)))},
    ),
    case(
        "cache-manifest-identity-not-mapping",
        RUN,
        "is not a distilflow manifest",
        {"out": run_copy(manifest_edit(lambda m: m.update(identity=[])))},
    ),
    case(
        "cache-shard-missing",
        RUN,
        "shard-00001.safetensors' is missing",
        {"out": run_copy(lambda folder: (folder / "shard-00001.safetensors").unlink())},
    ),
    case("cache-shard-truncated", RUN, "(truncated or replaced)", {"out": run_copy(_truncate)}),
    case("cache-shard-altered", RUN, "does not match its sha256", {"out": run_copy(_flip_byte)}),
    case(
        "cache-shard-gap",
        RUN,
        "has no shard for rows from 0",
        {"out": run_copy(manifest_edit(lambda m: m["shards"].pop(0)))},
    ),
    case(
        "cache-rows-of-another-data",
        RUN,
        "does not match this config: rows",
        {"out": run_copy(manifest_edit(lambda m: m["identity"].update(rows=5)))},
    ),
    case(
        "cache-of-another-format",
        [*ELSEWHERE, "cache.format=topk", "cache.k=4"],
        "format is 'full' there",
        {"cache": run_copy(cache_only=True)},
    ),
    case(
        "cache-of-another-seed",
        [*ELSEWHERE, "data.seed=7"],
        "does not match this config: data_sha256",
        {"cache": run_copy(cache_only=True)},
    ),
    case(
        "cache-k-over-vocabulary",
        ["cache-teacher", *CACHED, "cache.format=topk", "cache.k=32", "teacher.model.checkpoint=$run/teacher"],
        "the teacher's vocabulary has 10 ids",
    ),
    case(
        "cache-incomplete-for-distill",
        ["distill", *CACHED, "cache.path=$dir/cache"],
        "no trained teacher",
        {"cache": run_copy(manifest_edit(lambda m: m.update(complete=False)), cache_only=True)},
    ),
]
