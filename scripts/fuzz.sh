#!/usr/bin/env bash
# Fuzzes the audio decoders with libFuzzer (cargo-fuzz, nightly toolchain).
# New inputs go to crates/audio/fuzz/corpus (not committed); the committed
# seeds are real files from real encoders. Crashes land in fuzz/artifacts.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/../crates/audio"
secs="${1:-600}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo +nightly install cargo-fuzz --locked
for target in decode_container decode_pcm; do
  mkdir -p "fuzz/corpus/$target"
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=3072 -timeout=10 -max_len=65536
done
