"""Where the time of one served-teacher batch goes: the HTTP round trip (vLLM's forward, its
log-prob gathering and detokenization, JSON both ways), the client's parsing, against the same
model's forward in this process. Side by side in one run; a probe for wiring the served teacher into
the training loop (issue 19), not a target check.

Start a server first (tiny model, or any model folder), e.g. with the venv of scripts/vllm_venv.sh:

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1 \\
      .vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name teacher \\
      --host 127.0.0.1 --port 8011 --dtype float32 --max-model-len 256 --max-logprobs 64 --enforce-eager

    OMP_NUM_THREADS=1 python benchmarks/served_teacher_latency.py --url http://127.0.0.1:8011 --model-dir DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

import torch
from transformers import AutoModelForCausalLM

from distilflow.teachers.served_client import TeacherClient, parse_prompt_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--model", default=None, help="served name (default: the only one)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype=torch.float32).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (args.rows, args.seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    teacher = TeacherClient(args.url, model=args.model, top_k=args.k, timeout_s=600)
    teacher.check()
    teacher.topk(input_ids, attention_mask)  # warm-up (vLLM compiles its rank count on first use)
    prompts = input_ids.tolist()
    payload = {"model": teacher.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0}
    payload["prompt_logprobs"] = args.k
    data = json.dumps(payload).encode()
    round_trip, parse, local, size = [], [], [], 0
    for _ in range(args.repeats):
        began = time.perf_counter()
        request = urllib.request.Request(args.url + "/v1/completions", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            raw = response.read()
        round_trip.append(time.perf_counter() - began)
        size = len(raw)
        began = time.perf_counter()
        parse_prompt_logprobs(json.loads(raw), prompts, args.k)
        parse.append(time.perf_counter() - began)
        began = time.perf_counter()
        with torch.no_grad():
            torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1).topk(args.k)
        local.append(time.perf_counter() - began)
    med = statistics.median
    print(f"batch {args.rows} x {args.seq_len} tokens, k={args.k}, vocab {vocab}, {args.repeats} repeats (median)")
    print(f"  HTTP round trip (server forward + logprobs + JSON): {med(round_trip) * 1e3:8.1f} ms")
    print(f"  client JSON decode + parse to tensors:              {med(parse) * 1e3:8.1f} ms")
    print(f"  local forward + log_softmax + topk (1 thread):      {med(local) * 1e3:8.1f} ms")
    print(f"  response size: {size / 1e6:.2f} MB ({size / (args.rows * (args.seq_len - 1)):.0f} bytes per position)")
    print(f"  served / local: {(med(round_trip) + med(parse)) / med(local):.1f}x")


if __name__ == "__main__":
    main()
