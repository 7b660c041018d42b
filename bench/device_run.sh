#!/usr/bin/env bash
# One device session's measurements, in one command (see README "Measured speed"):
#   - tuna bench train vs PyTorch+PEFT on every case of bench/compare.py, same GPU, same call;
#   - a second tuna process on a warm autotune cache (first step time);
#   - optionally the GPU parity test binary, if carried in .dev/.
# Expects a stripped, xz-compressed release binary at .dev/tuna.xz (built with `cargo build --release`).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export TUNA_CACHE=/tmp/tuna-cache PYTHONUNBUFFERED=1
mkdir -p "$TUNA_CACHE"
[ -f .dev/kernels.tgz ] && tar xzf .dev/kernels.tgz -C "$TUNA_CACHE"
xz -dc .dev/tuna.xz >/tmp/tuna && chmod +x /tmp/tuna
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
CASES=${CASES:-all}
python3 bench/compare.py --tuna /tmp/tuna --cases "$CASES" --out "$OUT" --timeout "${CASE_TIMEOUT:-240}" ${EXTRA:-}
# A new process with the cache the runs above filled: how long until the first step is done.
echo "--- warm second process"
/tmp/tuna bench train --device vulkan --shape tinyllama-1.1b --dtype f16 --steps 3 --warmup 1 2>&1 | tail -1
# The autotune cache, for a later call to start warm (carry it back as .dev/kernels.tgz).
tar czf "$OUT/kernels.tgz" -C "$TUNA_CACHE" kernels 2>/dev/null
if [ -f .dev/model_parity.xz ]; then
  echo "--- GPU parity test"
  xz -dc .dev/model_parity.xz >/tmp/model_parity && chmod +x /tmp/model_parity
  TUNA_REFERENCE=$PWD/.dev/reference timeout ${PARITY_TIMEOUT:-150} /tmp/model_parity --ignored --nocapture 2>&1 | tail -25
fi
