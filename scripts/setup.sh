#!/usr/bin/env bash
# Create (or reuse) .venv and install blockstate with its test and lint tools (the `dev` extra) and
# the integrations the test-suite covers (the `hf`, `lm-eval`, `tensorboard` and `wandb` extras;
# their tests skip without them).
# PyTorch is installed first, as $BLOCKSTATE_TORCH (default: torch==2.13.0, the tested release), so
# that no later requirement chooses it: from /opt/wheels where that folder holds a matching wheel
# (a CPU build on the CI machines), otherwise whatever pip resolves from its index (on Linux x86_64
# PyPI's torch is a CUDA build). A .venv that already imports torch keeps its own. The last line
# names the torch that got installed and whether it sees CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${BLOCKSTATE_TORCH:-torch==2.13.0}
EXTRAS=${BLOCKSTATE_EXTRAS:-dev,hf,lm-eval,tensorboard,wandb}
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
"${PIP[@]}" -e ".[$EXTRAS]"
.venv/bin/python - <<'EOF'
import torch

import blockstate

build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
print(f"blockstate {blockstate.__version__} ready: torch {torch.__version__} ({build}; CUDA "
      f"{'available' if torch.cuda.is_available() else 'not available'} here)")
EOF
