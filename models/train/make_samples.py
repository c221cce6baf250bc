"""Make the shipped sample images (models/samples/), from scikit-image's public-domain/CC0 photos.

The sample edit is a "warm polish": S-curve contrast, a warm white balance and a light sharpen,
with the after shot moved by a few pixels as on a real station. The captures come with the same
edit applied (expected/), so tests can score a result against ground truth.

    python models/train/make_samples.py
"""
import os

import numpy as np
import skimage.data as sd
import torch
from PIL import Image

import edits

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "samples"))
EDIT = [("scurve", dict(k=0.6, pivot=0.5)), ("exposure_wb", dict(ev=0.25, wb=[1.12, 1.0, 0.85])),
        ("sharpen", dict(sigma=1.2, amount=0.6))]
SHIFT = (5, -3)  # (dx, dy) of the after shot, pixels


def t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def save(x, path):
    a = (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(a).save(path, quality=95)


def crop(a, w, h):
    y, x = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    return a[y:y + h, x:x + w]


def main():
    os.makedirs(os.path.join(OUT, "captures"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "expected"), exist_ok=True)
    coffee = sd.coffee()  # 400 x 600
    before = t(crop(coffee, 560, 400))
    after = edits.apply_edit(before, EDIT)
    dx, dy = SHIFT
    after = torch.roll(after, shifts=(dy, dx), dims=(2, 3))
    # the rolled-in border is not real content: crop both to the common interior
    m = 8
    save(before[..., m:-m, m:-m], os.path.join(OUT, "pair_before.jpg"))
    save(after[..., m:-m, m:-m], os.path.join(OUT, "pair_after.jpg"))
    caps = {"chelsea": crop(sd.chelsea(), 448, 300), "astronaut": crop(sd.astronaut(), 512, 384),
            "rocket": crop(sd.rocket(), 640, 427)}
    for name, img in caps.items():
        x = t(img)
        save(x, os.path.join(OUT, "captures", f"{name}.jpg"))
        save(edits.apply_edit(x, EDIT), os.path.join(OUT, "expected", f"{name}.jpg"))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"samples in {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
