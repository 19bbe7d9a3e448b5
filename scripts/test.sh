#!/usr/bin/env bash
# The project's test command (README, .ci/run): formatting, lints, then the
# whole test suite against a real Redis on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/redis.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
# One build of every binary and test target, with the workspace's features
# unified: a `cargo run -p` or `cargo test -p` here would rebuild shared
# dependencies with other features.
echo "== cargo build --workspace --bins --tests" >&2
cargo build --workspace --bins --tests --locked
echo "== weights and test speech (pinned by SHA-256; fetched once per machine)" >&2
"${CARGO_TARGET_DIR:-target}/debug/nexus" models pull tiny.en base qwen2.5-0.5b-instruct silero-vad hifigan-universal piper-en-us-joe-medium ge2e nexus-mini
bash scripts/fetch-testdata.sh

# Tests marked #[ignore = "needs …"] need the weights and data fetched above (or
# the registry's network): this command provides them, so it runs those too.
echo "== tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --run-ignored all
else
  cargo test --workspace --locked --no-fail-fast -- --include-ignored
fi
