"""Settings of a torchrun job (its environment and dist.*), refused before the process group is joined."""

from __future__ import annotations

from ..case import RUN, case, generate

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"}

CASES = [
    case(
        "torchrun-batch-does-not-split",
        [*RUN, "student.train.batch_size=33"],
        "does not split over 2 processes",
        env=TORCHRUN,
    ),
    case(
        "torchrun-accum-does-not-split",
        [*RUN, "student.train.grad_accum=4", "student.train.batch_size=36"],
        "batch_size must be a multiple of grad_accum x world size (8)",
        env=TORCHRUN,
    ),
    case("torchrun-teacher-batch", [*RUN, "teacher.train.batch_size=7"], "'teacher.train.batch_size': 7", env=TORCHRUN),
    case(
        "torchrun-env-incomplete",
        RUN,
        "MASTER_ADDR, MASTER_PORT not set",
        env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
    ),
    case("torchrun-world-size-not-a-number", RUN, "WORLD_SIZE", env={**TORCHRUN, "WORLD_SIZE": "two"}),
    case("torchrun-rank-not-a-number", RUN, "RANK", env={**TORCHRUN, "RANK": "first"}),
    case("torchrun-rank-past-world", RUN, "RANK=2", env={**TORCHRUN, "RANK": "2", "LOCAL_RANK": "2"}),
    case("torchrun-nccl-on-cpu", [*RUN, "dist.backend=nccl"], "dist.backend", env=TORCHRUN),
    case("torchrun-timeout-zero", [*RUN, "dist.timeout_s=0"], "'dist.timeout_s': 0.0"),
    case("torchrun-strategy-unknown", [*RUN, "dist.strategy=zero3"], "'dist.strategy': 'zero3'"),
    case(
        "torchrun-generate-env-incomplete",
        generate("generate.prompts=$dir/p.jsonl"),
        "not set",
        {"p.jsonl": '{"prompt": "1+1="}\n'},
        env={"WORLD_SIZE": "2"},
    ),
]
