#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv, torch only if it is missing, the four packages
# in editable mode with their test extras. Re-running is cheap: it re-installs only when a pyproject changed.
# TORCH_SPEC picks the torch to install when missing (CI asks for the CPU build: TORCH_SPEC=torch==2.13.0).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${LLM_MICROLIBS_VENV:-$root/.venv}
py="$venv/bin/python"

if [ ! -x "$py" ]; then
  echo "setup: creating virtual environment $venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch}"
  "$py" -m pip install -q "${TORCH_SPEC:-torch}"
fi

stamp="$venv/.llm_microlibs_setup"
want=$(cat "$root"/llm_*/pyproject.toml "$root/tools/requirements-test.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the four packages (editable) and the test tools"
  "$py" -m pip install -q hatchling editables
  "$py" -m pip install -q --no-build-isolation \
    -e "$root/llm_sepweight[test,gguf,tqdm]" -e "$root/llm_model_parts[test]" \
    -e "$root/llm_sampler[test]" -e "$root/llm_offload[test]" -r "$root/tools/requirements-test.txt"
  echo "$want" >"$stamp"
fi
