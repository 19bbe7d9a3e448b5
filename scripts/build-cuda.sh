#!/usr/bin/env bash
# Builds the fleet's GPU binaries on a machine without a GPU or a CUDA install.
#
#   scripts/build-cuda.sh                  # compute capabilities 8.0 and 9.0
#   scripts/build-cuda.sh --arch 90        # one (repeatable: --arch 80 --arch 90)
#   scripts/build-cuda.sh --toolkit-only   # install the compiler, build nothing
#
# What it makes, per compute capability N, under .cuda/out/sm_N/:
#   nexus-encoder, nexus-decoder   the GPU stages (the `cuda` feature)
#   nexus                          the transcription tool without the fleet's
#                                  servers, with `nexus gpu-check` (the checks
#                                  and figures a lent GPU runs, scripts/gpu-check.sh)
# and .cuda/out/refusal.log: the sm_80 binaries run here, without a GPU, to
# show how they refuse (checked below; the script fails if they don't).
#
# The toolchain. CUDA 13.0's compiler, headers and runtime come from NVIDIA's
# Python wheels (nvcc, nvvm, cuda-runtime, cuda-crt, cuda-cccl), pinned by
# version and SHA-256 below and unpacked into .cuda/toolkit in the layout nvcc
# expects. 13.0 and not the newest: the PTX a build embeds must not be newer
# than the driver that loads it (the lent H200 has driver 580, CUDA 13.0), and
# cudarc 0.19.10 knows CUDA versions up to 13.4 only.
#
# Versions and flags. candle-core 0.11.1 compiles its kernels with nvcc at
# build time (candle-kernels' build script, through cudaforge: PTX for the
# elementwise, reduction and quantized kernels, one static library of the
# GGUF matrix kernels for CUDA_COMPUTE_CAP) and turns on cudarc 0.19.10's
# `dynamic-linking`, so the binaries name libcuda.so.1, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 and libcudart.so.13 as
# shared libraries they need. cudarc reads the CUDA version from
# `nvcc --version` and its link paths from CUDA_ROOT.
#
# Nothing is patched or vendored. The wheels carry libcudart but neither the
# driver nor cuBLAS/cuRAND/NVRTC (cuBLAS alone is over 500 MB), so the linker
# gets stubs instead, as NVIDIA's toolkit ships one for the driver: a shared
# library per name, with the right soname and every function cudarc's
# bindings declare, each returning an error (the driver's returns
# CUDA_ERROR_STUB_LIBRARY, 34). They are generated from cudarc's own source,
# are only linked against, and never travel: where the binaries run, the
# driver and CUDA 13 libraries are the real ones (NVIDIA's runtime images,
# the lent GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

ARCHES=()
TOOLKIT_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCHES+=("${2:?--arch needs a compute capability such as 80 or 90}"); shift 2 ;;
    --toolkit-only) TOOLKIT_ONLY=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=(80 90)
for a in "${ARCHES[@]}"; do
  [[ "$a" =~ ^[0-9]{2,3}$ ]] || { echo "build-cuda.sh: --arch $a: give the compute capability as digits, e.g. 80 or 90" >&2; exit 2; }
done

log() { printf '\033[1;34m[build-cuda]\033[0m %s\n' "$*" >&2; }

ROOT=$PWD/.cuda
TOOLKIT=$ROOT/toolkit
WHEELS=$ROOT/wheels
OUT=$ROOT/out
mkdir -p "$WHEELS" "$OUT"

# name version sha256 of each wheel (manylinux x86-64).
PINS=(
  "nvidia-cuda-nvcc 13.0.88 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"
  "nvidia-nvvm 13.0.88 c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"
  "nvidia-cuda-runtime 13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
  "nvidia-cuda-crt 13.0.88 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
  "nvidia-cuda-cccl 13.0.85 e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
)
PIN_STAMP=$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)

install_toolkit() {
  if [ -f "$TOOLKIT/.pins" ] && [ "$(cat "$TOOLKIT/.pins")" = "$PIN_STAMP" ]; then
    return
  fi
  log "installing CUDA 13.0's compiler from pinned wheels into $TOOLKIT"
  command -v unzip >/dev/null || { echo "build-cuda.sh needs unzip (apt-get install unzip)" >&2; exit 1; }
  local staging=$ROOT/staging
  rm -rf "$staging" "$TOOLKIT"
  mkdir -p "$staging"
  for pin in "${PINS[@]}"; do
    read -r name version sha <<<"$pin"
    local file
    file=$(ls "$WHEELS"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -1 || true)
    if [ -z "$file" ]; then
      python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
        -d "$WHEELS" "$name==$version"
      file=$(ls "$WHEELS"/"${name//-/_}"-"$version"-*.whl | head -1)
    fi
    if ! echo "$sha  $file" | sha256sum --check --quiet -; then
      echo "build-cuda.sh: $file does not have the pinned SHA-256 $sha; delete it to fetch again" >&2
      exit 1
    fi
    unzip -qo "$file" -d "$staging"
  done
  mv "$staging/nvidia/cu13" "$TOOLKIT"
  rm -rf "$staging"
  ln -sf libcudart.so.13 "$TOOLKIT/lib/libcudart.so"
  "$TOOLKIT/bin/nvcc" --version | tail -2 >&2
  make_stubs
  echo "$PIN_STAMP" >"$TOOLKIT/.pins"
}

