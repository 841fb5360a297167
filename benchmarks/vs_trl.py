"""Issue 8, 4e: distilflow against TRL's GKDTrainer on identical work: step time and peak memory.

    pip install -e ".[bench]"     # trl (never a dependency of distilflow itself)
    python benchmarks/vs_trl.py [--steps 20] [--warmup 3] [--rounds 2] [--threads 1] [--device cpu] [--json PATH]
                                [--precision fp32|bf16] [--gradient-checkpointing] [--mmap-threshold BYTES]

Same teacher and student (the shapes of configs/lm_stdlib.yaml: Llama teacher 4 x 256, student 3 x 128,
2,048-id BPE vocabulary, random init saved once to folders that both tools load), same token rows (the
stdlib corpus packed into rows of 128), 16 rows per optimizer step, AdamW at a constant learning rate,
gradient clipping at 1.0, fp32 (``--precision bf16``: both under bf16 autocast with float32 weights,
TRL's ``bf16=True``; ``--gradient-checkpointing``: both recompute the student's decoder layers,
non-reentrant). The loss is off-policy forward KL on every real token: TRL with
``lmbda=0`` (never sample from the student) and ``beta=0`` (its generalized JSD is then
``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)`` = KL(teacher || student) summed
over the vocabulary, divided by the number of real tokens; its ``temperature`` only affects sampling),
distilflow with one ``kd`` phase, ``divergence=forward_kl``, ``temperature=1``, KD weight 1, no CE.

Modes, each in its own child process (so that peak memory is that process's own), interleaved over
rounds because a shared CPU drifts:
- ``trl``: GKDTrainer with the live teacher;
- ``online``: distilflow with the live teacher (``distill.loss_impl=auto``, which picks the plain loss at
  this size);
- ``online_fused``: the same with ``distill.loss_impl=fused`` (student logits computed chunk by chunk
  from the final hidden states inside the loss, never materialised whole);
- ``cached``: distilflow reading the teacher-signal cache (top-k, k = 32, written once beforehand by
  the same code as ``distilflow cache-teacher``; its writing time is reported, not counted per step);
- ``cached_fused``: the cache and the fused loss together.

Step time: median wall time from the start of one optimizer step to the start of the next, after
``--warmup`` steps, and the median CPU time of the process over the same intervals (with one thread
it equals wall time on an idle machine, and it is what to compare on a shared, overloaded one).
Memory: ``peak_rss`` is the child's resident high-water mark over its whole life
(interpreter, libraries, models, data, training); ``train_rss`` is the high-water mark during training
minus the resident size when training began (the high-water mark is reset then through
/proc/self/clear_refs); on a GPU ``peak_cuda`` is torch's allocator peak during training.
RSS counts what glibc's malloc keeps, not only live tensors: freed [tokens x vocab] blocks below its
(dynamic, up to 32 MiB) mmap threshold stay in the heap and fragment it. ``--mmap-threshold 131072``
fixes the threshold for both tools' children (MALLOC_MMAP_THRESHOLD_), so every large tensor is
mapped and unmapped and RSS follows live memory (steps get much slower; compare memory only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("trl", "online", "online_fused", "cached", "cached_fused")
BATCH, SEQ_LEN, LR = 16, 128, 3e-3


# ---------------------------------------------------------------- memory of this process (no distilflow import)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Step start times and memory around training, for either tool."""

    def __init__(self, device: str) -> None:
        self.device, self.starts, self.cpu_starts = device, [], []
        self.setup_peak = self.rss_at_start = 0
        self.reset_ok = False

    def train_begins(self) -> None:
        import torch

        self.setup_peak = _status_bytes("VmHWM")
        self.rss_at_start = _status_bytes("VmRSS")
        self.reset_ok = _reset_hwm()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step_begins(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())

    def report(self, warmup: int) -> dict:
        import torch

        intervals = [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]
        cpu = [b - a for a, b in zip(self.cpu_starts, self.cpu_starts[1:])][warmup:]
        train_peak = _status_bytes("VmHWM")
        out = {
            "step_s": statistics.median(intervals),
            "step_s_all": [round(x, 4) for x in intervals],
            "cpu_step_s": statistics.median(cpu),
            "peak_rss": max(self.setup_peak, train_peak),
            "train_rss": train_peak - self.rss_at_start if self.reset_ok else None,
            "rss_at_start": self.rss_at_start,
        }
        if self.device == "cuda":
            out["peak_cuda"] = torch.cuda.max_memory_allocated()
        return out


# ---------------------------------------------------------------- the distilflow side


