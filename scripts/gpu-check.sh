#!/usr/bin/env bash
# Runs on a lent GPU machine, in the repository root, with .gpu/ carried
# (scripts/gpu-payload.sh makes it): unpacks the CUDA build of `nexus`, finds
# the CUDA 13 libraries there (the toolkit's, or PyTorch's wheels), and runs
# `nexus gpu-check run` against the bundle's CPU results: equivalences first,
# then encoder windows/s and decoder tokens/s at batch sizes 1-64 in f16 and
# f32. Everything it prints and writes lands in $OUT (the run tool brings it
# back): gpu.csv, ldd.txt, gpu-check.log, report.json. Arguments go to
# `nexus gpu-check run`. DEVICE=cpu (with the link stubs on LD_LIBRARY_PATH)
# rehearses the whole script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" /tmp/nexus-gpu
DEVICE=${DEVICE:-cuda}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/gpu.csv"
else
  echo "no nvidia-smi on this machine" | tee "$OUT/gpu.csv"
fi

libs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs=$libs:$d
done
for p in $(python3 -c 'import nvidia, sys; print(" ".join(nvidia.__path__))' 2>/dev/null); do
  for d in "$p"/*/lib; do   # cu13/lib among them
    [ -d "$d" ] && libs=$libs:$d
  done
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}$libs

xz -dc .gpu/nexus.xz >/tmp/nexus-gpu/nexus && chmod +x /tmp/nexus-gpu/nexus || exit 1
xz -dc .gpu/bundle.tar.xz | tar -C /tmp/nexus-gpu -xf - || exit 1
ldd /tmp/nexus-gpu/nexus | tee "$OUT/ldd.txt" | grep -E "cuda|cublas|curand|nvrtc"
if grep -q "not found" "$OUT/ldd.txt"; then
  echo "gpu-check.sh: a CUDA library is missing (ldd.txt); LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
  exit 1
fi
/tmp/nexus-gpu/nexus gpu-check run --bundle /tmp/nexus-gpu/bundle --device "$DEVICE" \
  --report "$OUT/report.json" "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
