from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from distilflow.data.stdlib_corpus import stdlib_root, train_tokenizer
from distilflow.errors import UserError
from distilflow.models.hf import (
    VocabNotice,
    align_vocab,
    build_causal_lm,
    load_causal_lm,
    max_positions,
    truncate_vocab,
)
from distilflow.models.layers import decoder_layers, layer_map
from distilflow.models.taps import Taps

from .conftest import FAMILIES, family_config


@pytest.mark.parametrize("family", FAMILIES)
def test_load_causal_lm_round_trip(family, model_dirs, tokenizer):
    model, loaded_tokenizer = load_causal_lm(model_dirs[family], role="teacher")
    assert model.config.model_type == family
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    saved = load_file(model_dirs[family] / "model.safetensors")
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name], tensor), name
    assert next(model.parameters()).dtype == torch.float32


def test_load_sets_missing_pad_token_to_eos(model_dirs, tmp_path, tokenizer):
    target = tmp_path / "nopad"
    shutil.copytree(model_dirs["llama"], target)
    no_pad = AutoTokenizer.from_pretrained(model_dirs["llama"], local_files_only=True)
    no_pad.pad_token = None
    no_pad.save_pretrained(target)
    _, loaded = load_causal_lm(target, role="student")
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded.pad_token_id == tokenizer.eos_token_id == 0


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("config.json", "has no config.json"),
        ("model.safetensors", "has no weights"),
        ("tokenizer.json", "has no tokenizer"),
    ],
)
def test_load_errors_name_role_and_path(remove, expected, model_dirs, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(model_dirs["qwen2"], target)
    (target / remove).unlink()
    with pytest.raises(UserError, match=expected) as info:
        load_causal_lm(target, role="teacher")
    assert "teacher" in str(info.value) and str(target) in str(info.value)


def test_load_missing_directory(tmp_path):
    with pytest.raises(UserError, match="student model directory .* does not exist") as info:
        load_causal_lm(tmp_path / "nowhere", role="student")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_build_causal_lm_from_dict_and_path(model_dirs, tokenizer):
    model = build_causal_lm(family_config("qwen2", len(tokenizer), layers=3))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 3
    from_dir = build_causal_lm(model_dirs["gpt2"])
    from_file = build_causal_lm(model_dirs["gpt2"] / "config.json")
    assert type(from_dir).__name__ == type(from_file).__name__ == "GPT2LMHeadModel"
    assert from_dir.config.n_embd == 32


def test_build_causal_lm_config_errors(tokenizer):
    config = family_config("llama", len(tokenizer))
    with pytest.raises(UserError, match="'num_hiden_layers' is not a field of llama configs; closest: num_hidden"):
        build_causal_lm({**config, "num_hiden_layers": 1})
    with pytest.raises(UserError, match="model_type 'lama' .* closest: .*llama"):
        build_causal_lm({**config, "model_type": "lama"})


@pytest.mark.parametrize("family", FAMILIES)
def test_init_layers_copies_teacher_tensors(family, tokenizer):
    torch.manual_seed(1)
    teacher = build_causal_lm(family_config(family, len(tokenizer), layers=4))
    student = build_causal_lm(family_config(family, len(tokenizer), layers=2), teacher=teacher, init_layers=[1, 3])
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    stack = decoder_layers(student)[0][: -len(".0")]
    copied_layers = 0
    for name, param in student_params.items():
        if name.startswith(stack + ".0."):
            source = name.replace(stack + ".0.", stack + ".1.")
            copied_layers += 1
        elif name.startswith(stack + ".1."):
            source = name.replace(stack + ".1.", stack + ".3.")
        else:
            source = name  # embeddings, final norm, lm_head
        assert torch.equal(param, teacher_params[source]), name
    assert copied_layers > 0
    # The student is a copy, not a view of the teacher.
    assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()
    if family == "qwen2":  # untied lm_head is copied too
        assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_init_layers_errors(tokenizer):
    teacher = build_causal_lm(family_config("llama", len(tokenizer), layers=4))
    narrow = family_config("llama", len(tokenizer), layers=2, hidden=16)
    with pytest.raises(UserError, match=r"'model.embed_tokens.weight' \(320, 16\) does not match .*\(320, 32\)"):
        build_causal_lm(narrow, teacher=teacher, init_layers=[1, 3])
    student = family_config("llama", len(tokenizer), layers=2)
    with pytest.raises(UserError, match="init_layers has 3 entries but the student has 2 layers"):
        build_causal_lm(student, teacher=teacher, init_layers=[0, 1, 2])
    with pytest.raises(UserError, match="entry 4 is out of range; the teacher has 4 layers"):
        build_causal_lm(student, teacher=teacher, init_layers=[1, 4])
    with pytest.raises(UserError, match="need a teacher"):
        build_causal_lm(student, init_layers=[1, 3])
    with pytest.raises(UserError, match="differ in tie_word_embeddings"):
        build_causal_lm({**student, "tie_word_embeddings": False}, teacher=teacher, init_layers=[1, 3])


@pytest.mark.parametrize(
    ("family", "expected"),
    [("llama", "model.layers"), ("qwen2", "model.layers"), ("gpt2", "transformer.h")],
)
def test_decoder_layers_and_taps(family, expected, tokenizer):
    model = build_causal_lm(family_config(family, len(tokenizer), layers=3)).eval()
    paths = decoder_layers(model)
    assert paths == [f"{expected}.{i}" for i in range(3)]
    taps = Taps(model, paths, role="student")
    input_ids = torch.randint(0, len(tokenizer), (2, 5))
    with torch.no_grad(), taps.capture():
        output = model(input_ids=input_ids, output_hidden_states=True)
    features = taps.features()
    assert [tuple(f.shape) for f in features] == [(2, 5, 32)] * 3
    # hidden_states[i + 1] is the output of layer i (the last one has the final norm applied).
    for i in range(2):
        assert torch.allclose(features[i], output.hidden_states[i + 1])


def test_layer_map_uniform_by_hand():
    assert layer_map(2, 4, "uniform") == [(0, 1), (1, 3)]
    assert layer_map(3, 4, "uniform") == [(0, 0), (1, 2), (2, 3)]  # 1.33, 2.67, 4 -> 1, 3, 4
    assert layer_map(4, 6, "uniform") == [(0, 1), (1, 2), (2, 4), (3, 5)]  # 1.5, 3, 4.5, 6 halves up
    assert layer_map(4, 2, "uniform") == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert layer_map(3, 3, "uniform") == [(0, 0), (1, 1), (2, 2)]


def test_layer_map_explicit_and_errors():
    assert layer_map(2, 4, [[0, 0], [1, 2]]) == [(0, 0), (1, 2)]
    with pytest.raises(UserError, match="teacher layer 4 is out of range; the teacher has 4"):
        layer_map(2, 4, [[0, 4]])
    with pytest.raises(UserError, match="student layer 2 is out of range; the student has 2"):
        layer_map(2, 4, [[2, 0]])
    with pytest.raises(UserError, match="'even' is not allowed; use 'uniform'"):
        layer_map(2, 4, "even")


def test_align_vocab_same_tokenizer_different_embedding_sizes(model_dirs):
    teacher, teacher_tok = load_causal_lm(model_dirs["qwen2"], role="teacher")
    student, student_tok = load_causal_lm(model_dirs["qwen2"], role="student")
    teacher.resize_token_embeddings(336)
    teacher_size = teacher.get_output_embeddings().weight.shape[0]
    student_size = student.get_output_embeddings().weight.shape[0]
    assert (teacher_size, student_size) == (336, 320)
    with pytest.warns(VocabNotice, match="336 and 320 embedding rows; distilling over the first 320") as record:
        shared = align_vocab(teacher_tok, student_tok, teacher_size, student_size)
    assert shared == 320 and len(record) == 1
    input_ids = torch.tensor([[5, 6, 7]])
    teacher_logits = teacher(input_ids=input_ids).logits  # (1, 3, 336)
    assert truncate_vocab(teacher_logits, shared).shape == (1, 3, 320)
    assert torch.equal(truncate_vocab(teacher_logits, shared), teacher_logits[..., :320])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal sizes: no notice
        assert align_vocab(teacher_tok, student_tok, 320, 320) == 320


def test_align_vocab_different_tokenizer_names_first_id(tokenizer, tmp_path):
    other = train_tokenizer([(stdlib_root() / "colorsys.py").read_text(encoding="utf-8")], 320, tmp_path)
    ours = {i: token for token, i in tokenizer.get_vocab().items()}
    theirs = {i: token for token, i in other.get_vocab().items()}
    first = min(i for i in ours if ours[i] != theirs.get(i))
    assert first >= 259  # specials and the byte alphabet agree; the merges differ
    with pytest.raises(UserError, match=f"differ at id {first}: teacher {ours[first]!r}, student {theirs[first]!r}"):
        align_vocab(tokenizer, other, 320, 320)


def test_max_positions(tokenizer):
    assert max_positions(build_causal_lm(family_config("llama", len(tokenizer)))) == 64
    assert max_positions(build_causal_lm(family_config("gpt2", len(tokenizer)))) == 48
    assert max_positions(torch.nn.Linear(2, 2)) is None
