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
# One pytest run per package: each package's tests/ has its own conftest and its own rootdir (a single run
# from the repo root would import `llm_sepweight/tests` as the module `llm_sepweight.tests` and shadow the package).
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
status=0
for pkg in $packages; do
  echo "-- $pkg"
  (cd "$root/$pkg" && "$venv/bin/python" -m pytest tests --junitxml="$reports/$pkg.xml" "$@") || status=$?
done
"$venv/bin/python" - "$reports" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
t = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    for suite in ET.parse(f).getroot().iter("testsuite"):
        for k in t:
            t[k] += int(suite.get(k, 0))
failed = t["failures"] + t["errors"]
print(f"all packages: {t['tests'] - failed - t['skipped']} passed, {failed} failed, {t['skipped']} skipped")
PY
exit $status
