"""SECURITY.md's promises that the bad-input corpus cannot show by itself.

The corpus (tests/bad_inputs/cases/security.py) puts a payload wherever distilflow reads a file and
checks that the command is refused and that the payload's marker file never appears. Here: each
payload does create its marker when loaded the unsafe way (so those cases can fail), and the rule
for a symbolically linked output folder (followed; a dangling one is refused, in the corpus).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bad_inputs.cases import security

from distilflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_pickle_payloads_run_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    security.pickle_payload(tmp_path / "p.pkl", None)
    pickle.loads((tmp_path / "p.pkl").read_bytes())
    assert marker.exists()
    marker.unlink()
    security.torch_payload(lambda payload: {"format": 1, "model": payload})(tmp_path / "w.pt", None)
    torch.load(tmp_path / "w.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    security.npz_payload(x=None, y=np.arange(4))(tmp_path / "d.npz", None)
    with np.load(tmp_path / "d.npz", allow_pickle=True) as f:
        f["x"]
    assert marker.exists()


def test_yaml_payload_runs_when_loaded_unsafely(tmp_path):
    text = security.YAML_APPLY.replace("$dir", str(tmp_path))
    yaml.unsafe_load(text).close()
    assert (tmp_path / "pwned").exists()
    with pytest.raises(yaml.YAMLError):  # what distilflow uses
        yaml.safe_load(text)


def test_remote_code_runs_when_trusted(tmp_path):
    """The model folder's evil.py creates the marker when trust_remote_code is on (in a child process, with
    transformers' module cache in tmp_path); the corpus case shows that distilflow's default refuses it."""
    lm = tmp_path / "lm"  # what hf_with_remote_code reads of the kit's Llama folder: its config.json
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    folder = tmp_path / "t"
    security.hf_with_remote_code(folder, type("Kit", (), {"lm": lm}))
    code = (
        "import sys; from transformers import AutoConfig; "
        "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, env=env, capture_output=True, timeout=300)
    assert (tmp_path / "pwned").read_text() == "remote code ran"


def test_a_symlinked_output_folder_is_followed(tmp_path, tiny_overrides):
    """The rule (SECURITY.md): output_dir may be a symbolic link to a folder; the run writes there."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    assert main(["train-teacher", *tiny_overrides(link)]) == 0
    assert (target / "teacher" / "model.safetensors").is_file() and (target / "config.yaml").is_file()
    assert link.is_symlink()  # still the link, not replaced by a folder
    saved = yaml.safe_load((target / "config.yaml").read_text())
    assert saved["output_dir"] == str(link)
