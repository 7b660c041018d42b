#!/usr/bin/env bash
# One device call: cubek's Cmma matmul routines with forced tile plans against the plans burn's
# autotuner infers (`tuna bench matmul --blueprints`), then the same products through burn's
# tensor API (the autotuned default) and through torch.matmul (cuBLAS) for the same-call ratio.
# Carry .gl and .dev (tuna.xz).
set -u
. bench/device_env.sh
timeout "${SWEEP_TIMEOUT:-330}" /tmp/tuna bench matmul --device vulkan --dtype f16 --blueprints \
  --iters "${ITERS:-20}" --top "${TOP:-6}" >"$OUT/blueprints.json" 2>"$OUT/blueprints.log"
echo "sweep rc=$?"; grep -c tflops "$OUT/blueprints.log"
python3 - "$OUT/blueprints.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for case in dict.fromkeys(r["case"] for r in rows):
    ok = sorted((r for r in rows if r["case"] == case and "tflops" in r), key=lambda r: -r["tflops"])
    print(f"== {case}: {len(ok)} ran")
    for r in ok[:8]: print(f"  {r['tflops']:7.1f} TFLOP/s  {r['plan']}")
    for r in ok:
        if r["plan"].startswith("inferred"): print(f"  {r['tflops']:7.1f} TFLOP/s  {r['plan']}")
PY
errs=$(grep -c '"error"' "$OUT/blueprints.log"); echo "plans that did not run: $errs"
grep '"error"' "$OUT/blueprints.log" | head -3 | cut -c1-400
C="tinyllama up fwd,tinyllama q fwd,tinyllama down fwd,tinyllama up dx,tinyllama down dx,smollm2 up fwd"
timeout 150 /tmp/tuna bench matmul --device vulkan --dtype f16 --cases "$C" >"$OUT/matmul.json" 2>"$OUT/matmul.log"; echo "burn rc=$?"
timeout 120 python3 bench/peer_matmul.py f16 >"$OUT/peer.json" 2>"$OUT/peer.log"; echo "peer rc=$?"
python3 - "$OUT/matmul.json" "$OUT/peer.json" <<'PY'
import json, sys
t = {c["case"]: c for c in json.load(open(sys.argv[1]))["cases"]}
p = {c["case"]: c for c in json.load(open(sys.argv[2]))["cases"]}
for k, c in t.items():
    if k in p: print(f"{k:28s} burn {c['tflops']:7.1f}  cuBLAS {p[k]['tflops']:7.1f} TFLOP/s")
PY
