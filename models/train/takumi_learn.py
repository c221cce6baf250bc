"""Python mirror of the Rust `learn`/`apply` (src/engine/): H on each pair, templates averaged,
pair alignment, closed-form offset fit validated on the pair itself, G on full frames. The
evaluation scores exactly this procedure; tests/golden.rs checks the Rust side stage by stage.

Frames are numpy float32 arrays (3, H, W) in [0, 1]."""
import math
import os

import numpy as np
import onnxruntime as ort
import torch

import takumi_model as tm

P = tm.LBINS * tm.K
BLOCK = 32
TARGET_SAMPLES = 30000.0


class Onnx:
    """The exported models, run by onnxruntime (float or int8)."""

    def __init__(self, models_dir, precision="float", threads=2):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sfx = "" if precision == "float" else ".int8"
        self.h = ort.InferenceSession(os.path.join(models_dir, f"hypernet{sfx}.onnx"), so,
                                      providers=["CPUExecutionProvider"])
        self.g = ort.InferenceSession(os.path.join(models_dir, f"backbone{sfx}.onnx"), so,
                                      providers=["CPUExecutionProvider"])

    def hypernet(self, a, a2):
        ta, ta2, pa, pa2 = [x.numpy() for x in tm.hyper_inputs(torch.from_numpy(a)[None], torch.from_numpy(a2)[None])]
        return self.h.run(None, dict(thumb_a=ta, thumb_a2=ta2, patch_a=pa, patch_a2=pa2))[0][0]

    def grid(self, template, x):
        th = tm.thumbnail(torch.from_numpy(x)[None]).numpy()
        return self.g.run(None, dict(thumb=th, template=template[None].astype(np.float32)))[0]


class Torch:
    """The same interface on a training checkpoint (for the ablation and un-exported runs)."""

    def __init__(self, ckpt):
        ck = torch.load(ckpt, weights_only=False, map_location="cpu")
        self.hn, self.bb = tm.HyperNet().eval(), tm.Backbone().eval()
        self.hn.load_state_dict(ck["hyper"])
        self.bb.load_state_dict(ck["backbone"])

    @torch.no_grad()
    def hypernet(self, a, a2):
        return self.hn(*tm.hyper_inputs(torch.from_numpy(a)[None], torch.from_numpy(a2)[None]))[0].numpy()

    @torch.no_grad()
    def grid(self, template, x):
        return self.bb(tm.thumbnail(torch.from_numpy(x)[None]), torch.from_numpy(template)[None].float()).numpy()


def apply(model, template, x):
    with torch.no_grad():
        g = torch.from_numpy(model.grid(template, x))
        return tm.slice_apply(torch.from_numpy(x)[None], g)[0].numpy()


def luma(x):
    return np.clip(tm.LUMA[0] * x[0] + tm.LUMA[1] * x[1] + tm.LUMA[2] * x[2], 0, 1)


def _down(p, s):
    h, w = p.shape[0] // s, p.shape[1] // s
    return p[:h * s, :w * s].reshape(h, s, w, s).mean((1, 3))


def _grad(p):
    g = np.abs(p[:-1, 1:] - p[:-1, :-1]) + np.abs(p[1:, :-1] - p[:-1, :-1])
    return (g - g.mean()) / max(g.std(), 1e-6)


def _score(a, b, dx, dy):
    h, w = a.shape
    x0, x1, y0, y1 = max(0, -dx), min(w, w - dx), max(0, -dy), min(h, h - dy)
    if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) * 2 < w * h:
        return -math.inf
    return float((a[y0:y1, x0:x1] * b[y0 + dy:y1 + dy, x0 + dx:x1 + dx]).mean())


def align(a, a2):
    """(dx, dy) with a2[y+dy, x+dx] ~ a[y, x]; coarse-to-fine on normalised gradient magnitudes."""
    h, w = a.shape[1:]
    la, lb = luma(a), luma(a2)
    s = 1
    while w // (s * 2) >= 48 and h // (s * 2) >= 48 and s < 16:
        s *= 2
    dx = dy = 0
    first = True
    while s >= 1:
        ga, gb = _grad(_down(la, s)), _grad(_down(lb, s))
        if first:
            cx, cy, r = 0, 0, math.ceil(0.06 * max(ga.shape[1], ga.shape[0]))
        else:
            cx, cy, r = 2 * dx, 2 * dy, 1
        best = (-math.inf, cx, cy)
        for ty in range(cy - r, cy + r + 1):
            for tx in range(cx - r, cx + r + 1):
                sc = _score(ga, gb, tx, ty)
                if sc > best[0]:
                    best = (sc, tx, ty)
        _, dx, dy = best
        first = False
        s //= 2
    return dx, dy


def misregistered(a, a2, shift):
    """Quadrant shifts disagreeing with the frame's by > 1 px: rotation or scale (src/engine/align.rs)."""
    h, w = a.shape[1:]
    hw, hh = w // 2, h // 2
    if hw < 64 or hh < 64:
        return False
    for x, y, qw, qh in ((0, 0, hw, hh), (hw, 0, w - hw, hh), (0, hh, hw, h - hh), (hw, hh, w - hw, h - hh)):
        dx, dy = align(a[:, y:y + qh, x:x + qw], a2[:, y:y + qh, x:x + qw])
        if abs(dx - shift[0]) > 1 or abs(dy - shift[1]) > 1:
            return True
    return False


