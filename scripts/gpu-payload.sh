#!/usr/bin/env bash
# Packs what one call to a lent GPU machine carries, into .gpu/ (ignored):
#
#   scripts/build-cuda.sh --arch 90 && scripts/gpu-payload.sh --arch 90
#
# .gpu/nexus.xz         the CUDA build of `nexus` (stripped, xz)
# .gpu/bundle.tar.xz    tiny.en as Q8_0 blocks, a LibriVox clip, and what this
#                       machine's CPU computes from them (`nexus gpu-check
#                       prepare`, run by that same binary, on the CPU)
#
# The device side is scripts/gpu-check.sh; the call, with its carry, is in
# DEVELOPERS.md. A call carries at most 64 MiB with the working tree, so the
# script fails when .gpu would not fit beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=90
CLIP=${CLIP:-.cache/testdata/librivox/sense_and_sensibility_01_austen_64kb-0870.wav}
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=${2:?}; shift 2 ;;
    *) echo "gpu-payload.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { printf '\033[1;34m[gpu-payload]\033[0m %s\n' "$*" >&2; }

BIN=.cuda/out/sm_$ARCH/nexus
[ -x "$BIN" ] || { echo "gpu-payload.sh: $BIN is missing; run scripts/build-cuda.sh --arch $ARCH" >&2; exit 1; }
[ -f "$CLIP" ] || { echo "gpu-payload.sh: $CLIP is missing; run scripts/fetch-testdata.sh" >&2; exit 1; }
# The binary runs here on the CPU: the link stubs stand in for the CUDA
# libraries it names, and nothing calls them.
export LD_LIBRARY_PATH=$PWD/.cuda/toolkit/lib/stubs:$PWD/.cuda/toolkit/lib

rm -rf .gpu
mkdir -p .gpu/tmp
"$BIN" gpu-check prepare --model tiny.en --audio "$CLIP" --sessions 8 --out .gpu/tmp/bundle
tar -C .gpu/tmp -cf - bundle | xz -T0 -6 >.gpu/bundle.tar.xz
strip -o .gpu/tmp/nexus "$BIN"
xz -T0 -6 -c .gpu/tmp/nexus >.gpu/nexus.xz
rm -rf .gpu/tmp
# What travels besides: tracked files and untracked ones git does not ignore.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | awk '/\ttotal$/ { s += $1 } END { print s + 0 }')
bytes=$(du -sb .gpu | cut -f1)
log "payload $(du -sh .gpu | cut -f1) ($bytes bytes; the working tree adds $tree): $(cd .gpu && du -h -- * | tr '\t\n' ' ')"
if [ $((bytes + tree)) -gt $((63 * 1024 * 1024)) ]; then
  echo "gpu-payload.sh: .gpu ($bytes bytes) and the working tree ($tree) exceed the 64 MiB a call carries (less a MiB of margin)" >&2
  exit 1
fi
