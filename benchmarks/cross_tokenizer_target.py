"""How good is the hybrid's target? The aligned teacher target scored on the student's own next tokens.

    python benchmarks/cross_tokenizer_target.py --teacher PATH [--rows N] [--out DIR] [key=value ...]

The config is configs/lm_stdlib_cross_tokenizer.yaml at full length (threads=1); ``key=value`` overrides it
(e.g. ``data.stdlib.student_tokenizer=bpe data.stdlib.student_vocab_size=4096``). No training: the given
teacher runs on its own ids of the held-out rows, aligned as a run aligns them.

For each aligned group (a span the student spells ``s_1 .. s_m`` and the teacher ``t_1 .. t_n``) the
hybrid's exact part (losses/uld.py) compares two bucket distributions: each shared id's merged value
``p(y | context) * prod p(later tokens)`` and one rest bucket. The student's actual span sits in the
bucket of ``s_1``: its merged value is the student's probability of the span. The teacher's value in that
bucket is what the loss asks the student to give its actual span: ``q_teacher(map(s_1))`` when ``s_1`` is
shared, else the teacher's rest bucket. Scored as a code length in bits per character (the group's
characters), next to the teacher's own probability of the span (chain rule over its tokens). Categories:

- ``1:1 same token``: one token on each side, shared: the teacher's value is its probability of the span.
- ``multi, same first token``: ``s_1`` and ``t_1`` spell the same text: the value is the span's probability.
- ``s_1 shared, t_1 another``: the bucket of ``s_1`` holds ``p_teacher(s_1 as a token) * teacher continuation``,
  the probability of no event; the teacher's span mass sits in ``t_1``'s bucket.
- ``s_1 unshared (rest)``: the bucket is the teacher's rest, ``c u + 1 - c`` (``u`` the teacher's unshared
  mass, ``c`` its continuation probability), which is near 0 when the teacher is sure of its continuation.

``misplaced``: the mean teacher span probability that sits in a shared bucket whose student token is not
``s_1`` (the KL asks the student to move that mass off its actual token). A check of the loss itself: the
hybrid's exact part (``hybrid_loss`` with a random student) against these buckets computed here, group by
group in float64.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distilflow.config import load_config
from distilflow.data.aligned_rows import alignment_from_rows
from distilflow.losses.uld import hybrid_loss
from distilflow.pipeline import open_run
from distilflow.teacher_stages import teacher_stage
from distilflow.teachers.cross_tokenizer import teacher_logits

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lm_stdlib_cross_tokenizer.yaml"
CATEGORIES = ("1:1 same token", "multi, same first token", "s_1 shared, t_1 another", "s_1 unshared (rest)")
LN2 = math.log(2)


def token_log_probs(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: log-probability of token ``p`` from shifted log-probs (row ``p - 1``); 0 at position 0."""
    out = torch.zeros(ids.shape, dtype=log_p.dtype)
    out[:, 1:] = log_p.gather(-1, ids[:, 1:, None])[..., 0]
    return out


