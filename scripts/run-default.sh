#!/usr/bin/env bash
# Sets up .venv and runs the main job: fit head-group and FFN-neuron gates on
# SmolLM2-135M-Instruct over the Shakespeare corpus, print the ranking and the widths,
# extract 75 % of decoder parameters (per-layer widths), evaluate.
# Extra arguments go to 'bayesprune fit' (e.g. --out runs/other --steps 300 --units block).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/bayesprune fit --out runs/default --units head,neuron "$@"
