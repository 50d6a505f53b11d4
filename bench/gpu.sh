#!/usr/bin/env bash
# One short device check: fit and inference speed on the GPU, one JSON summary (under $OUT if set).
# The GPU machines hold torch, transformers and accelerate but not pyro-ppl or arviz: carry their
# wheels in bench/wheels/ (pip download --no-deps pyro-ppl opt-einsum arviz ... -d bench/wheels).
# Extra arguments go to bench/gpu.py (e.g. --device cpu --tiny to check it here).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d bench/wheels ] && ! python -c "import pyro, arviz" 2>/dev/null; then
    site="$(mktemp -d)"
    python -m pip install -q --no-index --no-deps --target "$site" bench/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python bench/gpu.py "$@"
