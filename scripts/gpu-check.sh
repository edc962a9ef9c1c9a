#!/usr/bin/env bash
# One command on a CUDA machine (aimed at under 8 minutes on one modern GPU):
#   1. the tests marked `gpu` (tests/gpu: train in fp32/bf16/fp16, QLoRA, eval, generate, merge, serve, DDP/FSDP);
#   2. a 100-step default run on cuda in bf16, with its held-out scores before and after;
#   3. the precision step benchmark on cuda (floor, lorakit, PEFT, full fine-tuning; fp32 vs bf16 autocast): bench/precision.py.
# Sets up nothing beyond `make setup`; prints one summary table; exits non-zero when any part fails.
#   bash scripts/gpu-check.sh            logs and outputs: runs/gpu-check-logs/, runs/gpu-check/,
#                                        bench/results/precision_cuda.json
set -uo pipefail
cd "$(dirname "$0")/.."

make setup || exit 1
PY=.venv/bin/python
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device" >&2
    exit 2
fi

LOGS=runs/gpu-check-logs
mkdir -p "$LOGS"
rows=()
failed=0

# step NAME LOG COMMAND...: run it with its output in LOG (and on screen), record its status and time.
step() {
    local name=$1 log=$2 began=$SECONDS code
    shift 2
    echo "== $name: $*"
    "$@" 2>&1 | tee "$log"
    code=${PIPESTATUS[0]}
    [ "$code" -eq 0 ] || failed=1
    rows+=("$name|$([ "$code" -eq 0 ] && echo ok || echo "FAILED (exit $code)")|$((SECONDS - began)) s|$log")
}

rm -f runs/gpu-check/results.json bench/results/precision_cuda.json  # no stale figures in the summary
began=$SECONDS
step "gpu tests" "$LOGS/pytest.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
step "train 100 steps, cuda bf16" "$LOGS/train.log" .venv/bin/lorakit train --device cuda --precision bf16 \
    --max-steps 100 --output runs/gpu-check --overwrite
step "precision benchmark" "$LOGS/precision.log" "$PY" bench/precision.py --device cuda

echo
echo "| check | result | time | log |"
echo "|---|---|---|---|"
for row in "${rows[@]}"; do
    echo "| ${row//|/ | } |"
done
echo
"$PY" - <<'EOF'
import json
import re
from pathlib import Path

tests = Path("runs/gpu-check-logs/pytest.log")
summary = [line for line in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
print("gpu tests:", summary[-1].strip("= ") if summary else "no summary line")
run = Path("runs/gpu-check/results.json")
if run.is_file():
    results = json.loads(run.read_text())
    train = results["train"]
    print(
        f"train: {train['steps']} steps, {train['tokens_per_s']:.0f} tokens/s, {train['wall_time_s']:.0f} s, "
        f"final loss {train['final_loss']:.3f}, peak GPU memory {results.get('peak_device_memory_mb', 'n/a')} MB"
    )
    print("| held-out | " + " | ".join(results["after"]) + " |")
    print("|---|" + "---|" * len(results["after"]))
    for tag in ("before", "after"):
        print(f"| {tag} | " + " | ".join(f"{results[tag][k]:.2f}" for k in results["after"]) + " |")
bench = Path("bench/results/precision_cuda.json")
if bench.is_file():
    data = json.loads(bench.read_text())
    print(f"\nprecision benchmark on {data['machine'].get('gpu')} (step median, ×lorakit fp32, peak above model):")
    for shape, row in data["shapes"].items():
        base = row["lorakit fp32"]
        for setup, r in row.items():
            peak = r.get("peak_above_loaded_mb")
            print(
                f"  {shape:>7} {setup:<13} {1e3 * r['step_s']:8.1f} ms  ×{r['step_s'] / base['step_s']:.2f}"
                + (f"  {peak:7.0f} MB" if peak is not None else "")
            )
EOF
echo
echo "gpu-check: $([ "$failed" -eq 0 ] && echo passed || echo FAILED) in $((SECONDS - began)) s"
exit "$failed"
