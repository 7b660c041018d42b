#!/usr/bin/env bash
# One device call for the recompute attention op (`model::attention_op`, training's default
# since 2026-12-03): the GPU parity test first (tests/model_parity.rs through
# bench/device_parity.sh, when .dev/all.xz is there), then training beside PyTorch + PEFT
# with the default path, and `case@composed` (the former default, tuna only) for the same-call
# ratio. Carry .gl and .dev (tuna.xz, all.xz, reference.tar.xz: about 62 MB, under a call's
# 64 MiB).
set -u
. bench/device_env.sh
if [ -f .dev/all.xz ]; then PARITY_TIMEOUT=${PARITY_TIMEOUT:-200} bash bench/device_parity.sh | tee "$OUT/parity.txt" | tail -12; fi
CASES=${CASES:-tinyllama-f16,tinyllama-f16@composed,smollm2-f16,seed004,tinyllama-f16-gc}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" --timeout "${CASE_TIMEOUT:-150}" \
  | tee "$OUT/compare.txt" | tail -12
