#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is missing, build, fetch
# and convert the default weights (pinned by SHA-256), then transcribe FILE, or
# a sample LibriVox clip when no file is given. Extra arguments go to
# `nexus transcribe` (e.g. --format srt --word-timestamps --to zh).
#
#   scripts/quickstart.sh [FILE] [nexus transcribe options...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p nexus-cli
./target/release/nexus models pull base qwen2.5-0.5b-instruct
if [ $# -gt 0 ] && [ -f "$1" ]; then
  file="$1"
  shift
else
  bash scripts/fetch-testdata.sh
  file=.cache/testdata/librivox/sense_and_sensibility_01_austen_64kb-0870.wav
fi
exec ./target/release/nexus transcribe "$file" --model base "$@"
