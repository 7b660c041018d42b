#!/usr/bin/env bash
# The GPU parity test (tests/model_parity.rs `gpu_matches_reference`, ignored on CPU) on the
# device machine: the release test binary .dev/all.xz (`cargo test --release --no-run --test all`,
# stripped) against .dev/reference (expected.*, tiny-llama, tiny-llama-lora from ../shared/reference).
set -u
. bench/device_env.sh
xz -dc .dev/all.xz >/tmp/all && chmod +x /tmp/all
t0=$(date +%s)
TUNA_REFERENCE=$PWD/.dev/reference timeout ${PARITY_TIMEOUT:-400} /tmp/all model_parity --ignored --nocapture 2>&1 | tail -30
echo "parity wall_s=$(( $(date +%s) - t0 ))"
