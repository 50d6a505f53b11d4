#!/usr/bin/env bash
# Sets up .venv and runs the main job: fit the cost-conditioned posterior of head-group
# and FFN-neuron gates on SmolLM2-135M-Instruct over the default mixture of five domains (one fit
# for every size), print the widths at the target and the kept size at every cost,
# extract 75 % of decoder parameters (per-layer widths), fine-tune the cut briefly (recovery), evaluate.
# Extra arguments go to 'bayesprune fit' (e.g. --out runs/other --steps 300 --target 50%).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/bayesprune fit --out runs/default "$@"
