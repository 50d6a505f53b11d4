#!/usr/bin/env bash
# Sets up .venv and runs the test suite (tiny random models, plus the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/python -m pytest -q "$@"
