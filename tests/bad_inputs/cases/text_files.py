"""Text data of causal LMs (data.source text): .txt, .jsonl, .parquet and .csv files and folders."""

from __future__ import annotations

from ..case import LINES, case, jsonl, run_text


def parquet(**columns):
    """A maker writing ``columns`` (name -> list of values) as a parquet file."""

    def make(path, kit) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), str(path))

    return make


GOOD = "1+2=3\n" * 40
TXT = run_text("$dir/t.txt")
JSONL = run_text("$dir/t.jsonl")
PARQUET = run_text("$dir/t.parquet")

CASES = [
    case("text-missing-file", TXT, "t.txt' does not exist"),
    case("text-empty-txt", TXT, "no usable records", {"t.txt": ""}),
    case("text-whitespace-txt", TXT, "no usable records", {"t.txt": "  \n\n\t\n"}),
    case("text-wrong-suffix", run_text("$dir/t.md"), "has suffix '.md'", {"t.md": GOOD}),
    case(
        "text-empty-folder",
        run_text("$dir/corpus"),
        "has no .txt, .jsonl, .parquet, .csv files",
        {"corpus/readme.md": "x"},
    ),
    case(
        "text-too-short-to-pack",
        [*JSONL, "data.text.seq_len=60"],
        "packing needs at least seq_len=60 tokens",
        {"t.jsonl": jsonl(*[{"text": "1"}] * 5)},
    ),
    case(
        "text-test-path-missing",
        [*TXT, "data.text.test_path=$dir/held.txt"],
        "held.txt' does not exist",
        {"t.txt": GOOD},
    ),
    case(
        "text-seq-len-over-positions",
        [*JSONL, "data.text.seq_len=100"],
        "longer than the model's maximum of 64",
        {"t.jsonl": jsonl(*[{"text": GOOD}] * 10)},
    ),
    case("text-tokenizer-missing", [*TXT, "data.text.tokenizer=$dir/tok"], "tok' does not exist", {"t.txt": GOOD}),
    case(
        "text-tokenizer-empty-folder",
        [*TXT, "data.text.tokenizer=$dir/tok"],
        "has no tokenizer",
        {"t.txt": GOOD, "tok/readme.md": "x"},
    ),
    case(
        "text-tokenizer-broken-json",
        [*TXT, "data.text.tokenizer=$dir/tok"],
        "could not be loaded",
        {"t.txt": GOOD, "tok/tokenizer.json": "{not json", "tok/tokenizer_config.json": "{}"},
    ),
    case(
        "text-vocab-over-embeddings",
        [*JSONL, "student.model.hf.config.vocab_size=10"],
        "embeds only 10 tokens but the tokenizer has 18",
        {"t.jsonl": LINES},
    ),
    # jsonl
    case("jsonl-empty", JSONL, "no usable records", {"t.jsonl": ""}),
    case("jsonl-not-json", JSONL, "t.jsonl: line 2 is not valid JSON", {"t.jsonl": jsonl({"text": GOOD}, "{oops")}),
    case("jsonl-array-line", JSONL, "line 1 is a JSON list, not an object", {"t.jsonl": jsonl([1, 2])}),
    case("jsonl-no-fields", JSONL, "line 1 has no usable field", {"t.jsonl": jsonl({"body": GOOD})}),
    case("jsonl-text-not-string", JSONL, "line 1 has no usable field", {"t.jsonl": jsonl({"text": 5})}),
    case(
        "jsonl-prompt-without-completion",
        JSONL,
        "'prompt' and 'completion' must both be strings",
        {"t.jsonl": jsonl({"prompt": "1+1="})},
    ),
    case(
        "jsonl-messages-not-list", JSONL, "'messages' is not a non-empty list", {"t.jsonl": jsonl({"messages": "hi"})}
    ),
    case(
        "jsonl-messages-last-user",
        JSONL,
        "it must be 'assistant'",
        {"t.jsonl": jsonl({"messages": [{"role": "user", "content": "1+1"}]})},
    ),
    case(
        "jsonl-message-without-content",
        JSONL,
        "needs string 'role' and 'content'",
        {"t.jsonl": jsonl({"messages": [{"role": "user"}]})},
    ),
    case(
        "jsonl-messages-no-chat-template",
        JSONL,
        "need a tokenizer with a chat_template",
        {
            "t.jsonl": jsonl(
                *[{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 20
            )
        },
    ),
    case("jsonl-not-utf8", JSONL, "is not UTF-8 text", {"t.jsonl": b'{"text": "\xff\xfe"}\n'}),
    case(
        "jsonl-all-bad-lines-skipped",
        [*JSONL, "data.text.on_error=skip"],
        "2 bad lines skipped",
        {"t.jsonl": jsonl("nope", "{}")},
    ),
    case("jsonl-on-error-unknown", [*JSONL, "data.text.on_error=ignore"], "data.text.on_error"),
    # parquet and csv (read by datasets)
    case("parquet-garbage", PARQUET, "could not be read as parquet", {"t.parquet": b"PAR1 not really PAR1"}),
    case("parquet-no-fields", PARQUET, "row 1 has no usable field", {"t.parquet": parquet(body=["a", "b"])}),
    case("parquet-text-numbers", PARQUET, "row 1 has no usable field", {"t.parquet": parquet(text=[1, 2])}),
    case("parquet-empty-table", PARQUET, "no usable records", {"t.parquet": parquet(text=[])}),
    case("text-csv-no-fields", run_text("$dir/t.csv"), "row 1 has no usable field", {"t.csv": "body\nabc\n"}),
    case(
        "text-csv-ragged",
        run_text("$dir/t.csv"),
        "could not be read as csv",
        {"t.csv": 'text,other\n"1+1",2\n"2+2",3,4,5\n'},
    ),
]
