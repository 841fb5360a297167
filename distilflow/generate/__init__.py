"""Teacher-written training data: prompts -> sampled completions -> filters and verifier -> JSONL.

``prompts`` reads prompt sets, ``backends`` samples completions (transformers ``generate`` with a
KV cache, or vLLM when installed), ``verify`` filters and checks them, ``writer`` appends kept
samples to a resumable JSONL file, and ``runner`` ties them together for ``distilflow generate``.
"""
