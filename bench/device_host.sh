#!/usr/bin/env bash
# One device call: is a training step bound by the host or by the GPU? `tuna bench ops` (the
# host's time per tensor operation), then `tuna bench train`
# (SmolLM2 and TinyLlama, 8 x 512, 40 timed steps) under bench/host_gpu_timeline.py, which
# samples tuna's CPU time and the GPU's utilization every 0.25 s; the summary covers the last
# seconds (timed steps), with the busiest threads' share of a core. Carry .gl and .dev (tuna.xz).
set -u
. bench/device_env.sh
# The host's time per tensor operation, by kind and tracking (`tuna bench ops`).
timeout 120 /tmp/tuna bench ops --device vulkan --dtype f16 >"$OUT/ops.json" 2>"$OUT/ops.log"; echo "ops rc=$?"
grep '^{' "$OUT/ops.log"
for shape in smollm2-135m tinyllama-1.1b; do
  echo "--- $shape"
  python3 bench/host_gpu_timeline.py --tail "${TAIL:-4}" -- timeout 200 /tmp/tuna bench train --device vulkan \
    --shape "$shape" --dtype f16 --steps "${STEPS:-40}" >"$OUT/train-$shape.json" 2>"$OUT/timeline-$shape.txt"
  grep -v "^t " "$OUT/timeline-$shape.txt" | grep -v "^\[tuna" | tail -7; python3 -c "import json; d=json.load(open('$OUT/train-$shape.json')); print('tok/s', round(d['tokens_per_s']), 's/step', round(d['s_per_step'], 4))"
done
