"""Regenerate configs/mnist1d.yaml and the reference block of docs/CONFIG.md from the config classes.

    python scripts/gen_config_docs.py

tests/test_shipped_configs.py fails when either file is out of date.
"""

from pathlib import Path

from distilflow.config import Config, describe

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# The built-in default config of 'distilflow run' (MNIST-1D: 1-D CNN teacher -> MLP student),\n"
    "# written out with every key. Regenerate with: python scripts/gen_config_docs.py\n"
)
BEGIN, END = "<!-- reference: begin -->", "<!-- reference: end -->"


def reference_block() -> str:
    return f"{BEGIN}\n```yaml\n{describe(Config())}\n```\n{END}"


def main() -> None:
    (ROOT / "configs" / "mnist1d.yaml").write_text(HEADER + describe(Config()) + "\n")
    doc = ROOT / "docs" / "CONFIG.md"
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + reference_block() + text[end:])


if __name__ == "__main__":
    main()