# The linker's stand-ins for the libraries the wheels lack (see the header).
make_stubs() {
  local version src stubs=$TOOLKIT/lib/stubs
  version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
  [ -n "$version" ] || { echo "build-cuda.sh: cudarc is not in Cargo.lock" >&2; exit 1; }
  cargo fetch --locked --quiet
  src=$ROOT/cudarc-$version
  if [ ! -d "$src" ]; then
    local crate
    crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/cudarc-"$version".crate | head -1)
    tar xzf "$crate" -C "$ROOT"
  fi
  mkdir -p "$stubs"
  # module soname link-name error-code
  local lib
  for lib in "driver libcuda.so.1 cuda 34" "cublas libcublas.so.13 cublas 1" \
             "cublaslt libcublasLt.so.13 cublasLt 1" "curand libcurand.so.10 curand 203" \
             "nvrtc libnvrtc.so.13 nvrtc 7"; do
    read -r module soname link code <<<"$lib"
    local c=$stubs/$link.c
    {
      echo "/* Link-time stand-in for $soname, generated from cudarc $version's bindings. */"
      grep -oE 'load::<_F>\("[A-Za-z0-9_]+"\)' "$src/src/$module/sys/mod.rs" \
        | sed -E 's/.*\("([A-Za-z0-9_]+)"\)/\1/' | sort -u \
        | awk -v code="$code" '{ printf "int %s(void) { return %s; }\n", $1, code }'
    } >"$c"
    cc -shared -fPIC -o "$stubs/$soname" -Wl,-soname,"$soname" "$c"
    ln -sf "$soname" "$stubs/lib$link.so"
    rm "$c"
  done
  ln -sf libcuda.so.1 "$stubs/libcuda.so"
}

install_toolkit
[ "$TOOLKIT_ONLY" = 1 ] && exit 0

export PATH=$TOOLKIT/bin:$PATH CUDA_ROOT=$TOOLKIT CUDA_PATH=$TOOLKIT CUDA_HOME=$TOOLKIT
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

for arch in "${ARCHES[@]}"; do
  dest=$OUT/sm_$arch
  log "building for compute capability $arch into $dest"
  start=$(date +%s)
  export CUDA_COMPUTE_CAP=$arch
  cargo build --release --locked -p nexus-encoder -p nexus-decoder \
    --features nexus-encoder/cuda,nexus-decoder/cuda
  cargo build --release --locked -p nexus-cli --bin nexus --no-default-features --features cuda
  mkdir -p "$dest"
  for bin in nexus-encoder nexus-decoder nexus; do
    install -m 0755 "$CARGO_TARGET_DIR/release/$bin" "$dest/$bin"
  done
  log "sm_$arch built in $(( $(date +%s) - start )) s: $(du -sh "$dest" | cut -f1) ($(cd "$dest" && du -h -- * | tr '\t\n' ' '))"
done

# How the binaries refuse where there is no GPU (this machine): without
# NVIDIA's driver library the loader names it; with a driver library but no
# GPU to open (the stub stands in for one) the program says so in one line.
# Either way the exit status is non-zero.
check=${ARCHES[0]}
log "checking how the sm_$check binaries refuse without a GPU"
{
  for bin in nexus-decoder nexus-encoder nexus; do
    case $bin in
      nexus) args=(gpu-check run --bundle /nonexistent --device cuda) ;;
      *) args=(--device cuda --redis redis://127.0.0.1:1) ;;
    esac
    for env in "no-driver" "driver-without-gpu"; do
      # With no driver the loader names it; with the driver's stub (and the
      # CUDA libraries beside it) the program opens no GPU and says so.
      if [ "$env" = no-driver ]; then
        ld="" want="libcuda.so.1: cannot open shared object file"
      else
        ld=$TOOLKIT/lib/stubs:$TOOLKIT/lib want='device "cuda" cannot be opened'
      fi
      set +e
      got=$(env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE -u NEXUS_LOG LD_LIBRARY_PATH="$ld" \
        timeout 60 "$OUT/sm_$check/$bin" "${args[@]}" 2>&1 </dev/null)
      status=$?
      set -e
      lines=$(printf '%s\n' "$got" | grep -c .)
      printf '%s %s [%s]: exit %s, %s line(s): %s\n' "$bin" "${args[*]}" "$env" "$status" "$lines" "$got"
      if [ "$status" = 0 ] || [ "$lines" != 1 ] || [[ "$got" != *"$want"* ]]; then
        echo "FAIL: $bin [$env] should refuse in one line saying '$want', with a non-zero exit" >&2
        exit 1
      fi
    done
  done
} | tee "$OUT/refusal.log"
log "done: $(ls -d "$OUT"/sm_* | tr '\n' ' ')"
