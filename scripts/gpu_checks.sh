#!/usr/bin/env bash
# GPU checks and benchmarks, for a lent CUDA machine (never run by CI, which has no GPU).
#   bash scripts/gpu_checks.sh [tests|bench|bench-large|compile|all]   results (logs + JSON) go to $OUT (default /tmp/gpu_out)
# Uses the machine's own python3 (with torch); the packages it lacks can come as wheels in .whl/
# (lmdb, open_clip_torch, ftfy, wcwidth, xformers), installed with --no-deps into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
what=${1:-all}
python3 - <<'PY' | tee "$OUT/environment.txt"
import torch, timm, transformers
try:
    import xformers
    xf = xformers.__version__
except Exception as e:  # noqa: BLE001
    xf = f"not importable ({type(e).__name__})"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | timm {timm.__version__}"
      f" | transformers {transformers.__version__} | xformers {xf}")
PY
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log"
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench.py --json "$OUT/train_vitb16_bf16.json" train --model CLIP_VITB16_CLIP --precision bf16 \
    --batch-size 256 --image-size 224 --steps 10 --update-freq 4 2>&1 | tee "$OUT/train_vitb16_bf16.log"
  python3 bench.py --json "$OUT/retrieval_gpu.json" retrieval --skip-reference --extract-batches 10 \
    --extract-batch-size 256 2>&1 | tee "$OUT/retrieval_gpu.log"
fi
if [[ $what == bench-large || $what == all ]]; then  # exact accumulation at micro-batch 128 instead of 64
  python3 bench.py --json "$OUT/train_vitb16_bf16_b512.json" train --model CLIP_VITB16_CLIP --precision bf16 \
    --batch-size 512 --image-size 224 --steps 10 --update-freq 4 2>&1 | tee "$OUT/train_vitb16_bf16_b512.log"
fi
if [[ $what == compile || $what == all ]]; then  # throughput only: k=1 (each micro-batch shape is a recompile)
  python3 bench.py --json "$OUT/train_vitb16_bf16_compile.json" train --model CLIP_VITB16_CLIP --precision bf16 \
    --batch-size 256 --image-size 224 --steps 10 --update-freq 1 --compile --no-memory 2>&1 \
    | tee "$OUT/train_vitb16_bf16_compile.log"
fi
