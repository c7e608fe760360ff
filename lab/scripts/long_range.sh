#!/usr/bin/env bash
# The long-range suite behind lab/logs/long_range.md. Every command is resumable (finished runs
# are skipped), so re-running after an interruption continues where it stopped. The queues can run
# side by side on a 2-core machine (`bash lab/scripts/long_range.sh 0`, `... 1`, ...; each process
# uses one thread), or one after the other with no argument.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/results/long_range}
QUEUE=${1:-all}
BS=(.venv/bin/blockstate tasks run --threads 1 --seeds 0,1 --eval-sequences 256)
COPY=("${BS[@]}" --steps 600 --task copying)
MODELS=bst-sh-s4,bst-sh-s4d,bst-sh-unstruct,bst-mf-s4,slide

queue0() {
    # Copying memory: distance length + lag = 8 (inside the window W = 16), 64 (4W) and 128 (8W).
    "${COPY[@]}" --param lag=0,56,120 --models $MODELS --out "$OUT/copying"
    # State size N: how finely an LTI kernel can place the past.
    "${COPY[@]}" --param lag=56,120 --models bst-sh-s4,bst-sh-s4d,bst-mf-s4 --set ssm_state_size=64 \
        --out "$OUT/copying"
    # One factor at a time at distance 4W (bst-sh-s4, N = 8 unless said).
    for setting in ssm_state_size=16 ssm_state_size=32 context_norm=rms context_activation=none; do
        "${COPY[@]}" --param lag=56 --models bst-sh-s4 --set $setting --out "$OUT/copying"
    done
    "${COPY[@]}" --param lag=56 --models bst-sh-s4 --ssm-lr-scale 0.333 --out "$OUT/copying"
    # MF reads S filter outputs at one position per block: more filters, the same state size.
    "${COPY[@]}" --param lag=56 --models bst-mf-s4 --set ssm_state_size=64 \
        --set num_context_states=16 --out "$OUT/copying"
    # Like-for-like local attention: BST with sliding-window self-attention, as Slide has.
    "${COPY[@]}" --param lag=56,120 --models bst-sh-s4 --set ssm_state_size=64 \
        --set self_attention=sliding --out "$OUT/copying"
}

queue1() {
    # MQAR at lr 1e-3 and batch 64 (at 3e-3 even the in-window control stays near 0.27): the
    # in-window control, then 4 pairs queried 4 blocks or more after them.
    MQAR=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task mqar --param num_pairs=4)
    "${MQAR[@]}" --param gap=0 --param seq_len=16 --models bst-sh-s4,slide --out "$OUT/mqar"
    "${MQAR[@]}" --param gap=64 --param seq_len=96 --models bst-sh-s4,bst-mf-s4,slide --out "$OUT/mqar"
    "${MQAR[@]}" --param gap=64 --param seq_len=96 --models bst-sh-s4 --set ssm_state_size=64 \
        --out "$OUT/mqar"
    # Normalized context states, with a state large enough to carry the symbols and without.
    "${COPY[@]}" --param lag=56 --models bst-sh-s4,bst-mf-s4 --set ssm_state_size=64 \
        --set context_norm=rms --out "$OUT/copying"
    "${COPY[@]}" --param lag=56 --models bst-mf-s4 --set context_norm=rms --out "$OUT/copying"
    # Selective copying: the same symbols at random positions, which no fixed delay can follow.
    SEL=("${BS[@]}" --steps 600 --task selective_copying --param region=64)
    "${SEL[@]}" --models bst-sh-s4,slide --out "$OUT/selective_copying"
    "${SEL[@]}" --models bst-sh-s4 --set ssm_state_size=64 --out "$OUT/selective_copying"
}

