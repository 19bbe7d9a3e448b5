#!/usr/bin/env bash
# Fetches the real-speech test data (LibriVox clips with references, "go forward
# ten meters") from the pocketsphinx 5.1.1 source archive, pinned by SHA-256,
# into ${NEXUS_TESTDATA:-.cache/testdata}. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${NEXUS_TESTDATA:-$PWD/.cache/testdata}"
sha=675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355
if [ -f "$dest/.complete" ]; then
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary pocketsphinx -d "$tmp" pocketsphinx==5.1.1
echo "$sha  $tmp/pocketsphinx-5.1.1.tar.gz" | sha256sum -c --quiet
mkdir -p "$dest"
tar -xzf "$tmp/pocketsphinx-5.1.1.tar.gz" -C "$tmp" pocketsphinx-5.1.1/test/data/librivox pocketsphinx-5.1.1/test/data/goforward.raw
cp -r "$tmp/pocketsphinx-5.1.1/test/data/librivox" "$dest/"
cp "$tmp/pocketsphinx-5.1.1/test/data/goforward.raw" "$dest/"
touch "$dest/.complete"
echo "[testdata] ready in $dest" >&2
