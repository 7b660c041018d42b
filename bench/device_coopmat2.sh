#!/usr/bin/env bash
# One device call: the step's large products as one workgroup-scope cooperative matrix per cube
# (VK_NV_cooperative_matrix2; `tuna bench matmul --coopmat2`), each plan checked against host sums,
# then torch.matmul (cuBLAS) on the same cases for the same-call ratio. Carry .gl and .dev.
set -u
. bench/device_env.sh
timeout "${SWEEP_TIMEOUT:-300}" /tmp/tuna bench matmul --device vulkan --dtype f16 --coopmat2 \
  --iters "${ITERS:-20}" >"$OUT/coopmat2.json" 2>"$OUT/coopmat2.log"
echo "coopmat2 rc=$?"; grep -v '^{' "$OUT/coopmat2.log" | tail -5 | cut -c1-1500
python3 - "$OUT/coopmat2.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for case in dict.fromkeys(r["case"] for r in rows):
    ok = sorted((r for r in rows if r["case"] == case and "tflops" in r), key=lambda r: -r["tflops"])
    print(f"== {case}: {len(ok)} ran")
    for r in ok[:6]: print(f"  {r['tflops']:7.1f} TFLOP/s  err {r['rel_err']:.2e}  {r['plan']}")
errs = [r for r in rows if "error" in r]
print("did not run:", len(errs)); [print("  ", r["plan"], r["error"][:300]) for r in errs[:4]]
PY
timeout 120 python3 bench/peer_matmul.py f16 >"$OUT/peer.json" 2>"$OUT/peer.log"; echo "peer rc=$?"
python3 -c "
import json; p=json.load(open('$OUT/peer.json'))
[print(f\"{c['case']:28s} cuBLAS {c['tflops']:7.1f}\") for c in p['cases'] if c['case'] in ('tinyllama up fwd','tinyllama q fwd','tinyllama down fwd','tinyllama up dx','tinyllama down dx','smollm2 up fwd')]"
