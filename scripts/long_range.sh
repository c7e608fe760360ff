#!/usr/bin/env bash
# The long-range suite behind docs/results/long_range.md: every command is resumable (finished runs
# are skipped), so re-running after an interruption continues where it stopped. Two single-thread
# queues run side by side on a 2-core machine (`bash scripts/long_range.sh 0` and `... 1`), or
# everything in one queue with no argument.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/long_range}
QUEUE=${1:-all}
BS=(.venv/bin/blockstate tasks run --threads 1 --seeds 0,1 --steps 600 --eval-sequences 256)
MODELS=bst-sh-s4,bst-sh-s4d,bst-sh-unstruct,bst-mf-s4,slide

queue0() {
    # Copying memory: distance length + lag = 8 (inside the window W = 16), 64 (4W), 128 (8W).
    "${BS[@]}" --task copying --param lag=0,56,120 --models $MODELS --out "$OUT/copying"
    # State size: the resolution of an LTI kernel's memory.
    "${BS[@]}" --task copying --param lag=56,120 --models bst-sh-s4,bst-sh-s4d,bst-mf-s4 \
        --set ssm_state_size=64 --out "$OUT/copying"
}

queue1() {
    # MQAR: 4 pairs, queries 4 blocks or more after their pairs.
    "${BS[@]}" --task mqar --param num_pairs=4 --param gap=64 --param seq_len=128 --models $MODELS \
        --out "$OUT/mqar"
    "${BS[@]}" --task mqar --param num_pairs=4 --param gap=64 --param seq_len=128 \
        --models bst-sh-s4,bst-sh-s4d --set ssm_state_size=64 --out "$OUT/mqar"
}

case "$QUEUE" in
    0) queue0 ;;
    1) queue1 ;;
    all) queue0; queue1 ;;
esac
