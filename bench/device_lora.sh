#!/usr/bin/env bash
# One device call: LoRA's skinny products, each stated several ways (`tuna bench matmul --lora`),
# timed on the GPU and checked against the plain statement. Carry .gl and .dev (tuna.xz).
set -u
. bench/device_env.sh
timeout "${LORA_TIMEOUT:-240}" /tmp/tuna bench matmul --device vulkan --dtype f16 --lora --iters "${ITERS:-20}" \
  >"$OUT/lora.json" 2>"$OUT/lora.log"; echo "lora rc=$?"
python3 - "$OUT/lora.log" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        print(f"{r['model']:12s} {r['product']:32s} {r['form']:20s} {r['us']:8.1f} us  err {r['rel_err']:.1e}")
    else:
        print(l.rstrip()[:300])
PY
