#!/usr/bin/env bash
# The test command: set-up, fixtures (built once into a cache outside the clone), lint, types, all tests.
# PACKAGES="llm_sampler llm_offload" restricts the run; extra arguments go to pytest (./tools/test.sh -k gemma -x).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup.sh"
venv=${LLM_MICROLIBS_VENV:-$root/.venv}
packages=${PACKAGES:-llm_sepweight llm_model_parts llm_sampler llm_offload}
cd "$root"

echo "== fixtures"
"$venv/bin/python" tools/fixtures.py >/dev/null
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "== mypy"
for pkg in $packages; do
  "$venv/bin/mypy" --config-file pyproject.toml "$pkg/src"
done
echo "== pytest"
tests=()
for pkg in $packages; do tests+=("$pkg/tests"); done
"$venv/bin/python" -m pytest "${tests[@]}" "$@"
