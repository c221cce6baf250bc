#!/usr/bin/env bash
# Reproduce takumi's committed models on a 2-core CPU machine (about 7 hours of wall time):
#   bash models/train/reproduce.sh            # or: bash models/train/reproduce.sh --resume
# Steps: venv with pinned requirements, photo cache, main run + first ablation (in parallel, one
# thread each), the two continuations that made the shipped model (runs/long, 95 min; runs/long2,
# 150 min, lr 5e-4), the LoRA Reverse ablation at equal steps (runs/abl_rev, runs/abl_norev), ONNX
# export with golden vectors, samples, and the evaluation tables of models/MODEL_CARD.md (the
# binary-level ones need `cargo build --release` first). Wall-clock budgets (--minutes) make the
# step counts depend on the machine; the shipped runs' counts are in the model card.
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
"$PY" train.py --out runs/long --init runs/main/ckpt.pt --threads 2 --minutes 95 --steps 100000 $RESUME > runs/long.log 2>&1
"$PY" train.py --out runs/long2 --init runs/long/ckpt.pt --threads 2 --minutes 150 --steps 100000 --lr 5e-4 \
    --snapshot-at 6000 $RESUME > runs/long2.log 2>&1
"$PY" train.py --out runs/abl_rev --steps 3000 --threads 1 --seed 7 $RESUME > runs/abl_rev.log 2>&1 &
"$PY" train.py --out runs/abl_norev --steps 3000 --threads 1 --seed 7 --reverse-weight 0 $RESUME > runs/abl_norev.log 2>&1 &
wait
"$PY" export.py --ckpt runs/long2/ckpt.pt
"$PY" make_samples.py
"$PY" eval.py --ablation runs/abl_norev/ckpt.pt --main-ckpt runs/abl_rev/ckpt.pt --per-family 3 | tee runs/eval.md
BIN=../../target/release/takumi
if [ -x "$BIN" ]; then
    "$PY" eval_cli.py --bin "$BIN" --sheets ../card | tee runs/eval_cli.md
    "$PY" eval_prior.py --bin "$BIN" --per-family 1 | tee runs/eval_prior.md
    "$PY" eval_prior.py --bin "$BIN" --per-family 1 --precision int8 --json ../eval_prior_int8.json | tee runs/eval_prior_int8.md
    "$PY" pairs_only_eval.py --init runs/long2/ckpt.pt --bin "$BIN" | tee runs/pairs_only.md
else
    echo "note: cargo build --release, then run the binary-level evaluations (MODEL_CARD.md)"
fi
