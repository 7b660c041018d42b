#!/usr/bin/env bash
# One device call for LoRA's branch op (`model::lora_op`, its kernels in `model::lora_kernels`):
# the kernels checked against the plain products at ragged shapes and timed beside every other
# statement of LoRA's skinny products (`tuna bench matmul --lora`), then training beside
# PyTorch + PEFT with the op (the default) and `case-lora-plain` (two plain matmuls, tuna only)
# for the same-call ratio. The GPU parity test first when .dev/all.xz is there. Carry .gl and
# .dev (tuna.xz; all.xz and reference.tar.xz for parity).
set -u
. bench/device_env.sh
if [ -f .dev/all.xz ]; then PARITY_TIMEOUT=${PARITY_TIMEOUT:-200} bash bench/device_parity.sh | tee "$OUT/parity.txt" | tail -12; fi
if [ "${LORA_BENCH:-1}" = 1 ]; then
  TUNA_LORA_BENCH=${LORA_FORMS:-short} timeout "${LORA_TIMEOUT:-150}" /tmp/tuna bench matmul --device vulkan --dtype f16 --lora --iters "${ITERS:-20}" \
    >"$OUT/lora.json" 2>"$OUT/lora.log"; echo "lora rc=$?"
  grep '"check"' "$OUT/lora.log"
  python3 - "$OUT/lora.log" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{") and '"form"' in l:
        r = json.loads(l)
        print(f"{r['model']:12s} {r['product']:32s} {r['form']:14s} {r['us']:8.1f} us  err {r['rel_err']:.1e}")
PY
fi
CASES=${CASES:-smollm2-f16,smollm2-f16-lora-plain,tinyllama-f16,tinyllama-f16-lora-plain}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" --timeout "${CASE_TIMEOUT:-150}" \
  | tee "$OUT/compare.txt" | tail -12
if [ "${PROFILE:-0}" = 1 ]; then
  # A per-kernel profile of SmolLM2 8 x 512 training on the warm cache (cubecl's profile-medium).
  CUBECL_DEBUG_LOG=/tmp/prof.log CUBECL_DEBUG_OPTION=profile-medium timeout "${PROFILE_TIMEOUT:-120}" /tmp/tuna bench train \
    --device vulkan --shape smollm2-135m --dtype f16 --steps 3 --warmup 1 > "$OUT/prof-bench.json" 2>/dev/null
  python3 bench/prof_top.py /tmp/prof.log 40 "(4 steps, 1 warmup)" > "$OUT/prof-top.txt"
  head -25 "$OUT/prof-top.txt"; cat "$OUT/prof-bench.json"
fi
