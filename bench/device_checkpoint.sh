#!/usr/bin/env bash
# One device call (2026-12-03): training with block checkpointing, where attention then kept its
# probabilities (the explicit path; since replaced by the recompute op), against the composed path it
# replaced (`case@composed`, tuna only: the peer row is the case's own) and PyTorch + PEFT; the
# uncheckpointed cases for the same-call table; then the GPU parity test (bench/device_parity.sh)
# when .dev/all.xz is there. Carry .gl and .dev (tuna.xz). The parity payload (all.xz,
# reference.tar.xz) does not fit beside tuna.xz in one call's 64 MiB: run bench/device_parity.sh
# in a call of its own.
set -u
. bench/device_env.sh
CASES=${CASES:-seed004,seed004@composed,tinyllama-f16-gc,tinyllama-f16-gc@composed,tinyllama-f16,smollm2-f16}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" --timeout "${CASE_TIMEOUT:-150}" \
  | tee "$OUT/compare.txt" | tail -12
if [ -f .dev/all.xz ]; then bash bench/device_parity.sh | tee "$OUT/parity.txt" | tail -8; fi
