#!/usr/bin/env bash
# Fetches the real-speech test data into ${NEXUS_TESTDATA:-.cache/testdata},
# every archive pinned by SHA-256. Idempotent; each part has its own marker.
#
# - librivox/, goforward.raw: from the pocketsphinx 5.1.1 source archive
#   (BSD-2-Clause; LibriVox recordings are public domain). One LibriVox
#   reader (Sense and Sensibility, chapter 1) reads all five clips.
# - speechbrain/: from the SpeechBrain 1.0.2 source archive (Apache-2.0), its
#   tests/samples: ASR/spk1_snt*.wav and ASR/spk2_snt*.wav (two readers, six
#   sentences each), TTS/LJ050-0131.wav (the LJ Speech reader, public
#   domain), lang/English/example1.wav and example5.wav (labelled spk01 and
#   spk05 by SpeechBrain's own annotation files) and lang/French/example2.flac
#   (spk02, French). The diarization meeting set is built from these voices.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${NEXUS_TESTDATA:-$PWD/.cache/testdata}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dest/.complete" ]; then
  sha=675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355
  python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary pocketsphinx -d "$tmp" pocketsphinx==5.1.1
  echo "$sha  $tmp/pocketsphinx-5.1.1.tar.gz" | sha256sum -c --quiet
  tar -xzf "$tmp/pocketsphinx-5.1.1.tar.gz" -C "$tmp" pocketsphinx-5.1.1/test/data/librivox pocketsphinx-5.1.1/test/data/goforward.raw
  cp -r "$tmp/pocketsphinx-5.1.1/test/data/librivox" "$dest/"
  cp "$tmp/pocketsphinx-5.1.1/test/data/goforward.raw" "$dest/"
  touch "$dest/.complete"
fi

if [ ! -f "$dest/.complete-speechbrain" ]; then
  sha=b293d665161d7cd34caa3ee8966acce6c43b611b7fc9cd0b24637ce871bd7a73
  python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary speechbrain -d "$tmp" speechbrain==1.0.2
  echo "$sha  $tmp/speechbrain-1.0.2.tar.gz" | sha256sum -c --quiet
  s=speechbrain-1.0.2/tests/samples
  tar -xzf "$tmp/speechbrain-1.0.2.tar.gz" -C "$tmp" "$s/ASR" "$s/TTS/LJ050-0131.wav" \
    "$s/lang/English/example1.wav" "$s/lang/English/example5.wav" "$s/lang/French/example2.flac"
  mkdir -p "$dest/speechbrain"
  cp -r "$tmp/$s/ASR" "$tmp/$s/TTS" "$tmp/$s/lang" "$dest/speechbrain/"
  touch "$dest/.complete-speechbrain"
fi
echo "[testdata] ready in $dest" >&2
