#!/usr/bin/env bash
# Train takumi's H and G on one GPU in at most 9 minutes, then export (if the export's packages are
# there). Nothing is downloaded: the photos and the warm-start checkpoint travel in the working tree.
#
#   bash models/train/gpu.sh                       # on the GPU machine (PyTorch with CUDA installed)
#   DEVICE=cpu STEPS=3 BATCH=2 CROP=96 RUN=runs/gpu-smoke MODELS_DIR=/tmp/gpu-smoke \
#     GOLDEN_DIR=/tmp/gpu-smoke/golden bash models/train/gpu.sh   # the same path on a CPU (smoke test)
#
# Needs models/train/.cache/photos (fetch_photos.py; or TAKUMI_PHOTOS, which gpu_pack.sh fills) and a checkpoint to start from, INIT
# (default runs/warm.pt; warmstart.py makes one from the committed ONNX models). Writes
# $RUN/ckpt.pt and $RUN/log.jsonl; with OUT_COPY set (for example $OUT of the device tool) also writes
# the weights (weights.pt) and the log there. Exports to models/ only when onnx, onnxscript and onnxruntime import; otherwise it
# prints the export command to run where they do.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-7.5}   # training; start-up and export fit in the rest of the 9 minutes
STEPS=${STEPS:-1000000}   # the schedule ends at whichever of STEPS and MINUTES comes first
BATCH=${BATCH:-48}
CROP=${CROP:-256}
LR=${LR:-5e-4}            # warm start: a gentler rate than from scratch
INIT=${INIT:-runs/warm.pt}
RUN=${RUN:-runs/gpu}     # not OUT: the device tool sets OUT to its own result folder
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 0 ))}  # processes synthesising quads, topping up the GPU's own
QUADS_ON=${QUADS_ON:-$DEVICE}  # the training process makes quads here too (the photos held on the GPU)
UNDER=${UNDER:-0.5}       # share of under-determined quads (issue 10's weakest set)
THREADS=${THREADS:-2}     # torch threads of the training process itself
EXPORT=${EXPORT:-1}       # 0: train only (export where the checkpoint lands, with export.py)
MODELS_DIR=${MODELS_DIR:-..}  # the export's destination: the committed models by default
GOLDEN_DIR=${GOLDEN_DIR:-../../tests/fixtures/golden}

PHOTOS=${TAKUMI_PHOTOS:-.cache/photos}
[ -d "$PHOTOS" ] && [ -n "$(ls "$PHOTOS")" ] || { echo "error: no photos in $PHOTOS" >&2; exit 2; }
if [ ! -f "$INIT" ]; then
  echo "$INIT missing: rebuilding it from the committed ONNX models" >&2
  "$PY" warmstart.py --out "$INIT"
fi
"$PY" - "$DEVICE" <<'EOF'
import sys, torch
d = sys.argv[1]
if d.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"error: DEVICE={d} but torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0) if d.startswith('cuda') else 'cpu'}", flush=True)
EOF
mkdir -p "$RUN"
rm -f "$RUN/ckpt.pt" "$RUN/log.jsonl"
t0=$(date +%s)
"$PY" train.py --out "$RUN" --init "$INIT" --device "$DEVICE" --threads "$THREADS" --workers "$WORKERS" \
  --batch "$BATCH" --crop "$CROP" --lr "$LR" --minutes "$MINUTES" --steps "$STEPS" \
  --quads-on "$QUADS_ON" --under "$UNDER"
echo "trained in $(( $(date +%s) - t0 )) s: $(tail -1 "$RUN/log.jsonl")"
if [ -n "${OUT_COPY:-}" ]; then
  # weights only: with Adam's state the checkpoint is over the 16 MiB a returned file may be
  "$PY" -c "import sys, torch; ck = torch.load(sys.argv[1], weights_only=False, map_location='cpu'); \
torch.save({k: ck[k] for k in ('step', 'elapsed', 'hyper', 'backbone', 'args')}, sys.argv[2])" "$RUN/ckpt.pt" "$OUT_COPY/weights.pt"
  cp "$RUN/log.jsonl" "$OUT_COPY/"
fi
if [ "$EXPORT" = 0 ]; then
  echo "export skipped (EXPORT=0)" >&2
elif "$PY" -c "import onnx, onnxscript, onnxruntime, safetensors" 2>/dev/null; then
  "$PY" export.py --ckpt "$RUN/ckpt.pt" --models-dir "$MODELS_DIR" --golden-dir "$GOLDEN_DIR"
else
  echo "export skipped (onnx/onnxscript/onnxruntime not installed here): run" >&2
  echo "  models/train/.venv/bin/python models/train/export.py --ckpt models/train/$RUN/ckpt.pt" >&2
fi
