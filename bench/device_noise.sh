#!/usr/bin/env bash
# One device call: where the spread in matmul speed comes from (the same kernel on the same
# shape ran 1.9-4.8x apart between processes in bench/device_tuning.sh). nvidia-smi logs clocks,
# power, utilization and throttle reasons every 200 ms throughout (idle spells at the start and
# end show whether anything else uses the GPU); `tuna bench matmul --rounds 8` times each
# product again on 8 freshly allocated operand pairs, each behind a spacer of another size;
# then TinyLlama training from an empty cache, with its tuning decisions logged.
# Carry .gl and .dev (tuna.xz). At most 8 files in $OUT.
set -u
. bench/device_env.sh
nvidia-smi --query-gpu=timestamp,utilization.gpu,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active,memory.used \
  --format=csv -lms 200 > "$OUT/smi.csv" &
SMI=$!
t0=$(date +%s)
log() { echo "$(date +%T.%N | cut -c1-12) $*" | tee -a "$OUT/log.txt"; }
log "idle"; sleep 5
nvidia-smi --query-compute-apps=pid,used_memory --format=csv >> "$OUT/log.txt" 2>&1
log "matmul rounds"
timeout "${MM_TIMEOUT:-150}" /tmp/tuna bench matmul --device vulkan --dtype f16 --rounds 8 --iters 10 \
  --cases "${MM_CASES:-tinyllama q fwd,tinyllama up fwd,tinyllama up dx,tinyllama scores}" \
  > "$OUT/matmul.json" 2>> "$OUT/log.txt"
python3 - "$OUT/matmul.json" <<'PY' | tee -a "$OUT/log.txt"
import json, sys
for c in json.load(open(sys.argv[1]))["cases"]:
    print(f"{c['case']:<22} passes {' '.join(f'{x:.3f}' for x in c['ms_passes'])}  rounds {' '.join(f'{x:.3f}' for x in c['round_ms'])} ms")
PY
log "training"
mkdir -p /tmp/tr && printf '[autotune]\nlevel = "full"\n[autotune.decisions]\nfile = "%s"\n' "$OUT/decisions-train.jsonl" > /tmp/tr/cubecl.toml
(cd /tmp/tr && timeout "${CASE_TIMEOUT:-200}" /tmp/tuna bench train --device vulkan --shape tinyllama-1.1b --dtype f16 \
  > "$OUT/train.json" 2>> "$OUT/log.txt")
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('train tok/s', round(d['tokens_per_s']), 'warmup s', round(d['warmup_s'], 1))" "$OUT/train.json" | tee -a "$OUT/log.txt"
log "matmul again (warm cache)"
timeout 100 /tmp/tuna bench matmul --device vulkan --dtype f16 --rounds 4 --iters 10 \
  --cases "tinyllama q fwd,tinyllama up fwd" 2>/dev/null | python3 -c "
import json, sys
for c in json.load(sys.stdin)['cases']:
    print(c['case'], 'passes', [round(x, 3) for x in c['ms_passes']], 'rounds', [round(x, 3) for x in c['round_ms']])" | tee -a "$OUT/log.txt"
log "idle"; sleep 5; log "done, $(( $(date +%s) - t0 )) s"
kill $SMI
python3 - "$OUT/smi.csv" <<'PY' | tee -a "$OUT/log.txt"
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))[1:]
sm = [int(r[2].split()[0]) for r in rows if r[2].strip().split()[0].isdigit()]
reasons = collections.Counter(r[6].strip() for r in rows)
print("samples", len(rows), "sm clock min/median/max", min(sm), sorted(sm)[len(sm)//2], max(sm))
print("throttle reasons", dict(reasons))
print("util during first 5 s", [r[1].strip() for r in rows[:25]])
PY
