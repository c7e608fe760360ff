#!/usr/bin/env bash
# Measurements of the selective context states (ssm_kernel="ssd") beside the results of
# lab/scripts/long_range.sh (same settings, same output directories) and of the tiny reproduction.
# Resumable: finished runs are skipped. One thread, so it can run beside another job on a 2-core
# machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results/long_range}
BS=(.venv/bin/blockstate tasks run --threads 1 --seeds 0,1 --eval-sequences 256)
# MQAR, 4 pairs queried 4 blocks or more after them (the target the time-invariant kernels miss).
MQAR=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task mqar --param num_pairs=4)
"${MQAR[@]}" --param gap=64 --param seq_len=96 --models bst-sh-ssd --out "$OUT/mqar"
# Selective copying: symbols at random positions, to be reproduced in order.
"${BS[@]}" --steps 600 --task selective_copying --param region=64 --models bst-sh-ssd,bst-mf-ssd \
    --out "$OUT/selective_copying"
# Copying memory at 4W, where S4 needs N = 64.
"${BS[@]}" --steps 600 --task copying --param lag=56 --models bst-sh-ssd,bst-mf-ssd --out "$OUT/copying"
# Language modelling at the tiny reproduction scale, beside bst-sh-s4's rows of reproduce_tiny.md.
OMP_NUM_THREADS=1 .venv/bin/blockstate reproduce --scale tiny --corpora python-stdlib,books \
    --models bst-sh-ssd --seeds 0,1 --no-ablations --out runs/reproduce-tiny-ssd
# The attention baselines and MF on MQAR beyond the window.
"${MQAR[@]}" --param gap=64 --param seq_len=96 --models transformer,brt,bst-mf-ssd --out "$OUT/mqar"
# The rest of the issue's grid: every suite task for the selective presets beside bst-sh-s4,
# bst-mf-s4, slide, transformer and brt at the settings of lab/scripts/long_range.sh.
"${MQAR[@]}" --param gap=64 --param seq_len=96 --models bst-mf-ssd --out "$OUT/mqar"
"${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task induction --param seq_len=64 \
    --eval-param seq_len=256,1024 --models bst-sh-ssd,bst-mf-ssd,transformer,brt --out "$OUT/induction"
"${BS[@]}" --steps 600 --task selective_copying --param region=64 --models bst-mf-s4,transformer,brt \
    --out "$OUT/selective_copying"
"${BS[@]}" --steps 600 --task copying --param lag=56 --models transformer,brt --out "$OUT/copying"
# The selective kernel with rotating complex modes (ssd_decay="complex"; lab/logs/long_range.md,
# section 8b) at the suite's budget: copying at 4W. Chunks of 16 (in-chunk decays per state dimension).
"${BS[@]}" --steps 600 --task copying --param lag=56 --models bst-sh-ssd --set ssd_decay=complex \
    --set ssm_chunk_size=16 --label ssd_decay=complex --out "$OUT/copying"
# The rotary presets (ssd_decay="rotary", section 8c of lab/logs/long_range.md) on the suite's
# tasks at the suite's budgets, 2 seeds.
ROT=bst-sh-ssd-rotary,bst-mf-ssd-rotary
"${BS[@]}" --steps 600 --task selective_copying --param region=64 --models "$ROT" \
    --out "$OUT/selective_copying"
"${BS[@]}" --steps 600 --task copying --param lag=56 --models "$ROT" --out "$OUT/copying"
"${MQAR[@]}" --param gap=64 --param seq_len=96 --models "$ROT" --out "$OUT/mqar"
"${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task induction --param seq_len=64 \
    --eval-param seq_len=256,1024 --models "$ROT" --out "$OUT/induction"
