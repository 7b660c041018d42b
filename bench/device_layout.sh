#!/usr/bin/env bash
# One device call: dense base weights held `[in, out]` (TUNA_WEIGHT_LAYOUT=in-out, cases `*-wt`)
# against the checkpoint's `[out, in]` (the default). First the step's products in both layouts
# one at a time (`tuna bench matmul`, two timed passes each, beside bench/peer_matmul.py's
# cuBLAS), then training against PyTorch + PEFT (bench/compare.py; a `-wt` case shares its peer
# run with the case without it). Carry .gl and .dev (tuna.xz). The switch was measured and removed
# again: the `-wt` cases need a build of commit 3609cc5 (with its bench/compare.py).
set -u
. bench/device_env.sh
t0=$(date +%s)
echo "--- matmul: torch (cuBLAS)"
python3 bench/peer_matmul.py f16 > "$OUT/matmul-peer.json" 2>/dev/null
echo "--- matmul: tuna, $(( $(date +%s) - t0 )) s in"
timeout "${MM_TIMEOUT:-200}" /tmp/tuna bench matmul --device vulkan --dtype f16 \
  --cases "${MM_CASES:-tinyllama,smollm2 up,layout}" > "$OUT/matmul.json" 2> "$OUT/matmul.rows"
python3 - "$OUT" <<'PY' | tee "$OUT/matmul.txt"
import json, sys
sys.path.insert(0, "bench")
from rows import rows
o = sys.argv[1]
p = {c["case"]: c for c in json.load(open(f"{o}/matmul-peer.json"))["cases"]}
t = rows(f"{o}/matmul.rows")
print(f"{'case':<24} {'layout':>6} {'cuBLAS TF':>9} {'tuna TF':>8} {'ratio':>6} {'pass1 ms':>9} {'pass2 ms':>9} {'warm s':>7}")
for k, r in t.items():
    c = p.get(k, {}).get("tflops", 0)
    ratio = f"{r['tflops'] / c:.2f}" if c else "-"
    a, b = r.get("ms_passes", [0, 0])
    print(f"{k:<24} {r['layout']:>6} {c:9.1f} {r['tflops']:8.1f} {ratio:>6} {a:9.3f} {b:9.3f} {r['warmup_s']:7.1f}")
PY
echo "--- training, $(( $(date +%s) - t0 )) s in"
CASES=${CASES:-tinyllama-f16,tinyllama-f16-wt,smollm2-f16,smollm2-f16-wt}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" \
  --timeout "${CASE_TIMEOUT:-150}" | tee "$OUT/compare.txt" | tail -9
echo "--- done, $(( $(date +%s) - t0 )) s"
