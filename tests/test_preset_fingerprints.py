"""Every preset's seeded initialization and logits, pinned across refactors: a model built from a
preset with seed 0 at the `tiny` size has the same parameter names and shapes (exactly) and the
same per-tensor sums and logits (to float rounding) as when the fixture was written.

Regenerate the fixture only for an intended change of a preset's model:
    python tests/test_preset_fingerprints.py > tests/fixtures/preset_fingerprints.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from blockstate import build_model, list_models

FIXTURE = Path(__file__).parent / "fixtures" / "preset_fingerprints.json"


def fingerprint(name: str) -> dict:
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=64).eval()
    state = model.state_dict()
    layout = "\n".join(f"{key}:{tuple(t.shape)}:{t.dtype}" for key, t in state.items())
    tokens = torch.arange(96).remainder(61).unsqueeze(0)                    # (1, 96)
    with torch.no_grad():
        logits = model(tokens).double()                                      # (1, 96, 64)
    return {"layout": hashlib.sha256(layout.encode()).hexdigest(),
            "sums": [float(value) for t in state.values() if t.is_floating_point() or t.is_complex()
                     for value in (t.double().sum(), t.double().abs().sum())],
            "logits": [float(logits.mean()), float(logits.std()),
                       *logits[0, -1, :8].tolist(), *logits[0, 5, :8].tolist()]}


@pytest.mark.parametrize("name", list_models())
def test_preset_model_is_unchanged(name):
    expected = json.loads(FIXTURE.read_text())
    assert name in expected, f"{name}: new preset, add it to the fixture (see the module docstring)"
    got = fingerprint(name)
    assert got["layout"] == expected[name]["layout"], "parameter names, shapes or dtypes changed"
    assert got["sums"] == pytest.approx(expected[name]["sums"], rel=1e-5, abs=1e-4)
    assert got["logits"] == pytest.approx(expected[name]["logits"], rel=1e-4, abs=1e-4)


if __name__ == "__main__":
    json.dump({name: fingerprint(name) for name in list_models()}, sys.stdout, indent=0)
    print()
