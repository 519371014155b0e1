#!/usr/bin/env bash
# Idempotent set-up: a .venv with the pinned torch pair, then the requirements. Re-runs are ~2 s.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
stamp=.venv/.installed-$(cat requirements.txt requirements-dev.txt setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q $TORCH_PIN
  # keep the pinned pair: other packages must not pull another multi-GB torch
  .venv/bin/pip install -q -r requirements.txt -r requirements-dev.txt $TORCH_PIN
  # test-only: Chinese-CLIP's model/eval code as the reference for weight-compatibility tests and bench.py
  # retrieval; --no-deps because its pins (lmdb==1.3.0, ...) would downgrade ours
  .venv/bin/pip install -q --no-deps cn_clip==1.6.0
  rm -f .venv/.installed-*
  touch "$stamp"
fi
