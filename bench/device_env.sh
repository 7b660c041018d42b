# Sourced by the bench/device_*.sh commands: the Vulkan loader carried in .gl/ (packages named in
# the device README), the NVIDIA driver's ICD, tuna's cache folder, and the tuna binary from
# .dev/tuna.xz (a stripped release build) at /tmp/tuna when it was carried.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export TUNA_CACHE=${TUNA_CACHE:-/tmp/tuna-cache} PYTHONUNBUFFERED=1; mkdir -p "$TUNA_CACHE"
if [ -f .dev/tuna.xz ]; then xz -dc .dev/tuna.xz >/tmp/tuna && chmod +x /tmp/tuna; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
