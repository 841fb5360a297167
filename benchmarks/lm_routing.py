"""Two LM teachers routed by a data column vs one teacher, on mixed code + prose: perplexity per domain.

    python benchmarks/lm_routing.py --teacher-a PATH [--out DIR] [--step prepare|teacher_b|CASE]
        [--seeds 0 1 2] [--student-steps 400] [--teacher-b-steps 400] [--table]

Domain A (``code``) is the Python standard library's source, as in configs/lm_stdlib.yaml (training
files and the held-out modules of distilflow/data/stdlib_corpus.py). Domain B (``prose``) is the
English prose of the Python reference manual that ships with every Python install
(``pydoc_data.topics``: the text ``help('if')`` prints; 79 topics, ~465k characters); every 5th topic
in name order is held out. Teacher A is a trained teacher of configs/lm_stdlib.yaml (PATH); teacher B
has its shape and tokenizer (the stdlib BPE) and is trained here on the prose's training topics.

The student (configs/lm_stdlib.yaml's) trains on one JSONL file holding both domains, each record's
``teacher`` field naming its domain's teacher, in three cases:

- ``routed``: ``teachers: [code, prose]``, ``data.teacher_column: teacher`` (each record distilled from
  its own domain's teacher; feature phase aligned with ``code``);
- ``one``: ``teacher:`` = teacher A for every record (no routing);
- ``ce``: the baseline stage (next-token cross-entropy only).

Each is scored on held-out A and held-out B separately. Every step is its own call (``--step``), so
each run can take its own CPU slot; a finished step is skipped. ``--table`` prints what is there.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml
from _stats import sample_std  # benchmarks/_stats.py (this script's folder)

STDLIB = "configs/lm_stdlib.yaml"
TRAIN_A_CHARS = 1_200_000  # the code records of the mixed file (2.6 x the prose's training text)
EVAL_A_CHARS = 200_000  # the demo's held-out set (the same modules)
CASES = ("routed", "one", "ce")


def prepare(out: Path) -> None:
    """The JSONL files: prose train (teacher B), mixed train (student), held-out code, held-out prose."""
    import pydoc_data.topics

    from distilflow.data.stdlib_corpus import load_stdlib_corpus

    out.mkdir(parents=True, exist_ok=True)
    code = load_stdlib_corpus(train_chars=TRAIN_A_CHARS, eval_chars=EVAL_A_CHARS)
    topics = sorted(pydoc_data.topics.topics.items())
    prose_train = [text for i, (_, text) in enumerate(topics) if i % 5 != 0]
    prose_held = [text for i, (_, text) in enumerate(topics) if i % 5 == 0]

    def write(name: str, texts: list[str], teacher: str) -> None:
        lines = [json.dumps({"text": text, "teacher": teacher}) for text in texts]
        (out / name).write_text("\n".join(lines) + "\n")

    write("prose_train.jsonl", prose_train, "prose")
    write("held_code.jsonl", code.eval, "code")
    write("held_prose.jsonl", prose_held, "prose")
    mixed = [json.dumps({"text": t, "teacher": "code"}) for t in code.train]
    mixed += [json.dumps({"text": t, "teacher": "prose"}) for t in prose_train]
    (out / "mixed_train.jsonl").write_text("\n".join(mixed) + "\n")
    sizes = {
        name: sum(len(t) for t in texts)
        for name, texts in (
            ("code_train", code.train),
            ("code_held", code.eval),
            ("prose_train", prose_train),
            ("prose_held", prose_held),
        )
    }
    (out / "sizes.json").write_text(json.dumps(sizes, indent=2))
    print(f"prepared {out}: characters {sizes}")


def tokenizer_folder() -> str:
    """The stdlib demo's BPE tokenizer, as the demo's data stage cached it (run the demo once first)."""
    import hashlib

    from distilflow.config import load_config

    cfg = load_config(STDLIB, ["threads=1"])
    corpus = cfg.data.stdlib
    key = hashlib.sha256(json.dumps([corpus.vocab_size, corpus.train_chars, "v1"]).encode()).hexdigest()[:12]
    folder = Path(cfg.data.cache_dir).expanduser() / f"stdlib-tokenizer-{key}"
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"no demo tokenizer at {folder}: run configs/lm_stdlib.yaml's data stage first")
    return str(folder)


def shipped() -> dict:
    return yaml.safe_load(Path(STDLIB).read_text())


def text_data(out: Path, train: str, held: str, column: bool) -> dict:
    rows = {"seq_len": 128, "pack": True, "tokenizer": tokenizer_folder()}
    data = {"source": "text", "text": {**rows, "path": str(out / train), "test_path": str(out / held)}}
    if column:
        data["teacher_column"] = "teacher"
    return data


def teacher_model(checkpoint: str) -> dict:
    return {**shipped()["teacher"]["model"], "checkpoint": checkpoint}


def config_of(out: Path, step: str, seed: int, args: argparse.Namespace) -> Path:
    """The run config of ``step`` (written under ``out``), the demo's models and schedule otherwise."""
    base = shipped()
    cfg: dict = {"name": f"routing-{step}", "seed": seed, "threads": 1, "deploy": {"enabled": False}}
    if step == "teacher_b":
        cfg.update(
            data=text_data(out, "prose_train.jsonl", "held_prose.jsonl", False),
            student=base["student"],
            distill=base["distill"],
        )
        cfg["teacher"] = {"model": base["teacher"]["model"], "train": {**base["teacher"]["train"]}}
        cfg["teacher"]["train"].update(steps=args.teacher_b_steps, eval_every=args.teacher_b_steps)
        cfg["output_dir"] = str(out / "teacher_b")
    else:
        student = {"model": base["student"]["model"], "train": {**base["student"]["train"]}}
        student["train"].update(steps=args.student_steps, eval_every=args.student_steps)
        cfg.update(student=student, distill=base["distill"], output_dir=str(out / step / f"seed{seed}"))
        cfg["data"] = text_data(out, "mixed_train.jsonl", "held_code.jsonl", step == "routed")
        if step == "routed":
            cfg["teachers"] = [
                {"name": "code", "model": teacher_model(args.teacher_a)},
                {"name": "prose", "model": teacher_model(str(out / "teacher_b" / "teacher" / "model.safetensors"))},
            ]
            cfg["distill"] = {**base["distill"], "feature_teacher": "code", "combine": {"rule": "mean"}}
        else:
            cfg["teacher"] = {"model": teacher_model(args.teacher_a)}
    path = out / "configs" / f"{step}-seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def perplexity_on(out: Path, model, held: str) -> float:
    """``model``'s held-out perplexity on one domain's file (the task's own evaluation)."""
    import torch

    from distilflow.config import load_config
    from distilflow.tasks.causal_lm_workload import CausalLMWorkload

    # The demo's models; the data: that file alone, as the held-out set (its rows, the run's tokenizer).
    given = [
        f"data.text.path={out / held}",
        f"data.text.test_path={out / held}",
        f"data.text.tokenizer={tokenizer_folder()}",
    ]
    cfg = load_config(STDLIB, ["threads=1", "data.source=text", "data.stdlib=null", *given])
    work = CausalLMWorkload(cfg, torch.device("cpu"))
    return work.task("student", cfg.student.train, 0).evaluate(model)["perplexity"]


