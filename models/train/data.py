"""Photo cache, held-out split and quad sampling."""
import hashlib
import os
import random
import sys

import numpy as np
import torch
from PIL import Image

import edits

HERE = os.path.dirname(os.path.abspath(__file__))
# TAKUMI_PHOTOS: another folder of the same photos (gpu_pack.sh makes one, pre-scaled to LOAD_SIDE, to travel)
CACHE = os.environ.get("TAKUMI_PHOTOS") or os.path.join(HERE, ".cache", "photos")
LOAD_SIDE = 512  # photos are held in memory at this size; crops are taken after a random rescale


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def photo_files():
    if not os.path.isdir(CACHE) or not os.listdir(CACHE):
        fail(f"no photo cache at {CACHE}: run `python models/train/fetch_photos.py` first")
    return sorted(os.listdir(CACHE))


def is_test(name):
    """Held-out split of whole photos: the scikit-image photos (they also make the shipped samples)
    and ~1/7 of the rest, chosen by a hash of the name, stable across runs."""
    return name.startswith("skimage__") or int(hashlib.sha1(name.encode()).hexdigest(), 16) % 7 == 0


def load_rgb(path, max_side=None):
    try:
        im = Image.open(path).convert("RGB")
    except Exception as e:
        fail(f"{path}: cannot read image ({e})")
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def load_split(test):
    names = [n for n in photo_files() if is_test(n) == test]
    return names, [load_rgb(os.path.join(CACHE, n), LOAD_SIDE) for n in names]


def random_crop(img, size, rng):
    """Random rescale (so crops see both detail and whole scenes) then a random crop. The region
    is cut first and only it is resized, which keeps sampling cheap."""
    _, h, w = img.shape
    hi = min(h, w)
    src = round(rng.uniform(size, max(size, hi)))  # side of the source region, before resizing
    t, l = rng.randint(0, h - src), rng.randint(0, w - src)
    reg = img[:, t:t + src, l:l + src]
    if src != size:
        reg = torch.nn.functional.interpolate(reg[None], size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)[0]
    return reg


def sample_edit(rng):
    r = rng.random()
    if r < 0.2:
        return edits.sample_chain(rng)
    return edits.sample(rng)


def restrict_range(x, kind, amount):
    """Take tones or hues away from a shot, so the pair never shows what the query has:
    'dark' scales into the shadows, 'dull' pulls colour toward grey (amount in 0..1, 1 = strongest)."""
    if kind == "dark":
        return x * (1 - 0.75 * amount)
    grey = x.mean(dim=1, keepdim=True)
    return grey + (x - grey) * (1 - 0.85 * amount)


def under_determined(a, b, rng):
    """One of four: A dark, A dull, B dark, B dull (the last two: the pair shows tones the query lacks)."""
    kind = rng.choice(["dark", "dull"])
    amount = rng.uniform(0.5, 1.0)
    if rng.random() < 0.5:
        return restrict_range(a, kind, amount), b
    return a, restrict_range(b, kind, amount)


def synthetic_quads(photos, n, size, rng, gen, misalign_p=0.4, under_p=0.25):
    """n quads (A, A', B, B'): one edit per quad applied to two different photos. A share of them are
    under-determined (one shot lacks the other's tones or hues): the hypernetwork's job there."""
    A, A2, B, B2 = [], [], [], []
    for _ in range(n):
        i, j = rng.sample(range(len(photos)), 2)
        a, b = random_crop(photos[i], size, rng)[None], random_crop(photos[j], size, rng)[None]
        if rng.random() < under_p:
            a, b = under_determined(a, b, rng)
        e = sample_edit(rng)
        a, a2 = edits.make_pair(a, e, gen)
        b, b2 = edits.make_pair(b, e, gen)
        if rng.random() < misalign_p:
            a2 = edits.misalign(a2, rng)
        A.append(a), A2.append(a2), B.append(b), B2.append(b2)
    return torch.cat(A), torch.cat(A2), torch.cat(B), torch.cat(B2)


def load_pairs(d):
    """A folder of before/after pairs, named NAME_before.EXT and NAME_after.EXT."""
    if not os.path.isdir(d):
        fail(f"--pairs {d}: not a folder")
    files = os.listdir(d)
    stems = {}
    for f in files:
        stem, _ = os.path.splitext(f)
        for tag in ("_before", "_after"):
            if stem.endswith(tag):
                stems.setdefault(stem[: -len(tag)], {})[tag] = os.path.join(d, f)
    if not stems:
        fail(f"--pairs {d}: no NAME_before.png / NAME_after.png files found")
    pairs = []
    for k, v in sorted(stems.items()):
        if len(v) != 2:
            fail(f"--pairs {d}: '{k}' has no matching {'_after' if '_before' in v else '_before'} file")
        a, a2 = load_rgb(v["_before"]), load_rgb(v["_after"])
        if a.shape != a2.shape:
            fail(f"--pairs {d}: '{k}' before is {a.shape[2]}x{a.shape[1]} but after is {a2.shape[2]}x{a2.shape[1]}; "
                 "they must be the same size")
        if min(a.shape[1:]) < 96:
            fail(f"--pairs {d}: '{k}' is smaller than 96 px")
        pairs.append((a, a2))
    return pairs


def pair_quads(pairs, n, size, rng):
    """Pairs-only mode (the paper's): the horizontally flipped pair is the query (B, B')."""
    A, A2, B, B2 = [], [], [], []
    for _ in range(n):
        a, a2 = pairs[rng.randrange(len(pairs))]
        both = torch.cat([a, a2])
        c1 = random_crop(both, min(size, min(a.shape[1:])), rng)
        c2 = random_crop(both, min(size, min(a.shape[1:])), rng).flip(-1)
        A.append(c1[None, :3]), A2.append(c1[None, 3:]), B.append(c2[None, :3]), B2.append(c2[None, 3:])
    return torch.cat(A), torch.cat(A2), torch.cat(B), torch.cat(B2)
