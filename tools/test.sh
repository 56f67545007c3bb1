#!/usr/bin/env bash
# The test command: set-up, fixtures (built once into a cache outside the clone), lint, types, all tests.
# Extra arguments go to pytest, e.g. ./tools/test.sh -k gemma -x
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup.sh"
venv=${LLM_MICROLIBS_VENV:-$root/.venv}
cd "$root"

echo "== fixtures"
"$venv/bin/python" tools/fixtures.py
echo "== ruff"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
echo "== mypy"
for pkg in llm_sepweight llm_model_parts llm_sampler llm_offload; do
  "$venv/bin/mypy" --config-file pyproject.toml "$pkg/src"
done
echo "== pytest"
"$venv/bin/python" -m pytest llm_sepweight/tests llm_model_parts/tests llm_sampler/tests llm_offload/tests "$@"