def score(out: Path, model, where: Path) -> dict:
    scores = {
        "code": perplexity_on(out, model, "held_code.jsonl"),
        "prose": perplexity_on(out, model, "held_prose.jsonl"),
    }
    where.write_text(json.dumps(scores))
    return scores


def run_step(out: Path, step: str, seed: int, args: argparse.Namespace) -> None:
    from distilflow.config import load_config
    from distilflow.pipeline import baseline_stage, distill_stage, open_run
    from distilflow.teacher_stages import teacher_stage, teachers_stage

    if step == "teacher_b":
        target = out / "teacher_b" / "scores.json"
    else:
        target = out / step / f"seed{seed}" / "scores.json"
    if target.is_file():
        print(f"{step} seed {seed}: finished, skipped")
        return
    run = open_run(load_config(config_of(out, step, seed, args)))
    if step == "teacher_b":
        model, _ = teacher_stage(run, log_tensorboard=False)
    elif step == "routed":
        models = [m for m, _ in teachers_stage(run, log_tensorboard=False)]
        model, _ = distill_stage(run, models, log_tensorboard=False)
    else:
        teacher, _ = teacher_stage(run, log_tensorboard=False)
        if step == "ce":
            model, _ = baseline_stage(run, log_tensorboard=False, teacher=teacher)
        else:
            model, _ = distill_stage(run, teacher, log_tensorboard=False)
    print(f"{step} seed {seed}: {score(out, model, target)}")


def teacher_a_scores(out: Path, checkpoint: str) -> dict:
    target = out / "teacher_a_scores.json"
    if not target.is_file():
        import torch

        from distilflow.config import load_config
        from distilflow.models.build import load_weights
        from distilflow.tasks.causal_lm_workload import CausalLMWorkload

        cfg = load_config(STDLIB, ["threads=1"])
        model = CausalLMWorkload(cfg, torch.device("cpu")).new_model("teacher")
        load_weights(model, Path(checkpoint), "teacher")
        score(out, model.eval(), target)
    return json.loads(target.read_text())


def table(out: Path, seeds: list[int], args: argparse.Namespace) -> str:
    lines = ["| model | held-out code perplexity | held-out prose perplexity | seeds |", "|---|---:|---:|---|"]
    a = teacher_a_scores(out, args.teacher_a)
    lines.append(f"| teacher A (code; the demo teacher) | {a['code']:.2f} | {a['prose']:.2f} | - |")
    b_path = out / "teacher_b" / "scores.json"
    if b_path.is_file():
        b = json.loads(b_path.read_text())
        lines.append(f"| teacher B (prose, {args.teacher_b_steps} steps) | {b['code']:.2f} | {b['prose']:.2f} | - |")
    labels = {
        "routed": "student, routed (A for code rows, B for prose rows)",
        "one": "student, one teacher (A) for all",
        "ce": "student, CE only",
    }
    for case in CASES:
        found = [
            (s, json.loads(p.read_text())) for s in seeds if (p := out / case / f"seed{s}" / "scores.json").is_file()
        ]
        if not found:
            continue

        stats = {}
        for domain in ("code", "prose"):
            values = [r[domain] for _, r in found]
            std = sample_std(values)
            stats[domain] = f"{statistics.mean(values):.2f} +- {std:.2f}"
        lines.append(f"| {labels[case]} | {stats['code']} | {stats['prose']} | {[s for s, _ in found]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-a", required=True, help="a trained teacher of configs/lm_stdlib.yaml")
    parser.add_argument("--out", default="runs/bench-lm-routing")
    parser.add_argument("--step", choices=["prepare", "teacher_b", *CASES])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--teacher-b-steps", type=int, default=400)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.step == "prepare":
        prepare(out)
    elif args.step == "teacher_b":
        run_step(out, "teacher_b", 0, args)
    elif args.step:
        for seed in args.seeds:
            run_step(out, args.step, seed, args)
    if args.table:
        print(table(out, args.seeds, args))


if __name__ == "__main__":
    main()
