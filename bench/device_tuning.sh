#!/usr/bin/env bash
# One device call: how stable cubecl's autotune picks are. The same matrix products tuned three
# times from an empty cache (`tuna bench matmul`, each process in its own folder whose
# cubecl.toml logs every tuning decision as JSON): twice with cubecl's adaptive sampling (what
# tuna runs today, level `full`), once with a fixed 10 samples per candidate. Then TinyLlama
# training from an empty cache under each sampling, beside PyTorch + PEFT.
# Carry .gl and .dev (tuna.xz).
set -u
. bench/device_env.sh
t0=$(date +%s)
conf() {  # conf NAME [extra toml]: a folder whose cubecl.toml logs decisions to $OUT
  mkdir -p "/tmp/tune-$1"
  printf '[autotune]\nlevel = "full"\n%s\n[autotune.decisions]\nfile = "%s"\n' "${2:-}" \
    "$OUT/decisions-$1.jsonl" > "/tmp/tune-$1/cubecl.toml"
}
FIXED='[autotune.bench]
adaptive = false
max_samples = 10'
conf mm-adaptive1; conf mm-adaptive2; conf mm-fixed "$FIXED"; conf tr-adaptive; conf tr-fixed "$FIXED"
MM="${MM_CASES:-tinyllama q fwd,tinyllama up,tinyllama down,tinyllama scores,tinyllama probs}"
for c in mm-adaptive1 mm-adaptive2 mm-fixed; do
  echo "--- matmul $c, $(( $(date +%s) - t0 )) s in"
  (cd "/tmp/tune-$c" && TUNA_CACHE="/tmp/cache-$c" timeout "${MM_TIMEOUT:-150}" /tmp/tuna bench matmul \
    --device vulkan --dtype f16 --cases "$MM" > "$OUT/matmul-$c.json" 2> "$OUT/matmul-$c.rows")
done
python3 - "$OUT" <<'PY' | tee "$OUT/matmul.txt"
import sys
sys.path.insert(0, "bench")
from rows import rows
o = sys.argv[1]
runs = ["mm-adaptive1", "mm-adaptive2", "mm-fixed"]
rs = {n: rows(f"{o}/matmul-{n}.rows") for n in runs}
print(f"{'case':<24} " + " ".join(f"{n:>13}" for n in runs) + "   (TFLOP/s, warmup s)")
for k in rs[runs[0]]:
    print(f"{k:<24} " + " ".join(f"{rs[n].get(k, {}).get('tflops', 0):7.1f} {rs[n].get(k, {}).get('warmup_s', 0):5.1f}" for n in runs))
PY
for c in tr-adaptive tr-fixed; do
  echo "--- training $c, $(( $(date +%s) - t0 )) s in"
  (cd "/tmp/tune-$c" && TUNA_CACHE="/tmp/cache-$c" timeout "${CASE_TIMEOUT:-200}" /tmp/tuna bench train \
    --device vulkan --shape tinyllama-1.1b --dtype f16 > "$OUT/train-$c.json" 2> "$OUT/train-$c.log")
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'tok/s', round(d['tokens_per_s']), 'warmup s', round(d['warmup_s'], 1))" \
    "$OUT/train-$c.json" "$c" || tail -3 "$OUT/train-$c.log"
done
echo "--- peer, $(( $(date +%s) - t0 )) s in"
python3 bench/peer_peft.py --shape tinyllama-1.1b --dtype f16 > "$OUT/peer.json" 2> "$OUT/peer.log"
python3 -c "import json; d=json.load(open('$OUT/peer.json')); print('peft tok/s', round(d['tokens_per_s']))" || tail -3 "$OUT/peer.log"
echo "--- done, $(( $(date +%s) - t0 )) s"
