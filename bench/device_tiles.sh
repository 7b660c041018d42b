#!/usr/bin/env bash
# One device call: burn's matmuls through cubek's tile-DSL routines (a build with the
# `tile-kernels` feature, .dev/tuna-tk.xz) beside the default build's multi-level Cmma candidates
# (.dev/tuna.xz) and cuBLAS: first the step's matrix products one at a time, in every layout
# (`tuna bench matmul`, bench/peer_matmul.py), then training against PyTorch + PEFT
# (bench/compare.py, `NAME+tk` cases run the tile build). Each build keeps its own autotune cache.
# Carry .gl and .dev (tuna.xz, tuna-tk.xz). CASES picks the training cases.
set -u
. bench/device_env.sh
xz -dc .dev/tuna-tk.xz >/tmp/tuna-tk && chmod +x /tmp/tuna-tk
t0=$(date +%s)
echo "--- matmul: torch (cuBLAS)"
python3 bench/peer_matmul.py f16 > "$OUT/matmul-peer.json" 2>/dev/null
echo "--- matmul: tuna, multi-level Cmma (default build)"
timeout "${MM_TIMEOUT:-120}" /tmp/tuna bench matmul --device vulkan --dtype f16 \
  > "$OUT/matmul-cmma.json" 2> "$OUT/matmul-cmma.rows"
echo "--- matmul: tuna, tile-DSL routines (tile-kernels build), $(( $(date +%s) - t0 )) s in"
TUNA_CACHE=/tmp/tuna-cache-tk timeout "${MM_TK_TIMEOUT:-200}" /tmp/tuna-tk bench matmul --device vulkan \
  --dtype f16 ${MM_TK_CASES:+--cases "$MM_TK_CASES"} > "$OUT/matmul-tk.json" 2> "$OUT/matmul-tk.rows"
tail -3 "$OUT/matmul-tk.rows"
python3 - "$OUT" <<'PY' | tee "$OUT/matmul.txt"
import json, sys
sys.path.insert(0, "bench")
from rows import rows
o = sys.argv[1]
p = {c["case"]: c for c in json.load(open(f"{o}/matmul-peer.json"))["cases"]}
c, t = rows(f"{o}/matmul-cmma.rows"), rows(f"{o}/matmul-tk.rows")
print(f"{'case':<24} {'layout':>6} {'cuBLAS TF':>9} {'cmma TF':>8} {'tile TF':>8} {'tile/cmma':>9} {'tile warm s':>11}")
for k, r in p.items():
    cc, tt = c.get(k, {}).get("tflops", 0), t.get(k, {}).get("tflops", 0)
    ratio = f"{tt / cc:.2f}" if cc and tt else "-"
    print(f"{k:<24} {r['layout']:>6} {r['tflops']:9.1f} {cc:8.1f} {tt:8.1f} {ratio:>9} {t.get(k, {}).get('warmup_s', 0):11.1f}")
PY
echo "--- training, $(( $(date +%s) - t0 )) s in"
CASES=${CASES:-smollm2-f16,smollm2-f16+tk}
python3 bench/compare.py --tuna /tmp/tuna --alt tk=/tmp/tuna-tk --cases "$CASES" --out "$OUT" \
  --timeout "${CASE_TIMEOUT:-150}" | tee "$OUT/compare.txt" | tail -8
echo "--- done, $(( $(date +%s) - t0 )) s"
