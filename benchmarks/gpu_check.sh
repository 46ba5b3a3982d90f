#!/usr/bin/env bash
# One GPU check of medgen, under 8 minutes on one GPU; JSON per step under the output folder.
#
#   bash benchmarks/gpu_check.sh                      # on a GPU machine: benchmarks/results/gpu/
#   bash benchmarks/gpu_check.sh --dry-run --output /tmp/gpu_check   # CPU, tiny, seconds (CI)
#
# Steps (benchmarks/gpu_check.py STEP; each in its own process with a time limit):
#   triton   fused Triton GroupNorm+SiLU vs the float64 reference: values and gradients, fp32/bf16
#            (CPU: Triton's interpreter), and on a GPU its time vs ATen and the eager composite
#   nets     bench_nets.py --precision bf16: ours vs MONAI, time and peak memory, eager + compiled
#   train    a few bf16 training steps of every experiment: peak memory, steps/s
#   presets  every 3D experiment with the largest hardware=gpuNN preset this GPU holds: peak vs preset
#   decode   bench_autoencoders.py at 256^3: whole vs tiled (layer by layer, blended) decoding
# Writes triton.json, nets.json, training.json, presets.json, decode.json, summary.json and
# logs/<step>.log. Exit status: 0 when every step passed, 1 when any failed or ran out of time,
# 2 for bad arguments or no GPU (without --dry-run).
#
# Options: --dry-run (CPU, tiny sizes, every step at its smallest setting, no compilation)
#          --output DIR (default benchmarks/results/gpu)   --steps "triton nets ..." (a subset)
#          --experiments "ddpm_3d ..." (train and presets steps only)   --python PY (default: python)
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTPUT="$ROOT/benchmarks/results/gpu"
DRY_RUN=0
STEPS="triton nets train presets decode"
PYTHON="${PYTHON:-python}"
EXPERIMENTS=""

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --output) OUTPUT="$2"; shift ;;
        --output=*) OUTPUT="${1#*=}" ;;
        --steps) STEPS="$2"; shift ;;
        --experiments) EXPERIMENTS="$2"; shift ;;
        --python) PYTHON="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUTPUT/logs" || exit 2
OUTPUT="$(cd "$OUTPUT" && pwd)"
cd "$ROOT" || exit 2

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    EXTRA=(--dry-run)
    # step: seconds allowed (CPU, tiny)
    declare -A LIMIT=([triton]=120 [nets]=120 [train]=120 [presets]=120 [decode]=120)
else
    DEVICE=cuda
    EXTRA=()
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check.sh: no CUDA GPU visible; use --dry-run on a CPU" >&2
        exit 2
    fi
    # Sums to 455 s: with start-up, under 8 minutes on one GPU.
    declare -A LIMIT=([triton]=45 [nets]=130 [train]=100 [presets]=90 [decode]=90)
fi

FAILED=0
STATUS="$OUTPUT/logs/status.tsv"
: > "$STATUS"
for step in $STEPS; do
    if [ -z "${LIMIT[$step]:-}" ]; then
        echo "gpu_check.sh: unknown step $step" >&2
        exit 2
    fi
    limit="${LIMIT[$step]}"
    env_vars=()
    if [ "$step" = triton ] && [ "$DEVICE" = cpu ]; then
        env_vars=(TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=)
    fi
    budget=()
    if [ "$step" = train ] || [ "$step" = presets ]; then
        budget=(--budget-s $((limit * 3 / 4)))  # start no new run in the last quarter
        # shellcheck disable=SC2206
        [ -n "$EXPERIMENTS" ] && budget+=(--experiments $EXPERIMENTS)
    fi
    start=$(date +%s)
    echo "== $step (limit ${limit} s)"
    env "${env_vars[@]}" timeout --kill-after=15 "$limit" "$PYTHON" benchmarks/gpu_check.py "$step" \
        --device "$DEVICE" --output "$OUTPUT" "${EXTRA[@]}" "${budget[@]}" \
        > "$OUTPUT/logs/$step.log" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then
        state=ok
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        state=timeout
    else
        state=failed
    fi
    [ "$state" = ok ] || FAILED=1
    printf '%s\t%s\t%s\t%s\n' "$step" "$state" "$rc" "$seconds" >> "$STATUS"
    echo "   $state (exit $rc, ${seconds} s); log: $OUTPUT/logs/$step.log"
    [ "$state" = ok ] || tail -n 20 "$OUTPUT/logs/$step.log" | sed 's/^/   | /'
done

"$PYTHON" - "$STATUS" "$OUTPUT" "$DEVICE" "$DRY_RUN" <<'EOF'
import json, sys, time
from pathlib import Path

status, output, device, dry = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
steps = {}
for line in Path(status).read_text().splitlines():
    name, state, rc, seconds = line.split("\t")
    steps[name] = {"status": state, "exit_code": int(rc), "seconds": int(seconds)}
summary = {
    "device": device,
    "dry_run": dry,
    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    "passed": all(s["status"] == "ok" for s in steps.values()),
    "steps": steps,
}
(output / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
exit "$FAILED"