def span_sums(values: torch.Tensor, batch: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``sum(values[b, first..last])`` per group (inclusive), ``(G,)``."""
    sums = torch.cat([torch.zeros(values.shape[0], 1, dtype=values.dtype), values.cumsum(1)], 1)
    return sums[batch, last + 1] - sums[batch, first]


def sides(log_p: torch.Tensor, ids: torch.Tensor, batch, first, last):
    """Per group: base log-probs ``(G, V)`` at the first token, log continuation ``(G,)``, span log-prob ``(G,)``."""
    tokens = token_log_probs(log_p, ids)
    span = span_sums(tokens, batch, first, last)
    return log_p[batch, first - 1], span - tokens[batch, first], span


def buckets(base: torch.Tensor, cont: torch.Tensor, shared: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The hybrid's bucket probabilities ``(G, K + 1)`` of one side, float64: merged shared values, rest."""
    c = cont.exp()[:, None]
    merged = base.exp() * c
    unshared = base[:, other].exp().sum(-1, keepdim=True) if other.numel() else torch.zeros_like(c)
    return torch.cat([merged[:, shared], c * unshared + 1 - c], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a trained teacher's model.safetensors")
    parser.add_argument("--rows", type=int, default=0, help="held-out rows to score (0: all)")
    parser.add_argument("--out", default="runs/xtok-target")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    given = ["threads=1", "deploy.enabled=false", "distill.cross_tokenizer=hybrid", *args.overrides]
    cfg = load_config(CONFIG, [*given, f"output_dir={args.out}", f"teacher.model.checkpoint={args.teacher}"])
    started = time.time()
    run = open_run(cfg)
    teacher, result = teacher_stage(run, log_tensorboard=False)  # its eval on this config's held-out text
    work = run.work
    vocab_map = work.aligned_kd.vocab_map
    v_s, v_t = len(work.tokenizer), len(work.teacher_tokenizer)
    s2t = torch.full((v_s,), -1, dtype=torch.long)
    s2t[vocab_map.student_ids] = vocab_map.teacher_ids
    t2s = torch.full((v_t,), -1, dtype=torch.long)
    t2s[vocab_map.teacher_ids] = vocab_map.student_ids
    print(f"teacher (xtok held-out, its own tokens): {result}")
    print(f"vocabularies: student {v_s}, teacher {v_t}, shared {vocab_map.teacher_ids.numel()}", flush=True)
    held = work.held_out
    rows = len(held["input_ids"]) if args.rows <= 0 else min(args.rows, len(held["input_ids"]))
    stats = {name: torch.zeros(6, dtype=torch.float64) for name in CATEGORIES}  # groups, tokens, chars, -ln target,
    # -ln teacher span, misplaced span mass
    other_t = torch.nonzero(t2s < 0)[:, 0]
    other_s = torch.nonzero(s2t < 0)[:, 0]
    chars_differ, rest_mass, checked = 0, 0.0, None
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, rows, 16):
            batch = {k: v[start : min(start + 16, rows)] for k, v in held.items()}
            al = alignment_from_rows(batch)
            log_p = F.log_softmax(teacher_logits(teacher, batch).double(), -1)  # (B, T_t - 1, V_t)
            g, ts, ss = al.batch, al.teacher, al.student
            base, cont, span = sides(log_p, ts.input_ids, g, ts.first, ts.last)
            s1, t1 = ss.input_ids[g, ss.first], ts.input_ids[g, ts.first]
            n_s, n_t = ss.last - ss.first + 1, ts.last - ts.first + 1
            chars = span_sums(batch["chars"].double(), g, ss.first, ss.last)
            chars_differ += int((chars != span_sums(batch["teacher_chars"].double(), g, ts.first, ts.last)).sum())
            teacher_b = buckets(base, cont, vocab_map.teacher_ids, other_t)  # (G, K + 1)
            rest_mass += float(teacher_b[:, -1].sum())
            mapped = s2t[s1]
            bucket = torch.where(mapped >= 0, torch.searchsorted(vocab_map.teacher_ids, mapped.clamp(min=0)), -1)
            bucket = torch.where(mapped >= 0, bucket, teacher_b.shape[1] - 1)
            target = teacher_b.gather(1, bucket[:, None])[:, 0]
            one = (n_s == 1) & (n_t == 1)
            same = mapped == t1
            category = torch.where(same & one, 0, torch.where(same, 1, torch.where(mapped >= 0, 2, 3)))
            misplaced = torch.where((t2s[t1] >= 0) & (t2s[t1] != s1), span.exp(), torch.zeros_like(span))
            for index, name in enumerate(CATEGORIES):
                pick = category == index
                stats[name] += torch.stack(
                    [
                        pick.sum().double(),
                        n_s[pick].sum().double(),
                        chars[pick].sum(),
                        -target[pick].clamp(min=1e-300).log().sum(),
                        -span[pick].sum(),
                        misplaced[pick].sum(),
                    ]
                )
            if checked is None:  # the loss's exact part against these buckets, a random student
                student = torch.randn(*ss.input_ids.shape[:1], ss.input_ids.shape[1] - 1, v_s, generator=generator)
                s_log_p = F.log_softmax(student.double(), -1)
                s_base, s_cont, _ = sides(s_log_p, ss.input_ids, g, ss.first, ss.last)
                student_b = buckets(s_base, s_cont, vocab_map.student_ids, other_s)
                reference = (teacher_b * (teacher_b.clamp(min=1e-300).log() - student_b.log())).sum()
                loss = hybrid_loss(student, log_p.float(), al, vocab_map, unmatched_weight=0.0).matched
                checked = (float(loss), float(reference))
    total = sum(stats.values())
    print(f"\n{rows} held-out rows, {int(total[0])} groups, {int(total[1])} student tokens, {int(total[2])} characters")
    print(f"groups whose two sides' characters differ: {chars_differ}")
    print(f"mean teacher rest bucket: {rest_mass / total[0]:.3f}")
    print(f"loss check (exact part, random student): hybrid_loss {checked[0]:.6g} vs reference {checked[1]:.6g}")
    print(
        f"\n{'category':<26} {'groups':>7} {'tokens':>7} {'chars':>7} {'target b/c':>11} {'teacher b/c':>12} "
        f"{'misplaced':>10}"
    )
    for name, row in [*stats.items(), ("all", total)]:
        frac = row[:3] / total[:3]
        target_bpc, teacher_bpc = row[3] / LN2 / max(row[2], 1), row[4] / LN2 / max(row[2], 1)
        print(
            f"{name:<26} {frac[0]:>7.3f} {frac[1]:>7.3f} {frac[2]:>7.3f} {target_bpc:>11.4f} {teacher_bpc:>12.4f} "
            f"{row[5] / max(row[0], 1):>10.3f}"
        )
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
