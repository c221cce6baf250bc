#!/usr/bin/env bash
# Reproduce takumi's committed models on a 2-core CPU machine (about 2 hours):
#   bash models/train/reproduce.sh            # or: bash models/train/reproduce.sh --resume
# Steps: venv with pinned requirements, photo cache, main run + ablation (in parallel, one thread
# each), ONNX export with golden vectors, evaluation tables for models/MODEL_CARD.md.
set -euo pipefail
cd "$(dirname "$0")"
RESUME=${1:-}
VENV=${TAKUMI_VENV:-.venv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -r requirements.txt; }
PY="$VENV/bin/python"
command -v edje_decc >/dev/null || echo "note: apt-get install libedje-bin to include enlightenment-data photos"
"$PY" fetch_photos.py
export OMP_NUM_THREADS=1  # two single-thread runs side by side; OpenMP spinning on 2 shared cores costs 10x
mkdir -p runs
"$PY" train.py --out runs/main --threads 1 --minutes 80 --steps 8000 --snapshot-at 1500 $RESUME > runs/main.log 2>&1 &
"$PY" train.py --out runs/ablation --reverse-weight 0 --threads 1 --steps 1500 $RESUME > runs/ablation.log 2>&1 &
wait
"$PY" export.py --ckpt runs/main/ckpt.pt
"$PY" make_samples.py
"$PY" eval.py --ablation runs/ablation/ckpt.pt --main-ckpt runs/main/ckpt_1500.pt | tee runs/eval.md
