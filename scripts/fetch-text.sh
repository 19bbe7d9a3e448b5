#!/usr/bin/env bash
# Fetches the text `nexus data synth` speaks by default: the King James
# Version of the Bible (1611; public domain), from Debian's bible-kjv-text
# package, written out by the same source package's `bible` reader. Both
# packages are pinned by SHA-256. Writes ${NEXUS_TEXT:-.cache/text}/kjv.txt
# (31,102 verses under their book headings). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${NEXUS_TEXT:-$PWD/.cache/text}"
mkdir -p "$dest"
if [ -f "$dest/kjv.txt" ]; then
  echo "[text] ready in $dest/kjv.txt"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fetch() { # package version architecture sha256
  (cd "$tmp" && apt-get download -q "$1=$2" >/dev/null 2>&1) || {
    echo "apt-get download $1=$2 failed: is Debian's package index reachable (apt-get update)?" >&2
    exit 1
  }
  echo "$4  $tmp/$1_$2_$3.deb" | sha256sum -c --quiet
  dpkg-deb -x "$tmp/$1_$2_$3.deb" "$tmp/root"
}
# The text (compressed in the reader's own format) and its reader.
fetch bible-kjv-text 4.38 all d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a
fetch bible-kjv 4.38 amd64 75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d
# Genesis 1:1 to Revelation 22:21, one verse per line, no line wrapping.
"$tmp/root/usr/bin/bible" -p "$tmp/root/usr/lib" -d bible.data -l100000 "Ge1:1-Re22:21" > "$tmp/kjv.txt"
verses=$(grep -c '^ \+[0-9]' "$tmp/kjv.txt")
if [ "$verses" != 31102 ]; then
  echo "the reader wrote $verses verses, expected 31102" >&2
  exit 1
fi
mv "$tmp/kjv.txt" "$dest/kjv.txt"
echo "[text] ready in $dest/kjv.txt ($verses verses)"