def _distilflow_overrides(out: Path, args) -> list[str]:
    return [
        "data.stdlib.train_chars=300000",
        "data.stdlib.eval_chars=20000",
        f"data.stdlib.seq_len={SEQ_LEN}",
        f"threads={args.threads}",
        f"device={args.device}",
        f"teacher.model.hf.path={out / 'teacher'}",
        "teacher.model.hf.config={}",
        f"student.model.hf.path={out / 'student'}",
        "student.model.hf.config={}",
        f"student.train.steps={args.steps}",
        f"student.train.precision={args.precision}",
        f"student.train.gradient_checkpointing={'true' if args.gradient_checkpointing else 'false'}",
        f"student.train.batch_size={BATCH}",
        f"student.train.lr={LR}",
        f"student.train.min_lr={LR}",  # constant, as TRL's lr_scheduler_type=constant
        "student.train.warmup_steps=0",
        "student.train.weight_decay=0.0",
        "student.train.grad_clip=1.0",
        "student.train.eval_every=0",
        f"student.train.log_every={args.steps}",
        "student.train.checkpoint_every=0",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd]}]",
        "distill.kd_weight={schedule: constant, base_weight: 1.0, warmup_steps: 0}",
        "distill.temperature=1.0",
        "distill.divergence=forward_kl",
        "distill.layer_map=null",
        "distill.feature_layers=[]",
        "deploy.enabled=false",
        "cache.format=topk",
        "cache.k=32",
        f"cache.path={out / 'cache'}",
    ]


def _config(out: Path, args, folder: str, *extra: str):
    from distilflow.config import load_config

    return load_config(
        "configs/lm_stdlib.yaml", [*_distilflow_overrides(out, args), f"output_dir={out / folder}", *extra]
    )


def prepare(out: Path, args) -> dict:
    """Tokenizer, data rows, teacher and student folders, and the teacher cache (once, not timed)."""
    import numpy as np
    import torch

    from distilflow.config import load_config
    from distilflow.models.hf import build_causal_lm, no_progress_bars
    from distilflow.stages import Run
    from distilflow.teacher_signals import cache_stage
    from distilflow.workload import make_workload

    shapes = load_config("configs/lm_stdlib.yaml")
    base = load_config("configs/lm_stdlib.yaml", ["data.stdlib.train_chars=300000", "data.stdlib.eval_chars=20000"])
    work = make_workload(base, torch.device("cpu"))
    for role, stage in (("teacher", shapes.teacher), ("student", shapes.student)):
        torch.manual_seed(0 if role == "teacher" else 1)
        model = build_causal_lm(work.hf_config(stage.model.hf.config), role=role)
        with no_progress_bars():
            model.save_pretrained(out / role)
        work.tokenizer.save_pretrained(out / role)
    np.savez(out / "rows.npz", **{k: v.numpy() for k, v in work.train.items()})
    cfg = _config(out, args, "prep")
    run_work = make_workload(cfg, torch.device("cpu"))
    assert torch.equal(run_work.train["input_ids"], work.train["input_ids"]), "tokenization differs"
    began = time.monotonic()
    manifest = cache_stage(Run(cfg, run_work), run_work.new_model("teacher"), quiet=True)
    return {
        "rows": int(work.train["input_ids"].shape[0]),
        "cache_seconds": round(time.monotonic() - began, 2),
        "cache_bytes": sum(s["bytes"] for s in manifest["shards"]),
    }


def distilflow_worker(out: Path, args, mode: str, folder: str) -> dict:
    import numpy as np
    import torch

    from distilflow.pipeline import distill_stage, open_run

    torch.set_num_threads(args.threads)
    meter = Meter(args.device)
    fused, cached = ["distill.loss_impl=fused"], ["cache.use=true"]
    extra = {"cached": cached, "online_fused": fused, "cached_fused": cached + fused}.get(mode, [])
    cfg = _config(out, args, folder, *extra)
    run = open_run(cfg)
    rows = np.load(out / "rows.npz")["input_ids"]
    assert np.array_equal(run.work.train["input_ids"].numpy(), rows), "distilflow rows differ from TRL's"
    teacher = None if mode.startswith("cached") else run.work.new_model("teacher")
    make_task = run.work.task

    class Timed:
        """The task, with the start time of every optimizer step recorded (grad_accum = 1)."""

        def __init__(self, task) -> None:
            self.task = task

        def __getattr__(self, name):
            return getattr(self.task, name)

        def micro_batches(self, step: int):
            meter.step_begins()
            return self.task.micro_batches(step)

    run.work.task = lambda *a, **k: Timed(make_task(*a, **k))
    meter.train_begins()
    _, result = distill_stage(run, teacher, log_tensorboard=False)
    return {**meter.report(args.warmup), "loss_impl": cfg.distill.loss_impl}


# ---------------------------------------------------------------- the TRL side


