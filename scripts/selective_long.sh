#!/usr/bin/env bash
# Issue 13's long runs: the selective presets beside bst-sh-s4 with about 7-20x the optimizer steps
# of scripts/selective.sh, on one CPU core each, two runs at a time (a 2-core machine). Each run
# is checkpointed every 200 steps (blockstate tasks run --checkpoint-every), so this script can be
# stopped at any point and rerun, in this or a later session, to continue where it stopped;
# finished runs are skipped. Results go next to scripts/selective.sh's in docs/results/long_range/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/long_range}
BS=(.venv/bin/blockstate tasks run --threads 1 --seeds 0 --eval-sequences 256)
pair() {  # two models of one setting side by side, one core each; then the setting's report
    local models=("$1" "$2") pids=(); shift 2
    for model in "${models[@]}"; do
        OMP_NUM_THREADS=1 "${BS[@]}" "$@" --models "$model" > /dev/null &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    .venv/bin/blockstate tasks report --out "${@: -1}" > /dev/null
}
# Selective copying (symbols at random positions, reproduced in order): 20000 steps, 0.15 s each.
pair bst-sh-ssd bst-sh-s4 --steps 20000 --task selective_copying --param region=64 \
    --out "$OUT/selective_copying_20000"
# MQAR, 4 pairs queried 4 blocks or more later: 20000 steps at batch 64, 0.34 s each.
pair bst-sh-ssd bst-sh-s4 --steps 20000 --lr 1e-3 --batch-size 64 --task mqar \
    --param num_pairs=4 --param gap=64 --param seq_len=96 --out "$OUT/mqar_20000"
