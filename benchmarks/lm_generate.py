"""Generation speed of a realistic student shape: eager transformers ``generate`` vs ONNX Runtime GenAI.

The LM demo's student has about 0.8M parameters, where fixed per-call costs dominate; this builds a
Llama- (or Qwen2-) shaped student of >= 50M parameters from a transformers config (random
initialisation: speed and size do not depend on the weights; quality is measured on the trained demo
student by ``distilflow bench RUN_DIR deploy.genai.enabled=true``), exports it through ONNX Runtime
GenAI in fp32, int8 and int4, and measures every variant side by side in this process with the same
threads (distilflow.deploy.lm_bench: prefill latency, decode tokens/s at batch 1 and 8, peak RSS of a
child process, size on disk).

    python benchmarks/lm_generate.py --threads 2 --json /tmp/lm_generate.json
    # a trained model folder instead (quality too: perplexity on the stdlib demo's held-out rows)
    python benchmarks/lm_generate.py --model runs/lm_stdlib/student/hf --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from distilflow.config import GenaiConfig
from distilflow.data.stdlib_corpus import stdlib_root, train_tokenizer
from distilflow.deploy import lm_bench
from distilflow.deploy.genai import MANIFEST, build, weight_summary
from distilflow.models.hf import build_causal_lm

SHAPES = {
    # configs/lm_stdlib.yaml's student (about 0.8M parameters, 2048-token vocabulary), for its speed ratios.
    "demo": {
        "model_type": "llama",
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    },
    # ~58M parameters: 32k vocabulary (untied embedding and head: 2 x 16.4M), 8 layers of width 512,
    # grouped-query attention with 4 KV heads of 64: the proportions of small Llama-family models.
    "llama": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        "model_type": "qwen2",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
}


def make_student(shape: str, folder: Path) -> int:
    """Save a random-init student of ``shape`` with a tokenizer (the builder copies it); its parameter count."""
    tokenizer_dir = folder.parent / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py")]
        train_tokenizer(texts, 512, tokenizer_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    config = {**SHAPES[shape], "bos_token_id": 2, "eos_token_id": 0, "pad_token_id": 1}
    model = build_causal_lm(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def stdlib_held_out(tokenizer_dir: Path, rows: int, seq_len: int = 128) -> dict[str, np.ndarray]:
    """The LM demo's held-out rows (data.stdlib.eval_chars 200000, packed rows of seq_len), the first ``rows``."""
    from transformers import AutoTokenizer

    from distilflow.data.stdlib_corpus import load_stdlib_corpus
    from distilflow.data.text import Record, tokenize

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    corpus = load_stdlib_corpus(train_chars=1, eval_chars=200_000)
    data = tokenize([Record(completion=t) for t in corpus.eval], tokenizer, seq_len=seq_len, pack=True)
    return {k: v[:rows].numpy() for k, v in data.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--work", default="/tmp/distilflow-lm-generate", help="folder for the models")
    parser.add_argument("--json", default=None, help="write the table and settings here")
    parser.add_argument("--model", default=None, help="a trained Hugging Face folder instead of a random --shape")
    parser.add_argument("--reuse", action="store_true", help="keep models already built in --work (same settings)")
    parser.add_argument("--eval-rows", type=int, default=128, help="--model: held-out rows scored for perplexity")
    args = parser.parse_args(argv)

    work = Path(args.work)
    began = time.perf_counter()
    if args.model:
        hf_dir, name = Path(args.model), "model"
        params = sum(v.size for v in load_file(str(hf_dir / "model.safetensors")).values())
    else:
        hf_dir, name = work / f"{args.shape}-hf", args.shape
        params = make_student(args.shape, hf_dir) if not (args.reuse and hf_dir.is_dir()) else None
    cfg = GenaiConfig(enabled=True, block_size=args.block_size)
    folders = {}
    for p in args.precisions:
        folder = work / f"{name}-genai-{p}"
        reuse = args.reuse and (folder / MANIFEST).is_file()
        folders[p] = folder if reuse else build(hf_dir, folder, p, cfg)
    if params is None:
        params = sum(v.size for v in load_file(str(hf_dir / "model.safetensors")).values())
    print(f"{hf_dir}: {params / 1e6:.2f}M parameters; built in {time.perf_counter() - began:.0f} s")

    data = stdlib_held_out(hf_dir, args.eval_rows) if args.model else None
    if data is not None:
        prompts = {b: lm_bench.prompt_rows(data, b, args.prompt_tokens) for b in lm_bench.BATCH_SIZES}
    else:  # random ids in the tokenizer's range: the speed of a random-init model does not depend on them
        rng = np.random.default_rng(0)
        prompts = {b: rng.integers(3, 500, size=(b, args.prompt_tokens)) for b in lm_bench.BATCH_SIZES}
    variants = [lm_bench.torch_variant("torch_eager", hf_dir, args.threads)]
    variants += [lm_bench.genai_variant(f"genai_{p}", folder, args.threads) for p, folder in folders.items()]
    table = lm_bench.benchmark_generation(
        variants, data, prompts=prompts, new_tokens=args.new_tokens, repeats=args.repeats
    )
    text = lm_bench.markdown(table, threads=args.threads, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens)
    print(text)
    base = table["torch_eager"]
    for name, row in table.items():
        if name == "torch_eager":
            continue
        print(
            f"{name}: {base['size_bytes'] / row['size_bytes']:.2f}x smaller than fp32 safetensors, decode "
            f"{row['decode_tokens_per_s_b1'] / base['decode_tokens_per_s_b1']:.2f}x (b1) "
            f"{row['decode_tokens_per_s_b8'] / base['decode_tokens_per_s_b8']:.2f}x (b8) eager generate"
        )
    if args.json:
        summaries = {f"genai_{p}": weight_summary(f) for p, f in folders.items()}
        shape = json.loads((hf_dir / "config.json").read_text())
        out = {"settings": vars(args), "params": params, "shape": shape, "variants": table}
        Path(args.json).write_text(json.dumps({**out, "weights": summaries}, indent=2) + "\n")
        print(f"JSON in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
