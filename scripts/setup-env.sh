#!/usr/bin/env bash
# Creates .venv (once) and installs bayesprune with the locked, tested stack. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Every package is pinned here (scripts/constraints.txt, written by scripts/lock.sh), not in the
# package: a fresh machine gets the stack the suite passed with, and torch the local CPU wheel
# instead of a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e '.[dev]'
bash scripts/install-assets.sh .venv scripts/constraints.txt