def trl_worker(out: Path, args, folder: str) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # trl < 0.2x kept it at the top level
        from trl import GKDConfig, GKDTrainer

    torch.set_num_threads(args.threads)
    meter = Meter(args.device)
    rows = dict(np.load(out / "rows.npz"))
    dataset = Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    tokenizer = AutoTokenizer.from_pretrained(out / "student", local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(out / "student", dtype=torch.float32, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher", dtype=torch.float32, local_files_only=True)

    def collate(features: list[dict]) -> dict:
        return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}

    class Timing(TrainerCallback):
        def on_train_begin(self, *_, **__):
            meter.train_begins()

        def on_step_begin(self, *_, **__):
            meter.step_begins()

    config = GKDConfig(
        output_dir=str(out / folder),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        lmbda=0.0,  # off-policy: never generate from the student
        beta=0.0,  # generalized JSD at beta 0 = forward KL(teacher || student)
        seq_kd=False,
        max_length=SEQ_LEN,
        logging_steps=args.steps,
        save_strategy="no",
        report_to="none",
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        fp16=False,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timing()],
    )
    trainer.train()
    return meter.report(args.warmup)


# ---------------------------------------------------------------- the parent: rounds, ratios, table


def _child(args, mode: str, folder: str) -> dict:
    import shutil

    shutil.rmtree(args.out / folder, ignore_errors=True)  # a finished stage there would be reused, not trained
    command = [sys.executable, __file__, "--worker", mode, "--folder", folder, "--out", str(args.out)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--device", args.device, "--precision", args.precision]
    command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="step intervals not timed at the start")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="both tools")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="both tools")
    parser.add_argument("--mmap-threshold", type=int, default=0, help="glibc MALLOC_MMAP_THRESHOLD_ of the children")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-vs-trl"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--fresh", action="store_true", help="rebuild models, rows and cache even if --out has them")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="trl is always run")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.worker:
        if args.worker == "trl":
            result = trl_worker(args.out, args, args.folder)
        else:
            result = distilflow_worker(args.out, args, args.worker, args.folder)
        print(json.dumps(result))
        return

    import shutil

    import trl

    if (args.out / "prepared.json").is_file() and not args.fresh:
        prep = json.loads((args.out / "prepared.json").read_text())  # models, rows and cache of an earlier call
    else:
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        prep = prepare(args.out, args)
        (args.out / "prepared.json").write_text(json.dumps(prep) + "\n")
    print(f"prepared: {prep}", flush=True)
    modes = ["trl"] + [m for m in MODES if m in args.modes and m != "trl"]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in modes:
            r = _child(args, mode, f"{mode}-{round_}")
            results[mode].append(r)
            print(
                f"round {round_ + 1} {mode}: step {r['step_s'] * 1000:.1f} ms (CPU {r['cpu_step_s'] * 1000:.1f} ms), "
                f"peak RSS {_mib(r['peak_rss'])} MiB, "
                f"training +{_mib(r['train_rss'])} MiB",
                flush=True,
            )

    def median(mode: str, key: str) -> float | None:
        values = [r[key] for r in results[mode] if r.get(key) is not None]
        return statistics.median(values) if values else None

    keys = ["step_s", "cpu_step_s", "peak_rss", "train_rss"] + (["peak_cuda"] if args.device == "cuda" else [])
    summary = {mode: {key: median(mode, key) for key in keys} for mode in modes}
    for mode in modes:
        for key in keys:
            ref, value = summary["trl"][key], summary[mode][key]
            summary[mode][f"{key}_vs_trl"] = round(value / ref, 3) if ref and value is not None else None
    report = {
        "trl_version": trl.__version__,
        "device": args.device,
        "threads": args.threads,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "malloc_mmap_threshold": args.mmap_threshold or None,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "batch_rows": BATCH,
        "seq_len": SEQ_LEN,
        "prepare": prep,
        "summary": summary,
        "per_round": results,
    }
    gc = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(
        f"\nTRL {trl.__version__}, {args.device}, {args.precision}{gc}, {args.threads} thread(s), "
        f"{BATCH} x {SEQ_LEN} tokens per step, "
        f"median of {args.rounds} rounds x {args.steps - 1 - args.warmup} steps\n"
    )
    head = "| mode | step ms wall | vs TRL | step ms CPU | vs TRL | peak RSS MiB | vs TRL "
    head += "| training RSS MiB | vs TRL |"
    if args.device == "cuda":
        head += " peak CUDA MiB | vs TRL |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for mode in modes:
        s = summary[mode]
        line = (
            f"| {mode} | {s['step_s'] * 1000:.1f} | {s['step_s_vs_trl']:.2f}x | {s['cpu_step_s'] * 1000:.1f} | "
            f"{s['cpu_step_s_vs_trl']:.2f}x | {_mib(s['peak_rss'])} | "
            f"{s['peak_rss_vs_trl']:.2f}x | {_mib(s['train_rss'])} | {s['train_rss_vs_trl'] or float('nan'):.2f}x |"
        )
        if args.device == "cuda":
            line += f" {_mib(s['peak_cuda'])} | {s['peak_cuda_vs_trl']:.2f}x |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
