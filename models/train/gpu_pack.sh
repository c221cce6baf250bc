#!/usr/bin/env bash
# Make what gpu.sh needs travel light to a GPU machine (the working tree that travels is capped at
# 64 MiB): the training photos pre-scaled to data.LOAD_SIDE, as PNG, so they load to the same pixels,
# and a weights-only start checkpoint from INIT (default: the shipped run, runs/long2).
#   bash models/train/gpu_pack.sh    # then carry models/train/.cache/gpu on the device tool, and run
#   TAKUMI_PHOTOS=.cache/gpu/photos INIT=.cache/gpu/init.pt OUT_COPY=$OUT EXPORT=0 bash models/train/gpu.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
INIT=${INIT:-runs/long2/ckpt.pt}
rm -rf .cache/gpu && mkdir -p .cache/gpu/photos
"$PY" - "$INIT" <<'PYEOF'
import os, sys
import torch
from PIL import Image
import data
for n in data.photo_files():
    if data.is_test(n):
        continue  # the held-out photos stay behind
    im = Image.open(os.path.join(data.CACHE, n)).convert("RGB")
    if max(im.size) > data.LOAD_SIDE:  # the same resize as data.load_rgb
        s = data.LOAD_SIDE / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    im.save(os.path.join(".cache/gpu/photos", n))
ck = torch.load(sys.argv[1], weights_only=False, map_location="cpu")
torch.save({k: ck[k] for k in ("step", "hyper", "backbone")}, ".cache/gpu/init.pt")
PYEOF
du -sh .cache/gpu
