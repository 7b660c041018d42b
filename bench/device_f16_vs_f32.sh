#!/usr/bin/env bash
# Issue 9's mixed-precision check on the GPU: SmolLM2-135M-Instruct (the main job's model,
# made dense with `tuna convert`) trained 200 steps on the diagnosis data in f16 and in f32
# (bench/f16_vs_f32.yaml), same GPU, same call; prints both runs' train and validation losses.
# The 98 MB GGUF does not fit one call's 64 MiB, so it comes in two halves: the call before this
# one copied .carry1/smol.part1 to /root; this one brings .carry2/smol.part2 to the same warm
# machine. The binary is the one the call before unpacked to /tmp/tuna.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -x /tmp/tuna ] && [ -f /root/smol.part1 ] || { echo "not the warm machine of the call before"; exit 3; }
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export TUNA_CACHE=/tmp/tuna-cache
cat /root/smol.part1 .carry2/smol.part2 > /root/smol.gguf
sha256sum /root/smol.gguf | tee "$OUT/gguf.sha256"
/tmp/tuna convert /root/smol.gguf /root/smol-hf > "$OUT/convert.log" 2>&1 || { cat "$OUT/convert.log"; exit 4; }
for dt in f16 f32; do
  t0=$(date +%s)
  timeout 250 /tmp/tuna train bench/f16_vs_f32.yaml --set model=/root/smol-hf --set output.dir=/tmp/o-$dt \
    --device vulkan --dtype $dt > "$OUT/train-$dt.log" 2>&1
  echo "$dt rc=$? wall_s=$(( $(date +%s) - t0 ))"
  m=$(ls /tmp/o-$dt/f16-vs-f32/*/metrics.jsonl | head -1); cp "$m" "$OUT/metrics-$dt.jsonl"
  cp "$(dirname "$m")/metrics.json" "$OUT/summary-$dt.json" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
def rows(dt):
    return [json.loads(l) for l in open(f"{o}/metrics-{dt}.jsonl") if l.strip()]
r16, r32 = rows("f16"), rows("f32")
def last(rs, kind, key):
    xs = [r for r in rs if r.get("kind") == kind and key in r]
    return xs[-1] if xs else {}
for kind, key in (("train", "train_loss"), ("val", "val_loss")):
    a, b = last(r16, kind, key), last(r32, kind, key)
    if a and b:
        print(f"{kind:5} step {a.get('step')}: f16 {a[key]:.5f}  f32 {b[key]:.5f}  rel diff {abs(a[key]-b[key])/b[key]*100:.2f} %")
skipped = [r for r in r16 if r.get("skipped_steps")]
print("f16 skipped steps / loss scale at the end:", (skipped[-1].get("skipped_steps"), skipped[-1].get("loss_scale")) if skipped else "none logged")
PY
