#!/usr/bin/env bash
# CI (as root): Debian's WordNet 3.0 (wordnet-base, wordnet-sense-index) and the repo's NLTK data folder
# (<repo>/.nltk_data, via scripts/prepare_nltk_data.sh) for the text-augmentation tests. Idempotent, ~10 s
# the first time, instant afterwards.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS="wordnet-base wordnet-sense-index"
missing=0; for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing=1; done
if [ $missing = 1 ]; then
  if [ "$(id -u)" != 0 ]; then echo "ci_wordnet.sh: needs root to install $PKGS" >&2; exit 1; fi
  apt-get install -y -q --no-install-recommends $PKGS || { apt-get update -q; apt-get install -y -q --no-install-recommends $PKGS; }
fi
bash "$(dirname "$0")/prepare_nltk_data.sh"
