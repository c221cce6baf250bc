"""Evaluate takumi against classical fits on held-out photos; prints the model card's tables.

    python models/train/eval.py [--ablation models/train/runs/ablation/ckpt.pt] [--per-family 6]

Quads (A, A', B, B') use two different held-out photos with the same synthetic edit. Methods fit
or learn on (A, A') only and are scored by PSNR of their result on B against the true B'."""
import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import edits
import takumi_learn as tl
import takumi_model as tm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.normpath(os.path.join(HERE, ".."))
W, H = 320, 240  # evaluation frame size (the smallest the appliance takes)


def psnr(x, y):
    mse = float(np.mean((np.clip(x, 0, 1) - np.clip(y, 0, 1)) ** 2))
    return 10 * math.log10(1 / max(mse, 1e-12))


# ------------------------------------------------------------------ classical fits

def fit_affine(a, a2):
    X = np.concatenate([a.reshape(3, -1), np.ones((1, a[0].size))]).T
    m, *_ = np.linalg.lstsq(X, a2.reshape(3, -1).T, rcond=None)
    return lambda b: (np.concatenate([b.reshape(3, -1), np.ones((1, b[0].size))]).T @ m).T.reshape(b.shape)


def fit_lut(a, a2, n=17, reg=1e-3):
    """17^3 LUT: trilinear splat of A -> A' (identity where there is no data), trilinear lookup."""
    def corners(x):
        p = np.clip(x.reshape(3, -1).T, 0, 1) * (n - 1)
        i0 = np.minimum(np.floor(p).astype(int), n - 2)
        f = p - i0
        for c in range(8):
            o = np.array([(c >> 2) & 1, (c >> 1) & 1, c & 1])
            wgt = np.prod(np.where(o, f, 1 - f), 1)
            idx = ((i0[:, 0] + o[0]) * n + i0[:, 1] + o[1]) * n + i0[:, 2] + o[2]
            yield idx, wgt

    acc = np.zeros((n ** 3, 3))
    wsum = np.zeros(n ** 3)
    tgt = a2.reshape(3, -1).T
    for idx, wgt in corners(a):
        np.add.at(acc, idx, wgt[:, None] * tgt)
        np.add.at(wsum, idx, wgt)
    g = np.stack(np.meshgrid(*[np.linspace(0, 1, n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    lut = (acc + reg * g) / (wsum + reg)[:, None]

    def apply(b):
        out = np.zeros((b[0].size, 3))
        for idx, wgt in corners(b):
            out += wgt[:, None] * lut[idx]
        return out.T.reshape(b.shape)
    return apply


def bank_features(x):
    t = torch.from_numpy(x)[None]
    h, w = x.shape[1:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    r2 = ((xx ** 2 + yy ** 2) / 2).astype(np.float32)
    with torch.no_grad():
        bl = [tm.blur(t, s)[0].numpy() for s in (1.0, 2.5, 6.0)]
    feats = [x] + bl + [r2[None], r2[None] * x, np.ones((1, h, w), np.float32)]
    return np.concatenate(feats).reshape(-1, h * w).T


def fit_bank(a, a2):
    """Least squares from colour, gaussian blur scales, radial position (and its product with
    colour, for vignette) and a bias."""
    X = bank_features(a)
    m, *_ = np.linalg.lstsq(X, a2.reshape(3, -1).T, rcond=None)
    return lambda b: (bank_features(b) @ m).T.reshape(b.shape)


# ------------------------------------------------------------------ test set

def crop(img, rng):
    _, h, w = img.shape
    s = rng.uniform(max(H / h, W / w), 1.0)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    x = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    t, l = rng.randint(0, nh - H), rng.randint(0, nw - W)
    return x[:, :, t:t + H, l:l + W]


def quads(photos, per_family, seed=11):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sets = [(f, False, lambda r, f=f: edits.sample(r, f)) for f in edits.FAMILIES]
    sets.append(("misaligned", True, lambda r: edits.sample(r)))
    sets.append(("chain", False, lambda r: edits.sample_chain(r)))
    out = []
    for name, mis, sampler in sets:
        n = per_family * (2 if name in ("misaligned", "chain") else 1)
        for _ in range(n):
            q = draw(photos, sampler, mis, rng, gen)
            # an edit that leaves B unchanged at 8 bits tests nothing, and doing nothing would
            # score the 120 dB cap on it, outweighing every other quad in a mean: draw again
            while np.array_equal(q["b"], q["b2"]):
                q = draw(photos, sampler, mis, rng, gen)
            out.append(dict(set=name, **q))
    return out


def draw(photos, sampler, mis, rng, gen):
    i, j, k = rng.sample(range(len(photos)), 3)
    e = sampler(rng)
    A, B, C = crop(photos[i], rng), crop(photos[j], rng), crop(photos[k], rng)
    a, a2 = edits.make_pair(A, e, gen)
    b, b2, b_clipped = edits.make_pair_clipped(B, e, gen)
    c, c2 = edits.make_pair(C, e, gen)
    if mis:
        a2 = edits.misalign(a2, rng)
    # 8-bit, like real captures: no fit gets an exact (infinite-PSNR) answer
    q8 = lambda x: (x[0].clamp(0, 1) * 255).round().numpy().astype(np.float32) / 255  # noqa: E731
    return dict(a=q8(a), a2=q8(a2), b=q8(b), b2=q8(b2), c=q8(c), c2=q8(c2), edit=e, b_clipped=b_clipped)


_W = {}


def init_worker(ablation, main_ckpt):
    torch.set_num_threads(1)
    _W["fl"], _W["i8"] = tl.Onnx(MODELS, "float", threads=1), tl.Onnx(MODELS, "int8", threads=1)
    _W["abl"] = tl.Torch(ablation) if ablation else None
    _W["main_at"] = tl.Torch(main_ckpt) if main_ckpt else None


def score_quad(q):
    fl, i8, abl, main_at = _W["fl"], _W["i8"], _W["abl"], _W["main_at"]
    A, A2, B, B2 = q["a"], q["a2"], q["b"], q["b2"]
    r = dict(set=q["set"], identity=psnr(B, B2))
    r["affine"] = psnr(fit_affine(A, A2)(B), B2)
    r["lut"] = psnr(fit_lut(A, A2)(B), B2)
    r["bank"] = psnr(fit_bank(A, A2)(B), B2)
    t, info = tl.learn(fl, [(A, A2)])
    out = tl.apply(fl, t, B)
    r["takumi"] = psnr(out, B2)
    r["quality_score"] = tl.quality_score(tl.histogram(A), B)
    r["fit_used"] = info["fit_used"]
    th, _ = tl.learn(fl, [(A, A2)], refine=False)
    r["takumi_h_only"] = psnr(tl.apply(fl, th, B), B2)
    r["reverse"] = psnr(tl.apply(fl, -t, out), B)
    r["reverse_true"] = psnr(tl.apply(fl, -t, B2), B)
    t8, _ = tl.learn(i8, [(A, A2)])
    r["takumi_int8"] = psnr(tl.apply(i8, t8, B), B2)
    # two pairs of the same edit (the second from another photo, C) against one
    t2, _ = tl.learn(fl, [(A, A2), (q["c"], q["c2"])])
    r["takumi_2pairs"] = psnr(tl.apply(fl, t2, B), B2)
    # appearance leakage: same edit learned from a different photo C; how much does B' move?
    tc, _ = tl.learn(fl, [(q["c"], q["c2"])], refine=False)
    r["leak_main"] = float(np.abs(tl.apply(fl, th, B) - tl.apply(fl, tc, B)).mean())
    for tag, mdl in (("ablation", abl), ("main_at_ablation_step", main_at)):
        if mdl is None:
            continue
        ta, _ = tl.learn(mdl, [(A, A2)], refine=False)
        tca, _ = tl.learn(mdl, [(q["c"], q["c2"])], refine=False)
        ob = tl.apply(mdl, ta, B)
        r[f"{tag}_h_only"] = psnr(ob, B2)
        r[f"{tag}_reverse"] = psnr(tl.apply(mdl, -ta, B2), B)
        r[f"leak_{tag}"] = float(np.abs(ob - tl.apply(mdl, tca, B)).mean())
        tf, _ = tl.learn(mdl, [(A, A2)])
        r[tag] = psnr(tl.apply(mdl, tf, B), B2)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-family", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ablation", help="checkpoint trained without LoRA Reverse")
    ap.add_argument("--main-ckpt", help="checkpoint of the main run at the ablation's step count")
    ap.add_argument("--json", default=os.path.join(MODELS, "eval.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    for f in ("hypernet.onnx", "backbone.onnx", "hypernet.int8.onnx", "backbone.int8.onnx"):
        if not os.path.exists(os.path.join(MODELS, f)):
            data.fail(f"models/{f} missing: run export.py first")
    names, photos = data.load_split(test=True)
    if len(photos) < 3:
        data.fail("fewer than 3 held-out photos: run fetch_photos.py")
    qs = quads(photos, a.per_family)
    print(f"{len(qs)} quads from {len(photos)} held-out photos at {W}x{H}", file=sys.stderr)
    t0 = time.time()
    with mp.get_context("fork").Pool(a.workers, initializer=init_worker, initargs=(a.ablation, a.main_ckpt)) as pool:
        rows = pool.map(score_quad, qs, chunksize=1)
    print(f"eval took {time.time() - t0:.0f} s", file=sys.stderr)
    with open(a.json, "w") as f:
        json.dump(rows, f)
    report(rows)


def report(rows):
    sets = list(dict.fromkeys(r["set"] for r in rows))
    cols = ["identity", "affine", "lut", "bank", "takumi", "takumi_int8", "takumi_h_only", "takumi_2pairs"]
    extra = [c for c in ("ablation", "main_at_ablation_step") if c in rows[0]]
    cols += extra
    print("| set | n | " + " | ".join(cols) + " | best classical | takumi − best |")
    print("|---|---|" + "---|" * (len(cols) + 2))
    margins, fam_margins = [], []
    for s in sets:
        rs = [r for r in rows if r["set"] == s]
        m = {c: float(np.mean([r[c] for r in rs])) for c in cols}
        best = max(m["affine"], m["lut"], m["bank"])
        margin = m["takumi"] - best
        margins.append((s, margin))
        if s not in ("misaligned", "chain"):
            fam_margins.append(margin)
        print(f"| {s} | {len(rs)} | " + " | ".join(f"{m[c]:.2f}" for c in cols) + f" | {best:.2f} | {margin:+.2f} |")
    allm = {c: float(np.mean([r[c] for r in rows])) for c in cols}
    print("| all | %d | " % len(rows) + " | ".join(f"{allm[c]:.2f}" for c in cols) + " | | |")
    print()
    print(f"takumi float − best classical, averaged over the {len(fam_margins)} families: "
          f"{np.mean(fam_margins):+.2f} dB (target ≥ +2)")
    for s in ("misaligned", "scurve", "selective_colour"):
        mm = dict(margins).get(s)
        if mm is not None:
            print(f"  {s}: {mm:+.2f} dB (target ≥ +3)")
    worst = min(margins, key=lambda x: x[1])
    print(f"worst set: {worst[0]} {worst[1]:+.2f} dB (target ≥ −1)")
    d8 = np.mean([r["takumi"] - r["takumi_int8"] for r in rows])
    print(f"int8 − float: {-d8:+.3f} dB mean (target within 0.3)")
    d2 = np.mean([r["takumi_2pairs"] - r["takumi"] for r in rows])
    print(f"two pairs − one pair: {d2:+.2f} dB mean")
    print(f"fit used on {np.mean([r['fit_used'] for r in rows]) * 100:.0f}% of templates")
    print(f"reverse G(−Δ, G(Δ,B)) vs B: {np.mean([r['reverse'] for r in rows]):.2f} dB; "
          f"G(−Δ, B′) vs B: {np.mean([r['reverse_true'] for r in rows]):.2f} dB")
    qs = np.array([r["quality_score"] for r in rows])
    gain = np.array([r["takumi"] - r["identity"] for r in rows])
    print("quality-gate calibration (score of B against the source A; takumi gain over doing nothing):")
    for lo, hi in ((0, 0.2), (0.2, 0.35), (0.35, 0.5), (0.5, 1.01)):
        sel = (qs >= lo) & (qs < hi)
        if sel.any():
            print(f"  score {lo:.2f}-{min(hi, 1):.2f}: n={sel.sum()}, mean gain {gain[sel].mean():+.2f} dB, "
                  f"worse than doing nothing {np.mean(gain[sel] < 0) * 100:.0f}%")
    print(f"appearance leakage (mean |G(H(A,A′),B) − G(H(C,C′),B)|, H only): main {np.mean([r['leak_main'] for r in rows]):.4f}")
    for tag in ("ablation", "main_at_ablation_step"):
        if f"leak_{tag}" in rows[0]:
            print(f"  {tag}: leakage {np.mean([r[f'leak_{tag}'] for r in rows]):.4f}, "
                  f"H-only PSNR {np.mean([r[f'{tag}_h_only'] for r in rows]):.2f} dB, "
                  f"reverse G(−Δ, B′) vs B {np.mean([r[f'{tag}_reverse'] for r in rows]):.2f} dB")


if __name__ == "__main__":
    main()
