#!/usr/bin/env bash
# The main job on a real model: set-up, then tools/demo.py (options: --model DIR, --device, --dtype; see --help).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/setup.sh"
exec "${LLM_MICROLIBS_VENV:-$root/.venv}/bin/python" "$root/tools/demo.py" "$@"
