#!/usr/bin/env bash
# The GPU parity test (tests/model_parity.rs `gpu_matches_reference`, ignored on CPU) on the
# device machine: the release test binary .dev/all.xz (`cargo test --release --no-run --test all`,
# stripped) against .dev/reference (expected.*, tiny-llama, tiny-llama-lora from ../shared/reference;
# carried as that folder or as .dev/reference.tar.xz holding it).
set -u
. bench/device_env.sh
[ -f .dev/reference.tar.xz ] && tar xJf .dev/reference.tar.xz -C .dev
xz -dc .dev/all.xz >/tmp/all && chmod +x /tmp/all
t0=$(date +%s)
TUNA_REFERENCE=$PWD/.dev/reference timeout ${PARITY_TIMEOUT:-400} /tmp/all model_parity --ignored --nocapture 2>&1 | tail -30
echo "parity wall_s=$(( $(date +%s) - t0 ))"
