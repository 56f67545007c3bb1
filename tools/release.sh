#!/usr/bin/env bash
# Build the four wheels and sdists with hatch, check them with twine, and install each wheel alone into a
# fresh virtual environment with only its declared dependencies (local wheels found in dist/), then import it.
# TORCH_SPEC picks the torch each fresh venv gets first (default: torch==2.13.0, the local CPU build here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dist="$root/dist"
tools_venv="$root/.cache/release-venv"
rm -rf "$dist" && mkdir -p "$dist"
[ -x "$tools_venv/bin/python" ] || python3 -m venv "$tools_venv"
"$tools_venv/bin/python" -m pip install -q hatch twine

for pkg in llm_sepweight llm_model_parts llm_sampler llm_offload; do
  (cd "$root/$pkg" && "$tools_venv/bin/hatch" build -t wheel -t sdist "$dist")
done
"$tools_venv/bin/twine" check --strict "$dist"/*

for pkg in llm_sepweight llm_model_parts llm_sampler llm_offload; do
  venv=$(mktemp -d)
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  wheel=$(ls "$dist"/"${pkg}"-*.whl)
  "$venv/bin/python" -m pip install -q --find-links "$dist" "$wheel"
  "$venv/bin/python" -c "import $pkg; print('$pkg', $pkg.__version__, 'imports alone')"
  "$venv/bin/python" -m pip list --format=freeze | grep -vE '^(pip|setuptools)=' | tr '\n' ' ' && echo
  rm -rf "$venv"
done
echo "release: wheels and sdists in $dist"
