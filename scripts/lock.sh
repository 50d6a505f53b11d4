#!/usr/bin/env bash
# Regenerates scripts/constraints.txt, the stack scripts/setup-env.sh installs, from a Python
# environment in which the test suite passes (default .venv; e.g. .venv-latest after
# scripts/test-latest.sh). The suite runs first; the file is replaced only if it passes.
#   bash scripts/lock.sh [VENV] [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
shift || true
if [ ! -x "$venv/bin/python" ]; then
    echo "lock.sh: no Python environment at $venv" >&2
    exit 2
fi
"$venv/bin/python" -m pytest -q "$@"
lock="$(mktemp scripts/.constraints.XXXXXX)"
trap 'rm -f "$lock"' EXIT
{
    echo "# The stack scripts/setup-env.sh installs: every package at the version the test suite last passed"
    echo "# with, frozen by scripts/lock.sh from $venv ($("$venv/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.machine())'), $(date -u +%F))."
    echo "# The package declares lower bounds only (pyproject.toml); bash scripts/test-latest.sh tries the newest."
    # A local build label (torch's +cpu) is dropped: the pin is the release, whichever build of it is at hand.
    "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
        | grep -v -i '^bayesprune' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} > "$lock"
chmod 644 "$lock"
mv "$lock" scripts/constraints.txt
trap - EXIT
echo "wrote scripts/constraints.txt ($(grep -c '==' scripts/constraints.txt) packages)"
