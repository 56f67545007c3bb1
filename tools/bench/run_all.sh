#!/usr/bin/env bash
# Every benchmark, then docs/benchmarks.md. Pass --quick for a smoke run. Installs the benchmark-only
# references (tools/bench/requirements.txt) into the project's venv first.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
"$root/tools/setup.sh"
py="${LLM_MICROLIBS_VENV:-$root/.venv}/bin/python"
"$py" -m pip install -q -r "$root/tools/bench/requirements.txt"
cd "$root"
for topic in sepweight_load parts parts_more sampler scoring offload pipeline scaling; do
  echo "== bench_$topic"
  "$py" "tools/bench/bench_$topic.py" "$@"
done
"$py" tools/bench/bench_parts.py --model gemma3 "$@"
"$py" tools/bench/report.py
