#!/usr/bin/env bash
# Build an NLTK data folder with WordNet 3.0 from Debian's wordnet-base + wordnet-sense-index packages
# (Debian bookworm's packages, WordNet 3.0), for --text-augment's synonym replacement. No network, no nltk.download().
#   NLTK_DATA=/path bash scripts/prepare_nltk_data.sh     (default: <repo>/.nltk_data, git-ignored)
# Install the packages first (as root): bash scripts/ci_wordnet.sh  (it also calls this script).
# Files are COPIED, not symlinked: nltk >= 3.10 refuses symlinked corpus files. Debian does not ship
# `lexnames`, which nltk's reader needs: it is generated from Debian's lexnames(5WN) man page (45 lines).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
NLTK_DATA="${NLTK_DATA:-$REPO/.nltk_data}"
SRC=/usr/share/wordnet
DST="$NLTK_DATA/corpora/wordnet"
if [ ! -f "$SRC/data.noun" ] || [ ! -f "$SRC/index.sense" ]; then
  echo "prepare_nltk_data.sh: $SRC lacks WordNet; install it: apt-get install -y --no-install-recommends" \
       "wordnet-base wordnet-sense-index  (or run: sudo bash scripts/ci_wordnet.sh)" >&2
  exit 1
fi
if [ -f "$DST/lexnames" ] && [ "$(wc -l < "$DST/lexnames")" = 45 ] && [ -f "$DST/index.sense" ]; then
  echo "prepare_nltk_data.sh: WordNet already in $DST"; exit 0
fi
mkdir -p "$DST"
find "$SRC" -maxdepth 1 -type f -exec cp {} "$DST/" \;
zcat /usr/share/man/man5/lexnames.5WN.gz | grep -E "^[0-9]{2}	[a-z]+\.[A-Za-z]+ *	" \
  | awk -F'\t' '{n=$2; gsub(/ /,"",n); split(n,a,"."); p=(a[1]=="noun")?1:(a[1]=="verb")?2:(a[1]=="adj")?3:4;
                 printf "%s\t%s\t%d\n",$1,n,p}' > "$DST/lexnames"
lines=$(wc -l < "$DST/lexnames")
if [ "$lines" != 45 ]; then echo "prepare_nltk_data.sh: lexnames has $lines lines, expected 45" >&2; exit 1; fi
echo "prepare_nltk_data.sh: WordNet ready in $DST (export NLTK_DATA=$NLTK_DATA if it is not the default)"
