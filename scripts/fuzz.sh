#!/usr/bin/env bash
# Fuzzes every decoder and parser entry point with libFuzzer (cargo-fuzz,
# nightly toolchain): containers and raw PCM (crates/audio/fuzz), Opus packets
# and Ogg Opus streams (crates/audio/fuzz), SDP offers and multipart upload
# bodies (services/ingest/fuzz). New inputs go to each fuzz/corpus (not
# committed); the committed seeds are real files from real encoders. Crashes
# land in fuzz/artifacts. Each target runs SECONDS with a 3 GB RSS limit; the
# table at the end gives runs, crashes and the peak RSS libFuzzer measured.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs="${1:-600}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo +nightly install cargo-fuzz --locked
root=$PWD
rows=()
for spec in "crates/audio:decode_container decode_pcm opus_stream" \
            "services/ingest:sdp_offer multipart_body"; do
  dir="${spec%%:*}"
  for target in ${spec#*:}; do
    cd "$root/$dir"
    mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
    log="$(mktemp)"
    status=0
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$secs" -rss_limit_mb=3072 -timeout=10 -max_len=65536 2>&1 | tee "$log" | tail -n 3 || status=$?
    runs="$(sed -nE 's/^Done ([0-9]+) runs.*/\1/p' "$log" | tail -n 1)"
    rss="$(grep -oE 'rss: [0-9]+Mb' "$log" | grep -oE '[0-9]+' | sort -n | tail -n 1)"
    rss="${rss:+${rss} MB}"
    crashes=$([ "$status" -eq 0 ] && echo 0 || echo "1 (exit $status, see fuzz/artifacts/$target)")
    rows+=("| $target | ${secs} s | ${runs:-?} | $crashes | ${rss:-?} |")
    rm -f "$log"
  done
done
echo
echo "| target | time | runs | crashes | peak RSS |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
