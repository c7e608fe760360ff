#!/usr/bin/env bash
# Issue 36, item 2: the paper's other presets on the 3000-step suite of docs/results/recommended.md,
# beside bst-sh-s4, with the same commands, seeds and steps, into the same folders (so the same
# reports). Two runs at a time, one core each; every run checkpoints (--checkpoint-every), so the
# script can be stopped anywhere and rerun, in this or a later session, to continue; finished runs
# are skipped. With COMMIT=1 each finished run's records are committed as they land.
#   bash lab/scripts/suite3000_paper_presets.sh             # MODELS="bst-mh-s4 bst-mf-s4" SEEDS="0 1 2 3"
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:-"bst-mh-s4 bst-mf-s4"}
SEEDS=${SEEDS:-"0 1 2 3"}
OUT=docs/results/recommended
BS=(.venv/bin/blockstate tasks run --threads 1 --steps 3000 --lr 1e-3 --checkpoint-every 250)
one() {  # one MODEL SEED TASK-OPTIONS... --out DIR
    OMP_NUM_THREADS=1 "${BS[@]}" --models "$1" --seeds "$2" "${@:3}" > /dev/null
}
task() {  # task TASK-OPTIONS... --out DIR: every (model, seed), two at a time
    local jobs=()
    for seed in $SEEDS; do for model in $MODELS; do jobs+=("$model $seed"); done; done
    for ((i = 0; i < ${#jobs[@]}; i += 2)); do
        one ${jobs[i]} "$@" &
        local first=$!
        if ((i + 1 < ${#jobs[@]})); then one ${jobs[i + 1]} "$@"; fi
        wait "$first"
        # commit only when a record landed (a pass over finished runs rewrites report.md alone)
        if [[ ${COMMIT:-0} == 1 && -n $(git status --porcelain -- "${@: -1}/runs") ]]; then
            git add "${@: -1}" && git commit -qm "Records (issue 36): $MODELS on ${@: -1}" || true
        fi
    done
}
task --task copying --param lag=56,120 --eval-sequences 256 --out "$OUT/copying3000"
task --task selective_copying --param region=64 --eval-sequences 256 \
    --out "$OUT/selective_copying3000"
task --task mqar --param num_pairs=8 --param gap=64 --param seq_len=112 --batch-size 64 \
    --out "$OUT/mqar8"
task --task mqar --param num_pairs=16 --param gap=64 --param seq_len=144 \
    --curriculum 3000:num_pairs=8,seq_len=112 --steps 4500 --batch-size 64 --out "$OUT/mqar16"
task --task induction --param seq_len=128 --param min_distance=48 --eval-param seq_len=512 \
    --batch-size 64 --eval-sequences 256 --out "$OUT/induction3000"
