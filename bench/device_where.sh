#!/usr/bin/env bash
# One device call: where a TinyLlama step's time goes, measured with the GPU's clocks up
# (`keep_busy` before every timed loop; nvidia-smi logs clocks throughout). The step's matrix
# products one at a time beside cuBLAS, causal attention forward + backward by each of tuna's
# paths beside torch's SDPA (bench/peer_attention.py; `recompute` is training's default, the
# model::attention_op node, with its gradients' distance to the explicit path's), then training
# beside PyTorch + PEFT (CASES, e.g. tinyllama-f16,tinyllama-f16@composed). MM_CASES=none skips
# the products.
# Carry .gl and .dev (tuna.xz). At most 8 files in $OUT.
set -u
. bench/device_env.sh
nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,power.draw,memory.used --format=csv -lms 200 > "$OUT/smi.csv" &
SMI=$!
t0=$(date +%s)
echo "--- matmul: torch"
python3 bench/peer_matmul.py f16 > "$OUT/matmul-peer.json" 2>/dev/null
echo "--- matmul: tuna, $(( $(date +%s) - t0 )) s in"
timeout "${MM_TIMEOUT:-200}" /tmp/tuna bench matmul --device vulkan --dtype f16 \
  --cases "${MM_CASES:-tinyllama,layout}" > "$OUT/matmul.json" 2>/dev/null || echo '{"cases": []}' > "$OUT/matmul.json"
echo "--- attention, $(( $(date +%s) - t0 )) s in"
python3 bench/peer_attention.py f16 > "$OUT/attention-peer.json" 2>/dev/null
timeout "${ATT_TIMEOUT:-300}" /tmp/tuna bench attention --device vulkan --dtype f16 --steps 20 --cases "8x512" \
  > "$OUT/attention.json" 2>/dev/null
python3 - "$OUT" <<'PY' | tee "$OUT/tables.txt"
import json, sys
o = sys.argv[1]
p = {c["case"]: c for c in json.load(open(f"{o}/matmul-peer.json"))["cases"]}
print(f"{'product':<24} {'layout':>6} {'cuBLAS TF':>9} {'tuna TF':>8} {'ratio':>6}")
for r in json.load(open(f"{o}/matmul.json"))["cases"]:
    c = p.get(r["case"], {}).get("tflops", 0)
    print(f"{r['case']:<24} {r['layout']:>6} {c:9.1f} {r['tflops']:8.1f} {r['tflops'] / c if c else 0:6.2f}")
pa = {c["case"]: c for c in json.load(open(f"{o}/attention-peer.json"))["cases"]}
paths = ("explicit", "composed", "fused", "recompute")
print(f"\n{'attention fwd+bwd':<18} {'sdpa ms':>8} " + " ".join(f"{x:>10}" for x in paths)
      + "   (largest rel L2 to explicit of out, dq, dk, dv)")
for r in json.load(open(f"{o}/attention.json"))["cases"]:
    ms = {k: v["ms_fwd_bwd"] for k, v in r["paths"].items()}
    err = {k: max(v["rel_l2_vs_explicit"].values()) for k, v in r["paths"].items()}
    print(f"{r['case']:<18} {pa.get(r['case'], {}).get('ms_fwd_bwd', 0):8.3f} "
          + " ".join(f"{ms.get(x, 0):10.3f}" for x in paths) + "   "
          + " ".join(f"{x} {err.get(x, 0):.1e}" for x in paths[1:]))
PY
echo "--- training, $(( $(date +%s) - t0 )) s in"
mkdir -p /tmp/cmp && python3 bench/compare.py --tuna /tmp/tuna --cases "${CASES:-tinyllama-f16,tinyllama-f16@recompute,smollm2-f16,smollm2-f16@recompute}" --out /tmp/cmp \
  --timeout "${CASE_TIMEOUT:-150}" | tail -6 | tee "$OUT/compare.txt"
cp /tmp/cmp/compare.json "$OUT/compare.json"
kill $SMI
echo "--- done, $(( $(date +%s) - t0 )) s"
