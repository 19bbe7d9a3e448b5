#!/usr/bin/env bash
# The long chaos run (BENCHMARKS.md): 8 live streams for 10 minutes on the
# three-process fleet over a Redis of its own (loopback only), an encoder or
# decoder replica SIGKILLed and restarted every 60 s in rotation, Redis
# SIGKILLed and restarted once; every stream's finals must equal those of an
# undisturbed session of the same audio. Bounded: the run ends with its audio.
# The suite runs the small twin (2 streams, 45 s) of the same test.
#
#   scripts/chaos.sh [STREAMS] [SECONDS] [PERIOD_S]    (defaults 8 600 60)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export NEXUS_CHAOS_STREAMS="${1:-8}" NEXUS_CHAOS_SECONDS="${2:-600}" NEXUS_CHAOS_PERIOD_S="${3:-60}"
cargo build --release --workspace --bins --locked
exec cargo test --release --locked -p nexus-tests --test chaos -- --include-ignored --nocapture