def overlap(w, h, dx, dy):
    x0, y0 = max(0, -dx), max(0, -dy)
    x1, y1 = max(x0, min(w, w - dx)), max(y0, min(h, h - dy))
    return x0, y0, x1 - x0, y1 - y0


def stride(w, h):
    return max(2, int(math.floor(math.sqrt(w * h / TARGET_SAMPLES) + 0.5)))


class Fit:
    """Least-squares global coefficient offset, ridge strength chosen by 2-fold block validation."""

    def __init__(self):
        self.m = np.zeros((2, P, P))
        self.v = np.zeros((2, P, 3))
        self.rr = np.zeros(2)

    def add(self, a, a2, pred, shift):
        dx, dy = shift
        h, w = a.shape[1:]
        ox, oy, ow, oh = overlap(w, h, dx, dy)
        s = stride(ow, oh)
        ys, xs = np.meshgrid(np.arange(oy, oy + oh, s), np.arange(ox, ox + ow, s), indexing="ij")
        ys, xs = ys.ravel(), xs.ravel()
        with torch.no_grad():
            feats = tm.features(torch.from_numpy(a)[None])[0].numpy()
        f = feats[:, ys, xs].T.astype(np.float64)  # (n, K)
        y = luma(a)[ys, xs] * (tm.LBINS - 1)
        l0 = np.minimum(np.floor(y).astype(int), tm.LBINS - 1)
        w1 = y - l0
        w0 = 1 - w1
        n = len(ys)
        phi = np.zeros((n, P))
        rows = np.arange(n)[:, None]
        phi[rows, l0[:, None] * tm.K + np.arange(tm.K)] += w0[:, None] * f
        ok = l0 + 1 < tm.LBINS
        phi[rows[ok], (l0[ok, None] + 1) * tm.K + np.arange(tm.K)] += w1[ok, None] * f[ok]
        r = (a2[:, ys + dy, xs + dx] - pred[:, ys, xs]).T.astype(np.float64)  # (n, 3)
        fold = (ys // BLOCK + xs // BLOCK) % 2
        for q in (0, 1):
            sel = fold == q
            self.m[q] += phi[sel].T @ phi[sel]
            self.v[q] += phi[sel].T @ r[sel]
            self.rr[q] += (r[sel] ** 2).sum()

    def solve(self):
        tr = np.trace(self.m[0]) + np.trace(self.m[1])
        if tr <= 0:
            return None
        best = (self.rr.sum(), None)
        for j in range(1, 7):
            lam = tr / P * 10.0 ** (-j)
            err = 0.0
            for a, b in ((0, 1), (1, 0)):
                d = np.linalg.solve(self.m[a] + lam * np.eye(P), self.v[a])
                err += self.rr[b] + np.sum(d * (self.m[b] @ d)) - 2 * np.sum(d * self.v[b])
            if err < best[0]:
                best = (err, lam)
        if best[1] is None:
            return None
        d = np.linalg.solve(self.m.sum(0) + best[1] * np.eye(P), self.v.sum(0))  # (P, 3) = [l*K+k, c]
        return d.reshape(tm.LBINS, tm.K, 3).transpose(0, 2, 1).reshape(-1).astype(np.float32)


def offset_at():
    o = 0
    for name, shape in tm.layout():
        if name == "offset":
            return o
        o += math.prod(shape)
    raise ValueError("no offset in the layout")


def learn(model, pairs, refine=True):
    """pairs: [(a, a2)] -> (template, info)."""
    t = np.mean([model.hypernet(a, a2) for a, a2 in pairs], 0).astype(np.float32)
    used = False
    if refine:
        fit = Fit()
        for a, a2 in pairs:
            shift = align(a, a2)
            if not misregistered(a, a2, shift):
                fit.add(a, a2, apply(model, t, a), shift)
        off = fit.solve()
        if off is not None:
            o = offset_at()
            t = t.copy()
            t[o:o + off.size] += off
            used = True
    return t, dict(fit_used=used)


CHROMA_FULL = 0.1


def histogram(x):
    """Quality-gate histogram of a frame (mirror of src/engine/quality.rs): LBINS luminance bins x
    (HUES sectors + neutral) over the 64x64 thumbnail, normalised to sum 1."""
    with torch.no_grad():
        t = tm.thumbnail(torch.from_numpy(x)[None])
        hf = tm.hue_features(t)[0].numpy().reshape(tm.HUES, -1)
        wl = tm.lum_weights(t)[0].numpy().reshape(tm.LBINS, -1)
    r, g, b = [t[0, c].numpy().ravel() for c in range(3)]
    oa, ob = r - 0.5 * (g + b), 0.8660254 * (g - b)
    colour = np.minimum(np.sqrt(oa * oa + ob * ob) / CHROMA_FULL, 1)
    share = colour * hf / (hf.sum(0) + 1e-6)
    cols = np.concatenate([share, (1 - colour)[None]])  # (HUES+1, n)
    h = wl @ cols.T  # (LBINS, HUES+1)
    return (h / max(h.sum(), 1e-6)).ravel()


def quality_score(source_hist, x):
    return 0.5 * float(np.abs(source_hist - histogram(x)).sum())
