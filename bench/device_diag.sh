#!/usr/bin/env bash
# Where a training step's time goes on the GPU machine, in one device call:
#   1. matrix-product throughput at the step's shapes, tuna (burn, Vulkan) vs torch.matmul (cuBLAS),
#      with the autotune's decisions logged, at the default and at the `full` autotune level;
#   2. GPU utilization while TinyLlama 8 x 512 trains (nvidia-smi every 100 ms);
#   3. a per-kernel profile of the same step (cubecl's profile-medium).
# Expects .dev/tuna.xz (stripped release binary) and .gl/ (Vulkan loader packages).
set -u
. bench/device_env.sh
T=/tmp/tuna
# The first half of the SmolLM2 GGUF, for bench/device_f16_vs_f32.sh right after this call.
[ -f .carry1/smol.part1 ] && cp .carry1/smol.part1 /root/
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
echo "--- matmul: torch (cuBLAS)"
python3 bench/peer_matmul.py f16 > "$OUT/matmul-peer.json" 2>/dev/null
echo "--- matmul: tuna, default autotune"
CUBECL_DEBUG_LOG=/tmp/at.log timeout 200 $T bench matmul --device vulkan --dtype f16 > "$OUT/matmul-tuna.json" 2>/dev/null
grep -iE "fastest|winner|select|cmma" /tmp/at.log | head -c 200000 > "$OUT/autotune.log" 2>/dev/null
echo "--- matmul: tuna, autotune level full (fresh cache)"
(TUNA_CACHE=/tmp/tc-full CUBECL_AUTOTUNE_LEVEL=full timeout 200 $T bench matmul --device vulkan --dtype f16 > "$OUT/matmul-tuna-full.json" 2>/dev/null)
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
def load(n):
    try: return {c["case"]: c for c in json.load(open(f"{o}/{n}"))["cases"]}
    except Exception as e: print(n, "missing", e); return {}
p, t, f = load("matmul-peer.json"), load("matmul-tuna.json"), load("matmul-tuna-full.json")
print(f"{'case':<24} {'cuBLAS TF':>9} {'tuna TF':>8} {'ratio':>6} {'full TF':>8} {'ms tuna':>8} {'ms peer':>8}")
for k, r in p.items():
    tt, ff = t.get(k, {}), f.get(k, {})
    print(f"{k:<24} {r['tflops']:9.1f} {tt.get('tflops',0):8.1f} {tt.get('tflops',0)/r['tflops']:6.2f} {ff.get('tflops',0):8.1f} {tt.get('ms',0):8.3f} {r['ms']:8.3f}")
PY
echo "--- TinyLlama 8x512 f16 train: utilization"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 100 > "$OUT/util.csv" &
SMI=$!
timeout 240 $T bench train --device vulkan --shape tinyllama-1.1b --dtype f16 --steps 10 > "$OUT/train-tinyllama.json" 2>"$OUT/train-tinyllama.err"
kill $SMI; tail -1 "$OUT/train-tinyllama.json"
python3 -c "
import sys
u=[int(l.split(',')[1].split()[0]) for l in open('$OUT/util.csv') if l.count(',')>=2]
u=[x for x in u if x>0]; print('util samples', len(u), 'mean busy %', sum(u)/max(1,len(u)))"
echo "--- TinyLlama profile"
CUBECL_DEBUG_LOG=/tmp/prof.log CUBECL_DEBUG_OPTION=profile-medium timeout 150 $T bench train --device vulkan --shape tinyllama-1.1b --dtype f16 --steps 3 --warmup 1 > "$OUT/prof-bench.json" 2>/dev/null
python3 bench/prof_top.py /tmp/prof.log 30 > "$OUT/prof-top.txt"
head -32 "$OUT/prof-top.txt"; cat "$OUT/prof-bench.json"
