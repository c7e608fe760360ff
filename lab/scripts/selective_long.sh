#!/usr/bin/env bash
# Issue 13's long runs: the selective presets beside bst-sh-s4 with about 7-20x the optimizer steps
# of lab/scripts/selective.sh, on one CPU core each, two runs at a time (a 2-core machine). Each run
# is checkpointed every 200 steps (blockstate tasks run --checkpoint-every), so this script can be
# stopped at any point and rerun, in this or a later session, to continue where it stopped;
# finished runs are skipped. Results go next to lab/scripts/selective.sh's in docs/results/long_range/.
set -euo pipefail
cd "$(dirname "$0")/../.."
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
# Selective copying with other parametrizations of the selective kernel (lab/logs/long_range.md,
# section 8): 16 heads of one decay each; 4 heads of a decay per state dimension (S6's form);
# B and C RMS-normalized. ssm_chunk_size=8 only makes the runs cheaper at L = 72 (the function
# does not depend on it).
variant() {  # variant SETTING [more options, e.g. --seeds 1]
    OMP_NUM_THREADS=1 "${BS[@]}" --steps 20000 --task selective_copying --param region=64 \
        --models bst-sh-ssd --set "$1" --set ssm_chunk_size=8 --label "$1" "${@:2}" \
        --out "$OUT/selective_copying_20000" > /dev/null
}
mqar_variant() {  # mqar_variant SETTING...: MQAR (4 pairs 4+ blocks back) at 20000 steps, batch 64
    local sets=() label
    for setting in "$@"; do sets+=(--set "$setting"); done
    label=$(IFS=,; echo "$*")
    OMP_NUM_THREADS=1 "${BS[@]}" --steps 20000 --lr 1e-3 --batch-size 64 --task mqar \
        --param num_pairs=4 --param gap=64 --param seq_len=96 --models bst-sh-ssd "${sets[@]}" \
        --set ssm_chunk_size=16 --label "$label" --out "$OUT/mqar_20000" > /dev/null
}
variant ssd_heads=16 & first=$!
variant ssd_decay=state & second=$!
wait "$first"; variant ssd_bc_norm=true; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/selective_copying_20000" > /dev/null
# Time-invariant kernels with and without rotation: S4D-Inv (N = 8: 4 complex modes) and S4D-Real
# (N = 16 real decays, the same 8 real dimensions of state per channel), the same 20000 steps.
RUN=("${BS[@]}" --steps 20000 --task selective_copying --param region=64 --models bst-sh-s4d
     --out "$OUT/selective_copying_20000")
OMP_NUM_THREADS=1 "${RUN[@]}" > /dev/null & first=$!
OMP_NUM_THREADS=1 "${RUN[@]}" --set s4d_init=real --set ssm_state_size=16 > /dev/null & second=$!
wait "$first"; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/selective_copying_20000" > /dev/null
# The selective kernel with a rotating state (ssd_decay="complex": N/2 complex modes per head whose
# phases advance with the input-dependent step), the same 20000 steps.
# It is the one that learns the order (lab/logs/long_range.md, section 8b): a second seed beside
# MQAR with it (4 pairs 4+ blocks back, 20000 steps at batch 64, chunks of 16 for the in-chunk
# decays per state dimension), one core each.
variant ssd_decay=complex
variant ssd_decay=complex --seeds 1 & first=$!
mqar_variant ssd_decay=complex & second=$!
wait "$first"; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/selective_copying_20000" > /dev/null
.venv/bin/blockstate tasks report --out "$OUT/mqar_20000" > /dev/null
# The same rotating modes with one real decay per head (ssd_decay="rotary", section 8c): computed as
# the scalar-decay scan with rotated B and C, so about the default's cost. Selective copying and
# MQAR as above, one core each.
variant ssd_decay=rotary & first=$!
mqar_variant ssd_decay=rotary & second=$!
wait "$first"; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/selective_copying_20000" > /dev/null
.venv/bin/blockstate tasks report --out "$OUT/mqar_20000" > /dev/null
# MQAR with 4x the state (N = 32 per head, B and C of 32 numbers), the rotary and the default
# kinds (lab/logs/long_range.md, 8d): is the state's capacity what holds MQAR back? The same
# 20000 steps, one core each.
mqar_variant ssd_decay=rotary ssm_state_size=32 & first=$!
mqar_variant ssm_state_size=32 & second=$!
wait "$first"; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/mqar_20000" > /dev/null
# MQAR with the SSM on the full model width (ssm_width_divisor=1: 64 channels instead of 16) and
# N = 16, the default and rotary kinds (lab/logs/long_range.md, 8e): is BST's narrow SSM what
# holds MQAR back? The same 20000 steps, one core each.
mqar_variant ssm_width_divisor=1 ssm_state_size=16 & first=$!
mqar_variant ssd_decay=rotary ssm_width_divisor=1 ssm_state_size=16 & second=$!
wait "$first"; wait "$second"
.venv/bin/blockstate tasks report --out "$OUT/mqar_20000" > /dev/null
