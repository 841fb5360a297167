"""``distilflow generate``: prompt files, verifiers, the model folder and the output file."""

from __future__ import annotations

from ..case import case, generate, jsonl

PROMPTS = "generate.prompts=$dir/p.jsonl"
GOOD = {"p.jsonl": jsonl({"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"})}
GEN = generate(PROMPTS, "generate.output=$out/gen.jsonl")


def verifier(name: str) -> tuple[str, ...]:
    return (*GEN, f"generate.verifier=bad_inputs.verifiers:{name}")


CASES = [
    # prompt files
    case("prompts-not-set", generate(), "'generate.prompts' is not set"),
    case("prompts-missing", GEN, "p.jsonl' does not exist"),
    case("prompts-is-a-folder", GEN, "p.jsonl' does not exist", {"p.jsonl/x": "y"}),
    case("prompts-empty", GEN, "has no usable prompt", {"p.jsonl": ""}),
    case("prompts-not-json", GEN, "p.jsonl: line 2 is not valid JSON", {"p.jsonl": jsonl({"prompt": "1+1="}, "{x")}),
    case("prompts-list-line", GEN, "line 1 is a JSON list, not an object", {"p.jsonl": jsonl([1])}),
    case("prompts-no-field", GEN, "line 1 has no usable field", {"p.jsonl": jsonl({"question": "1+1="})}),
    case("prompts-empty-prompt", GEN, "line 1 has no usable field", {"p.jsonl": jsonl({"prompt": "  "})}),
    case(
        "prompts-answer-a-list",
        GEN,
        "'answer' must be a string or a number",
        {"p.jsonl": jsonl({"prompt": "1+1=", "answer": [2]})},
    ),
    case(
        "prompts-id-a-float",
        GEN,
        "'id' must be a string or an integer",
        {"p.jsonl": jsonl({"prompt": "1+1=", "id": 1.5})},
    ),
    case(
        "prompts-messages-end-with-assistant",
        GEN,
        "a prompt ends with a user (or system) message",
        {"p.jsonl": jsonl({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]})},
    ),
    case("prompts-not-utf8", GEN, "is not UTF-8 text", {"p.jsonl": b'{"prompt": "\xff"}\n'}),
    case("prompts-all-skipped", [*GEN, "generate.on_error=skip"], "2 bad lines skipped", {"p.jsonl": jsonl("x", [])}),
    case(
        "prompts-chat-without-template",
        [*GEN, "generate.chat_template=true"],
        "need a tokenizer with a chat_template",
        GOOD,
    ),
    case("prompts-too-long-for-the-model", GEN, "64", {"p.jsonl": jsonl({"prompt": "1+" * 40})}),
    # settings
    case("generate-n-zero", [*GEN, "generate.n=0"], "'generate.n': 0"),
    case("generate-bad-format-regex", [*GEN, "generate.format=(unclosed"], "'generate.format'"),
    case("generate-bad-answer-regex", [*GEN, "generate.answer_pattern='[a-'"], "'generate.answer_pattern'"),
    case("generate-top-p-zero", [*GEN, "generate.top_p=0"], "'generate.top_p'"),
    case(
        "generate-max-tokens-below-min",
        [*GEN, "generate.min_tokens=5", "generate.max_tokens=2"],
        "'generate.max_tokens'",
    ),
    case("generate-vllm-missing", [*GEN, "generate.backend=vllm"], "vllm", GOOD),
    # verifiers
    case("verifier-unknown-name", [*GEN, "generate.verifier=exakt"], "'generate.verifier': 'exakt'"),
    case("verifier-module-missing", [*GEN, "generate.verifier=no_such_module:check"], "cannot be imported", GOOD),
    case("verifier-function-missing", verifier("nothing"), "has no function 'nothing'", GOOD),
    case("verifier-not-callable", verifier("NOT_A_FUNCTION"), "has no function 'NOT_A_FUNCTION'", GOOD),
    case("verifier-positional-only", verifier("positional_only"), "accepts none of", GOOD),
    case("verifier-unknown-parameters", verifier("unknown_names"), "'text'", GOOD),
    case("verifier-no-parameters", verifier("no_parameters"), "accepts none of", GOOD),
    # keep_truncated: the tiny random model's completions are all cut by max_new_tokens; kept, they reach the verifier
    case(
        "verifier-raises-on-every-sample",
        [*verifier("always_raises"), "generate.keep_truncated=true"],
        "raised on every sample of the first batch",
        GOOD,
    ),
    # the model and the output
    case("generate-model-missing", [*GEN, "generate.model=$dir/model"], "does not exist or is not a directory", GOOD),
    case("generate-no-model-at-all", ["generate", PROMPTS, "output_dir=$out"], "no model to generate with", GOOD),
    case(
        "generate-output-is-a-folder",
        generate(PROMPTS, "generate.output=$dir/gen"),
        "is a folder",
        {**GOOD, "gen/keep.txt": "mine"},
    ),
    # checked before the model is loaded: the model folder named here does not even exist
    case(
        "generate-output-folder-before-the-model",
        generate(PROMPTS, "generate.output=$dir/gen", "generate.model=$dir/no-model"),
        "is a folder",
        {**GOOD, "gen/keep.txt": "mine"},
    ),
    case(
        "generate-output-progress-is-a-folder",
        generate(PROMPTS, "generate.output=$dir/gen.jsonl"),
        "is a folder",
        {**GOOD, "gen.jsonl.progress/x": "mine"},
    ),
    case(
        "generate-output-under-a-file",
        generate(PROMPTS, "generate.output=$dir/f/gen.jsonl"),
        "is a file",
        {**GOOD, "f": "mine"},
    ),
]
