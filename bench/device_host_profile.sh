#!/usr/bin/env bash
# One device call: where the host's time goes in a host-bound training step. `tuna bench train
# --host-profile` samples every thread's stack through the timed steps (SmolLM2 8 x 512 by
# default; SHAPES for others); bench/host_profile_top.py sums the samples up per thread. The
# binary must keep its symbol table: build .dev/tuna.xz from `strip --strip-debug` (not a full
# strip). Carry .gl and .dev.
set -u
. bench/device_env.sh
for shape in ${SHAPES:-smollm2-135m}; do
  echo "--- $shape ${ENV_LABEL:-}"
  # A first run fills the autotune cache: the profiled run's steps are the steady state.
  timeout 200 /tmp/tuna bench train --device vulkan --shape "$shape" --dtype f16 --steps 3 >/dev/null 2>&1
  # Each thread's true share of a core comes from /proc (the timeline); the samples say where
  # within a thread the time goes.
  python3 bench/host_gpu_timeline.py --tail 4 -- timeout "${PROFILE_TIMEOUT:-200}" /tmp/tuna bench train \
    --device vulkan --shape "$shape" --dtype f16 --steps "${STEPS:-30}" --host-profile "$OUT/host-$shape.folded" \
    --host-profile-hz "${HZ:-4999}" >"$OUT/train-$shape.json" 2>"$OUT/timeline-$shape.txt"
  echo "rc=$?"; grep -v "^t " "$OUT/timeline-$shape.txt" | grep -v "^\[tuna" | tail -7; python3 -c "import json; d=json.load(open('$OUT/train-$shape.json')); print('tok/s', round(d['tokens_per_s']), 's/step', round(d['s_per_step'], 4), 'enqueue_s', round(d['enqueue_s'], 3), 'samples', d['host_profile_samples'], 'per step', d['enqueue_s_per_step'])"
  python3 bench/host_profile_top.py "$OUT/host-$shape.folded" "${TOP:-30}" > "$OUT/host-top-$shape.txt"
  head -c "${HEAD_BYTES:-9000}" "$OUT/host-top-$shape.txt"
  xz -T4 "$OUT/host-$shape.folded"
done
