#!/usr/bin/env bash
# One device call: does burn's fusion stop exploring once a training step repeats? The host
# profile of SmolLM2's steady state (bench/device_host_profile.sh) spends half of fusion's
# thread in Explorer::explore and block merging. This runs `tuna bench train` with burn's fusion
# log (BURN_FUSION_LOG=full) and counts, per step (the bench's step markers), the plans it
# executed from its cache and the explorations it ran; then the host time per step over a longer
# run without the log. Carry .gl and .dev (tuna.xz).
set -u
. bench/device_env.sh
shape=${SHAPE:-smollm2-135m}
# Fill the autotune cache first, so that the logged run's steps are fusion's alone.
timeout 200 /tmp/tuna bench train --device vulkan --shape "$shape" --dtype f16 --steps 3 --warmup 3 >"$OUT/warm.json" 2>/dev/null
echo "warm rc=$?"
BURN_FUSION_LOG=${LEVEL:-full} timeout 200 /tmp/tuna bench train --device vulkan --shape "$shape" --dtype f16 \
  --steps "${LOG_STEPS:-3}" --warmup "${LOG_WARMUP:-3}" >"$OUT/logged.json" 2>"$OUT/fusion.log"
echo "logged rc=$? lines $(wc -l <"$OUT/fusion.log")"
python3 - "$OUT/fusion.log" <<'PY'
import collections, re, sys
step, counts, order = "load", collections.defaultdict(collections.Counter), []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\[tuna bench train\] (\w+) step (\d+)", line)
    if m:
        step = f"{m.group(1)}{m.group(2)}"; order.append(step); continue
    for key, pat in (("cache_hit", "cache hit"), ("exploration_completed", "exploration completed"),
                     ("explore_calls", "[explorer] explore"), ("unfused", "unfused"), ("lines", "")):
        if pat in line:
            counts[step][key] += 1
for s in ["load"] + order:
    print(s, dict(counts[s]))
PY
xz -T4 "$OUT/fusion.log"
timeout 200 /tmp/tuna bench train --device vulkan --shape "$shape" --dtype f16 --steps "${STEPS:-60}" --warmup 3 \
  >"$OUT/long.json" 2>/dev/null
python3 -c "import json; d=json.load(open('$OUT/long.json')); print('tok/s', round(d['tokens_per_s']), 'enqueue per step', d['enqueue_s_per_step'])"
