#!/usr/bin/env bash
# This session's engine measurements in one device call (README "Measured speed"):
#   1. bench/compare.py: tuna bench train vs PyTorch + PEFT, same GPU, same call, with the flat
#      optimizer's effect on its own (the *-each cases);
#   2. with .dev/tuna-before.xz, the build before this session's changes on some cases, tuna only;
#   3. a new process on the warm kernel cache: time to the first step done;
# The GPU parity test runs in the next call on the same warm machine (bench/device_parity.sh):
# its test binary and reference models do not fit this call's 64 MiB beside the tuna binary.
set -u
. bench/device_env.sh
CASES=${CASES:-seed004,tinyllama-f16,tinyllama-f16-gc,smollm2-f16,smollm2-f16-each,tinyllama-f16-each}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" --timeout "${CASE_TIMEOUT:-150}"
if [ -f .dev/tuna-before.xz ]; then
  echo "--- the build before this session's engine changes"
  xz -dc .dev/tuna-before.xz >/tmp/tuna-before && chmod +x /tmp/tuna-before
  mkdir -p "$OUT/before"
  python3 bench/compare.py --tuna /tmp/tuna-before --skip-peer --cases "${BEFORE_CASES:-tinyllama-f16,smollm2-f16}" \
    --out "$OUT/before" --timeout "${CASE_TIMEOUT:-150}"
fi
echo "--- warm second process"
t0=$(date +%s%N)
/tmp/tuna bench train --device vulkan --shape tinyllama-1.1b --dtype f16 --steps 1 --warmup 1 > "$OUT/warm.json" 2>&1
echo "first step (load + 1 warmup + 1 step) wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))"; tail -1 "$OUT/warm.json"
du -sh "$TUNA_CACHE/kernels" 2>/dev/null
