#!/usr/bin/env bash
# Short CPU training run of every baseline and bst-sh-s4 on the embedded corpus, same token budget
# for each (budgets in tokens, so the comparison holds even when the machine is shared).
# Usage: bash lab/scripts/baselines_cpu.sh [TOKENS] [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENS=${1:-400000}
OUT=${2:-runs/baselines}
mkdir -p "$OUT"
for model in bst-sh-s4 transformer slide transformer-xl brt gss-hybrid; do
    .venv/bin/blockstate train --model "$model" --size small --data python-stdlib --out "$OUT/$model" \
        --max-tokens "$TOKENS" --batch-size 4 --warmup-steps 10 --eval-every 1000 --eval-batches 16 \
        --sample-tokens 0 --overwrite --quiet > "$OUT/$model.log" 2>&1
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| model | parameters | steps | tokens | tokens/s | val perplexity | val bits/byte |")
print("|---|---|---|---|---|---|---|")
for run in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
    s = json.loads((run / "summary.json").read_text())
    v = s["validation"]
    print(f"| {run.name} | {s['parameters']:,} | {s['step']} | {s['tokens']:,} | {s['tokens_per_s']:,.0f} "
          f"| {v['perplexity']:.3f} | {v['bits_per_byte']:.3f} |")
PY
