"""Regenerate configs/mnist1d.yaml and the reference blocks of docs/CONFIG.md from the config classes.

    python scripts/gen_config_docs.py

tests/test_shipped_configs.py fails when either file is out of date.
"""

from pathlib import Path

from distilflow.config import (
    AdaptiveConfig,
    CNNConfig,
    CombineConfig,
    FactoryConfig,
    FilesConfig,
    HFConfig,
    MLPConfig,
    MNIST1DConfig,
    NamedTeacherConfig,
    StdlibConfig,
    StudentHFConfig,
    TeacherServerConfig,
    TextConfig,
    describe,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
HEADER = (
    "# The built-in default config of 'distilflow run' (MNIST-1D: 1-D CNN teacher -> MLP student),\n"
    "# written out with every key. Regenerate with: python scripts/gen_config_docs.py\n"
)
BEGIN, END = "<!-- reference: begin -->", "<!-- reference: end -->"
SECTIONS_BEGIN, SECTIONS_END = "<!-- sections: begin -->", "<!-- sections: end -->"
# Every model-kind and data-source section with its defaults: what a config of that kind holds.
SECTIONS = [
    ("teacher.model.mlp / student.model.mlp", "arch: mlp", "mlp", MLPConfig()),
    ("teacher.model.cnn / student.model.cnn", "arch: cnn1d or cnn2d", "cnn", CNNConfig()),
    ("teacher.model.factory / student.model.factory", "arch: 'module.path:factory'", "factory", FactoryConfig()),
    ("teacher.model.hf", "arch: hf", "hf", HFConfig()),
    ("student.model.hf", "arch: hf (a student may start from teacher layers)", "hf", StudentHFConfig()),
    ("data.mnist1d", "source: mnist1d", "mnist1d", MNIST1DConfig()),
    ("data.files", "source: npz or csv", "files", FilesConfig()),
    ("data.text", "source: text", "text", TextConfig()),
    ("data.stdlib", "source: stdlib", "stdlib", StdlibConfig()),
    ("teacher.server", "a teacher served by vLLM", "server", TeacherServerConfig()),
    ("teachers (each entry; docs/MULTI_TEACHER.md)", "instead of teacher:", "teachers[i]", NamedTeacherConfig()),
    ("distill.combine", "with teachers:", "combine", CombineConfig()),
    ("distill.adaptive", "the input-adaptive KD weight", "adaptive", AdaptiveConfig()),
]


def reference_block() -> str:
    return f"{BEGIN}\n```yaml\n{describe(load_config())}\n```\n{END}"


def sections_block() -> str:
    parts = []
    for where, when, name, section in SECTIONS:
        parts.append(f"# {where} ({when})\n{name}:\n{describe(section, indent=1)}")
    return f"{SECTIONS_BEGIN}\n```yaml\n" + "\n\n".join(parts) + f"\n```\n{SECTIONS_END}"


def _replace(text: str, begin: str, end: str, block: str) -> str:
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + block + text[stop:]


def main() -> None:
    (ROOT / "configs" / "mnist1d.yaml").write_text(HEADER + describe(load_config()) + "\n")
    doc = ROOT / "docs" / "CONFIG.md"
    text = _replace(doc.read_text(), BEGIN, END, reference_block())
    doc.write_text(_replace(text, SECTIONS_BEGIN, SECTIONS_END, sections_block()))


if __name__ == "__main__":
    main()
