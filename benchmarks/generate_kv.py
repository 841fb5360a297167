"""Generation speed with the KV cache vs re-running the whole sequence for every new token.

Both variants run transformers ``generate`` on the same random Llama (the size of the stdlib demo
teacher unless told otherwise), the same prompts and exactly ``--new-tokens`` new tokens (end of
text suppressed), greedy; only ``use_cache`` differs. Repeats alternate between the variants so
that both see the same machine load; the median time is reported.

    python benchmarks/generate_kv.py --json runs/bench/generate_kv.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distilflow.data.stdlib_corpus import tiny_llama_config
from distilflow.models.hf import build_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    positions = args.prompt_tokens + args.new_tokens
    model = build_causal_lm(
        tiny_llama_config(args.vocab, hidden=args.hidden, layers=args.layers, max_positions=positions)
    )
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for batch in args.batch_sizes:
        prompt = torch.randint(3, args.vocab, (batch, args.prompt_tokens))
        times: dict[bool, list[float]] = {True: [], False: []}
        outputs = {}
        for _ in range(args.repeats):
            for use_cache in (True, False):
                began = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(
                        input_ids=prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        use_cache=use_cache,
                        pad_token_id=1,
                    )
                times[use_cache].append(time.perf_counter() - began)
                outputs[use_cache] = out
        same = bool(torch.equal(outputs[True], outputs[False]))
        tokens = batch * args.new_tokens
        cached, uncached = statistics.median(times[True]), statistics.median(times[False])
        rows.append(
            {
                "batch": batch,
                "new_tokens": args.new_tokens,
                "kv_cache_tokens_per_s": round(tokens / cached, 1),
                "no_cache_tokens_per_s": round(tokens / uncached, 1),
                "speedup": round(uncached / cached, 2),
                "same_tokens": same,
            }
        )
    print(
        f"Llama {params / 1e6:.2f}M params (hidden {args.hidden}, {args.layers} layers), prompt {args.prompt_tokens} "
        f"tokens, {args.new_tokens} new tokens, greedy, {args.threads} thread(s), median of {args.repeats}"
    )
    print("| batch | KV cache tokens/s | no cache tokens/s | speedup | same tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['kv_cache_tokens_per_s']} | {r['no_cache_tokens_per_s']} | {r['speedup']}x | "
            f"{r['same_tokens']} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"params": params, "args": vars(args) | {"json": str(args.json)}, "rows": rows})
        )


if __name__ == "__main__":
    main()
