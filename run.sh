#!/usr/bin/env bash
# One commit -> one experiment. Usage: bash run.sh <run_with_submitit.py|main.py> [flags...] [--dry-run]
#   A comma list in a flag (--seed 0,10,50 --epochs 25,32) is a sweep: one experiment per combination, one job array.
#   Refuses uncommitted changes to tracked files (ALLOW_DIRTY=1 runs them anyway and stores dirty.diff); the commit is
#   exported with `git archive` into <output-dir>/<name>/code/ and runs from there. Details: launch.py, README.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ]; then echo "usage: bash run.sh <run_with_submitit.py|main.py> [flags...] [--dry-run]" >&2; exit 2; fi
DIRTY=0
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
  if [ "${ALLOW_DIRTY:-0}" != 1 ]; then
    echo "run.sh: the working tree has uncommitted changes to tracked files (one commit -> one experiment):" >&2
    git -C "$REPO" status --short --untracked-files=no >&2
    echo "commit them, or set ALLOW_DIRTY=1 to run them anyway (the diff is stored beside the snapshot)" >&2
    exit 1
  fi
  DIRTY=1
fi
UNTRACKED=$(git -C "$REPO" ls-files --others --exclude-standard | head -5)
if [ -n "$UNTRACKED" ]; then
  echo "run.sh: warning: untracked files are not in the snapshot (commit them if the run needs them):" $UNTRACKED >&2
fi
COMMIT=$(git -C "$REPO" rev-parse HEAD)
PY=${CLIP_LAB_PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" "$REPO/launch.py" --repo "$REPO" --commit "$COMMIT" --dirty "$DIRTY" "$@"
