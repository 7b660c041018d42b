#!/usr/bin/env bash
# The GPU parity test (tests/model_parity.rs `gpu_matches_reference`, ignored on CPU) on the
# device machine: the release test binary .dev/all.xz (`cargo test --release --no-run --test all`,
# stripped) against .dev/reference (expected.*, tiny-llama, tiny-llama-lora from ../shared/reference).
set -u
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export TUNA_CACHE=/tmp/tuna-cache; mkdir -p "$TUNA_CACHE"
xz -dc .dev/all.xz >/tmp/all && chmod +x /tmp/all
t0=$(date +%s)
TUNA_REFERENCE=$PWD/.dev/reference timeout ${PARITY_TIMEOUT:-400} /tmp/all model_parity --ignored --nocapture 2>&1 | tail -30
echo "parity wall_s=$(( $(date +%s) - t0 ))"
