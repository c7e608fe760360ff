#!/usr/bin/env bash
# One-command check of blockstate on a CUDA machine, bounded to about 8 minutes on one GPU:
#   1. tests: the tests that run only with CUDA (skipped elsewhere)
#   2. train: `small` bst-sh-s4 in bf16 with --compile, up to 300 steps (at most 2 minutes of training)
#   3. layers: the layer benchmark of BST:SH:S4 against BRT and Slide at 8k-64k tokens
#   4. generation: the decode benchmark (ms per one-token step) of the same three at 8k and 64k
# Each stage runs under its own time limit; a stage that fails or times out is recorded and the
# next one runs. Writes OUT/summary.json and OUT/summary.md (every stage's status, duration and main
# numbers), each stage's own outputs and log under OUT/<stage>/, and OUT/gpu_check.tar.gz (all of
# it but the training checkpoints). To keep only what matters, copy OUT/summary.md, OUT/summary.json
# and OUT/gpu_check.tar.gz.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run] [--python PYTHON]
#
# --dry-run (or GPU_CHECK_DRY=1) runs every stage at toy sizes on the CPU (no --compile: the CPU
# compiler alone takes minutes), to check the script itself; tests/test_gpu_check.py does so in CI.
# The exit status is 0 when every stage passed, 1 otherwise.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=gpu_check
DRY=${GPU_CHECK_DRY:-0}
PYTHON=${PYTHON:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --dry-run) DRY=1; shift ;;
        --python) PYTHON=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$PYTHON" ]; then  # the repository's environment when there is one, else python3
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BS=("$PYTHON" -m blockstate.cli)
# the test files with CUDA-only tests (skipped without CUDA; their names hold "cuda"):
# tests/test_gpu_check.py checks that this list names every test file that asks for CUDA
CUDA_TESTS=(tests/test_conv.py tests/test_selective.py)

if [ "$DRY" = 1 ]; then
    MODE=dry-run DEVICE=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # a small corpus of its own, so that nothing is downloaded or tokenized at length
    DATA="$OUT/dry_corpus"
    mkdir -p "$DATA"
    for i in $(seq 0 39); do
        printf 'document %d\n%s\n' "$i" "$(seq -s ' ' "$i" $((i + 150)))" >"$DATA/doc$i.txt"
    done
    T_TESTS=120 T_TRAIN=120 T_LAYERS=120 T_GENERATION=120
    TRAIN=(--size tiny --data "$DATA" --seq-len 64 --batch-size 4 --max-steps 3 --eval-every 1000
           --eval-batches 1 --log-every 1 --sample-tokens 0 --cache-dir "$OUT/cache")
    # float32: on a CPU without bfloat16 instructions the benchmark's 2048-square bfloat16 matrix
    # product (its measure of the machine) alone takes minutes (104 s on a CI-like machine)
    LAYERS=(--widths 64:4 --lengths 256 --repeats 1 --budget 1 --max-seconds 10 --dtype float32)
    GENERATION=(--size tiny --lengths 256 --batches 1 --new-tokens 4)
else
    MODE=gpu DEVICE=cuda
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: $PYTHON's torch sees no CUDA device; use --dry-run to check the script on a CPU" >&2
        exit 2
    fi
    DATA=python-stdlib  # this interpreter's standard library source: on disk, nothing to download
    # limits per stage, in seconds: 8 minutes in all
    T_TESTS=60 T_TRAIN=180 T_LAYERS=150 T_GENERATION=90
    TRAIN=(--size small --data "$DATA" --max-steps 300 --max-time 120s --compile --eval-every 100
           --sample-tokens 0)
    LAYERS=(--widths 512:16 --lengths 8192,16384,32768,65536 --repeats 3 --budget 8
            --max-seconds 20 --dtype bfloat16)
    GENERATION=(--size small --lengths 8192,65536 --batches 1,8 --new-tokens 64)
fi

STATUS="$OUT/stages.tsv"  # stage, status, exit code, seconds
: >"$STATUS"
run_stage() {  # run_stage NAME LIMIT COMMAND...: run under a time limit, log to OUT/NAME/log.txt
    local name=$1 limit=$2; shift 2
    mkdir -p "$OUT/$name"
    echo "== $name (at most ${limit}s): $*" | tee "$OUT/$name/log.txt"
    local start=$SECONDS code
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name/log.txt" 2>&1
    code=$?
    local status=passed
    if [ $code = 124 ] || [ $code = 137 ]; then status=timeout; elif [ $code != 0 ]; then status=failed; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$code" $((SECONDS - start)) >>"$STATUS"
    echo "   $status in $((SECONDS - start))s (log: $OUT/$name/log.txt)"
    tail -n 3 "$OUT/$name/log.txt" | sed 's/^/   | /'
}

cd "$ROOT"
echo "gpu_check: $MODE on $DEVICE; output in $OUT"
run_stage tests "$T_TESTS" "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k cuda \
    "${CUDA_TESTS[@]}" --junitxml "$OUT/tests/junit.xml"
run_stage train "$T_TRAIN" "${BS[@]}" train --model bst-sh-s4 --precision bf16 --device "$DEVICE" \
    --out "$OUT/train/run" --overwrite --quiet "${TRAIN[@]}"
run_stage layers "$T_LAYERS" "${BS[@]}" bench layers --device "$DEVICE" \
    --layers bst-sh-s4,brt,slide --out "$OUT/layers/layers" "${LAYERS[@]}"
run_stage generation "$T_GENERATION" "${BS[@]}" bench generation --device "$DEVICE" \
    --models bst-sh-s4,brt,slide --out "$OUT/generation/generation" "${GENERATION[@]}"

"$PYTHON" "$ROOT/scripts/gpu_check_report.py" "$OUT" --mode "$MODE"
code=$?
bundle=$(mktemp)
tar -czf "$bundle" -C "$OUT" --exclude=checkpoints --exclude=dry_corpus --exclude=cache \
    --exclude=gpu_check.tar.gz . && mv "$bundle" "$OUT/gpu_check.tar.gz"
rm -f "$bundle"
echo "gpu_check: $OUT/summary.md, $OUT/summary.json, $OUT/gpu_check.tar.gz"
exit $code
