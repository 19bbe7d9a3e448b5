#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what building needs, build
# the transcription tool (the `quick` profile without the fleet's servers;
# `cargo build --release` builds those), fetch and convert the weights it needs
# (pinned by SHA-256), then transcribe FILE, or a sample LibriVox clip when no
# file is given. Extra arguments go to `nexus transcribe` (e.g. --format srt
# --word-timestamps --to zh).
#
#   scripts/quickstart.sh [FILE] [nexus transcribe options...]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh --build
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --profile quick --locked -p nexus-cli --no-default-features
nexus=./target/quick/nexus
# The model: base, unless the options name one.
model=base given=() prev=""
for a in "$@"; do
  [ "$prev" = "--model" ] && model=$a given=(--model "$a")
  prev=$a
done
[ -d "$model" ] || "$nexus" models pull "$model"
# A target other than English goes through the text translation model.
case " $* " in
  *" --to "*) case " $* " in *" --to en "*) ;; *) "$nexus" models pull qwen2.5-0.5b-instruct ;; esac ;;
esac
if [ $# -gt 0 ] && [ -f "$1" ]; then
  file="$1"
  shift
else
  bash scripts/fetch-testdata.sh
  file=.cache/testdata/librivox/sense_and_sensibility_01_austen_64kb-0870.wav
fi
echo "[quickstart] ready after $(($(date +%s) - start)) s" >&2
[ ${#given[@]} -gt 0 ] || set -- --model "$model" "$@"
exec "$nexus" transcribe "$file" "$@"
