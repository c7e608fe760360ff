#!/usr/bin/env bash
# Create (or reuse) .venv and install blockstate with its dev tools.
# The pinned CPU build of PyTorch is installed first so that no later requirement can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${BLOCKSTATE_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ -d /opt/wheels ]; then
    PIP+=(--find-links /opt/wheels)
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "$TORCH_SPEC"
fi
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, blockstate; print(f'blockstate {blockstate.__version__} ready (torch {torch.__version__})')"
