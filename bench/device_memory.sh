#!/usr/bin/env bash
# One device call for issue 11: the Mistral-7B shape at batch 1 × 512 with grad checkpoint on a
# 4-bit base (cold autotune cache, then warm, as a sweep's later runs see it) and on the f16 base,
# tuna only (no peer here); then the GPU parity test when .dev/all.xz is carried.
set -u
. bench/device_env.sh
python3 bench/compare.py --tuna /tmp/tuna --skip-peer --out "$OUT" --timeout "${CASE_TIMEOUT:-200}" \
  --cases "${CASES:-mistral7b-q4-gc,mistral7b-q4-gc-warm,mistral7b-f16-gc}" \
  2>&1 | tee "$OUT/compare.txt"
if [ -f .dev/all.xz ]; then bash bench/device_parity.sh 2>&1 | tee "$OUT/parity.txt"; fi
