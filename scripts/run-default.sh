#!/usr/bin/env bash
# Sets up .venv and runs the main job: fit block gates on SmolLM2-135M-Instruct over the
# Shakespeare corpus, print the ranking, extract 75 % of decoder parameters, evaluate.
# Extra arguments go to 'bayesprune fit' (e.g. --out runs/other --steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/bayesprune fit --out runs/default "$@"