queue2() {
    # Books: the second MF seed (resumes the run the first session stopped).
    OMP_NUM_THREADS=1 .venv/bin/blockstate reproduce --scale tiny --corpora books --models bst-mf-s4 \
        --seeds 0,1 --max-tokens 4800000 --no-ablations --out runs/long-range-lm
    # MH on copying at 4W, the tiny preset and N = 64.
    "${COPY[@]}" --param lag=56 --models bst-mh-s4 --out "$OUT/copying"
    "${COPY[@]}" --param lag=56 --models bst-mh-s4 --set ssm_state_size=64 --out "$OUT/copying"
    # Induction heads: trained at 64 tokens (4W), scored at 4x and 16x that length.
    IND=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task induction --param seq_len=64)
    "${IND[@]}" --eval-param seq_len=256,1024 --models bst-sh-s4,bst-mf-s4,slide --out "$OUT/induction"
    # MQAR: more pairs, queries at every distance up to 8W after them.
    MQ=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task mqar --param seq_len=128 --param gap=0)
    "${MQ[@]}" --param num_pairs=8,32 --models bst-sh-s4,slide --out "$OUT/mqar"
}

queue3() {
    # Why BST misses MQAR with the pairs 4+ blocks back, one factor at a time (bst-sh-s4, 2 seeds):
    # depth (4 layers, BST at 0, 2, 3), normalized context states, a full-width SSM with N = 64, and
    # the SSM's learning rate; then a 3x longer run with N = 64.
    MQAR=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task mqar --param num_pairs=4
          --param gap=64 --param seq_len=96)
    "${MQAR[@]}" --models bst-sh-s4 --set context_norm=rms --out "$OUT/mqar"
    "${MQAR[@]}" --models bst-sh-s4 --set ssm_state_size=64 --set ssm_width_divisor=1 --out "$OUT/mqar"
    "${MQAR[@]}" --models bst-sh-s4 --ssm-lr-scale 3 --out "$OUT/mqar"
    "${MQAR[@]}" --models bst-sh-s4 --set n_layers=4 --out "$OUT/mqar"
    LONG=("${BS[@]}" --lr 1e-3 --batch-size 64 --task mqar --param num_pairs=4 --param gap=64
          --param seq_len=96)
    "${LONG[@]}" --steps 3000 --seeds 0,1 --models bst-sh-s4 --set ssm_state_size=64 \
        --label "N=64, 3000 steps" --out "$OUT/mqar_3000"
    "${LONG[@]}" --steps 3000 --seeds 0 --models transformer --out "$OUT/mqar_3000"
    "${LONG[@]}" --steps 6000 --seeds 0 --models bst-sh-s4 --set ssm_state_size=64 \
        --label "N=64, 6000 steps" --out "$OUT/mqar_6000"
}

queue4() {
    # MF with normalized context states on books (the copying task's best MF setting), 2 seeds at
    # the section 7 budget, evaluated on the same test windows as the main runs.
    OMP_NUM_THREADS=1 .venv/bin/python lab/scripts/lm_setting.py --model bst-mf-s4 --set context_norm=rms \
        --corpus books --seeds 0,1 --max-tokens 4800000 --out runs/long-range-lm
    # MQAR: 16 and 64 pairs (64: one seed), and the second seed of 8 and 32 (queries at every
    # distance to 8W).
    MQ=("${BS[@]}" --steps 1000 --lr 1e-3 --batch-size 64 --task mqar --param gap=0)
    "${MQ[@]}" --param seq_len=128 --param num_pairs=8,16,32 --models bst-sh-s4,slide --out "$OUT/mqar"
    "${MQ[@]}" --param seq_len=256 --param num_pairs=64 --models bst-sh-s4,slide --seeds 0 \
        --out "$OUT/mqar"
}

case "$QUEUE" in
    0) queue0 ;;
    1) queue1 ;;
    2) queue2 ;;
    3) queue3 ;;
    4) queue4 ;;
    all) queue0; queue1; queue2; queue3; queue4 ;;
    *) echo "usage: $0 [0|1|2|3|4]" >&2; exit 2 ;;
esac
