"""Synthetic edit generator. Every parameter is drawn from a continuous range, so the model never
sees the same edit twice. An edit is a (family, params) pair; `apply_edit` applies it to any
batch of images, so the same edit can be applied to A and to B (a quad)."""
import math
import random

import torch
import torch.nn.functional as F

from takumi_model import blur, luminance

FAMILIES = [
    "exposure_wb", "gamma", "scurve", "lift_gain", "saturation", "vibrance", "hue_rotate", "sepia",
    "mono_tint", "channel_mix", "split_tone", "selective_colour", "blur", "sharpen", "clarity",
    "vignette_add", "vignette_remove", "denoise",
]
# families that training never samples: the pairs-only fine-tuning measurement (pairs_only_eval.py)
# holds one out as "an edit family that training never saw"
UNSEEN = ["cross_process"]
# families whose "before" is made from the clean photo (the edit removes something)
REMOVAL = {"vignette_remove", "denoise"}


def srgb_to_lin(x):
    x = x.clamp(0, 1)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def lin_to_srgb(x):
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=1e-8) ** (1 / 2.4) - 0.055)


def rgb_to_hsv(x):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    d = mx - mn
    h = torch.zeros_like(mx)
    dd = d + 1e-8
    h = torch.where(mx == r, ((g - b) / dd) % 6, h)
    h = torch.where(mx == g, (b - r) / dd + 2, h)
    h = torch.where(mx == b, (r - g) / dd + 4, h)
    h = torch.where(d == 0, torch.zeros_like(h), h) / 6.0
    s = torch.where(mx > 0, d / (mx + 1e-8), torch.zeros_like(mx))
    return torch.stack([h % 1.0, s, mx], 1)


def hsv_to_rgb(x):
    h, s, v = x[:, 0] % 1.0, x[:, 1].clamp(0, 1), x[:, 2]
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    r = torch.stack([v, q, p, p, t, v], 0).gather(0, i.unsqueeze(0))[0]
    g = torch.stack([t, v, v, q, p, p], 0).gather(0, i.unsqueeze(0))[0]
    b = torch.stack([p, p, t, v, v, q], 0).gather(0, i.unsqueeze(0))[0]
    return torch.stack([r, g, b], 1)


def radial(x):
    """Squared distance from the centre, 1 at the corners."""
    n, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w)
    return ((xx * xx + yy * yy) / 2).expand(n, 1, h, w)


def u(rng, lo, hi):
    return rng.uniform(lo, hi)


def sample(rng, family=None):
    f = family or rng.choice(FAMILIES)
    s = rng.choice([-1, 1])
    if f == "exposure_wb":
        p = dict(ev=u(rng, -1.2, 1.2), wb=[math.exp(u(rng, -0.25, 0.25)) for _ in range(3)])
    elif f == "gamma":
        p = dict(g=math.exp(u(rng, -0.6, 0.6)))
    elif f == "scurve":
        p = dict(k=s * u(rng, 0.3, 0.9), pivot=u(rng, 0.35, 0.65))
    elif f == "lift_gain":
        p = dict(lift=[u(rng, -0.08, 0.12) for _ in range(3)], gain=[u(rng, 0.75, 1.2) for _ in range(3)])
    elif f == "saturation":
        p = dict(s=math.exp(u(rng, -1.0, 0.6)))
    elif f == "vibrance":
        p = dict(v=u(rng, -0.6, 1.0))
    elif f == "hue_rotate":
        p = dict(d=s * u(rng, 0.04, 0.35))
    elif f == "sepia":
        p = dict(amount=u(rng, 0.4, 1.0))
    elif f == "mono_tint":
        p = dict(tint=[u(rng, 0.7, 1.15) for _ in range(3)], amount=u(rng, 0.6, 1.0))
    elif f == "channel_mix":
        m = [[(1.0 if i == j else 0.0) + u(rng, -0.3, 0.3) for j in range(3)] for i in range(3)]
        p = dict(m=m)
    elif f == "split_tone":
        p = dict(shadow=[u(rng, -0.1, 0.1) for _ in range(3)], high=[u(rng, -0.1, 0.1) for _ in range(3)],
                 balance=u(rng, 0.35, 0.65))
    elif f == "selective_colour":
        p = dict(hue=rng.random(), width=u(rng, 0.06, 0.14), dh=u(rng, -0.12, 0.12), ds=u(rng, 0.3, 1.6),
                 dv=u(rng, 0.75, 1.25))
    elif f == "blur":
        p = dict(sigma=u(rng, 0.8, 3.0))
    elif f == "sharpen":
        p = dict(sigma=u(rng, 0.8, 2.0), amount=u(rng, 0.4, 1.5))
    elif f == "clarity":
        p = dict(sigma=u(rng, 6.0, 16.0), amount=s * u(rng, 0.3, 0.9))
    elif f in ("vignette_add", "vignette_remove"):
        p = dict(strength=u(rng, 0.25, 0.7), power=u(rng, 1.0, 2.0))
    elif f == "denoise":
        p = dict(noise=u(rng, 0.02, 0.07), chroma=rng.random() < 0.5)
    elif f == "cross_process":
        # film cross-processing: red and green contrast up, blue shadows lifted and highlights cut
        p = dict(kr=u(rng, 0.2, 0.6), kg=u(rng, 0.1, 0.4), lift=u(rng, 0.05, 0.2), cut=u(rng, 0.1, 0.3))
    else:
        raise ValueError(f"unknown edit family {f}")
    return f, p


def sample_chain(rng, n=None):
    n = n or rng.choice([2, 3])
    fams = rng.sample([f for f in FAMILIES if f not in REMOVAL], n)
    return [sample(rng, f) for f in fams]


def _t(v, x):
    return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


def apply_one(x, f, p, gen=None):
    if f == "exposure_wb":
        return lin_to_srgb(srgb_to_lin(x) * (2 ** p["ev"]) * _t(p["wb"], x))
    if f == "gamma":
        return x.clamp(0, 1) ** p["g"]
    if f == "scurve":
        # smooth sigmoid-like curve through (0,0),(1,1) around a pivot
        k, c = p["k"], p["pivot"]
        x = x.clamp(0, 1)
        y = torch.where(x < c, c * (x / c) ** (1 + k), 1 - (1 - c) * ((1 - x) / (1 - c)) ** (1 + k))
        return y
    if f == "lift_gain":
        lift, gain = _t(p["lift"], x), _t(p["gain"], x)
        return lift + (gain - lift) * x
    if f == "saturation":
        y = luminance(x)
        return y + (x - y) * p["s"]
    if f == "vibrance":
        mx, _ = x.max(1, keepdim=True)
        mn, _ = x.min(1, keepdim=True)
        sat = mx - mn
        y = luminance(x)
        return y + (x - y) * (1 + p["v"] * (1 - sat).clamp(0, 1))
    if f == "hue_rotate":
        hsv = rgb_to_hsv(x.clamp(0, 1))
        hsv = torch.cat([hsv[:, :1] + p["d"], hsv[:, 1:]], 1)
        return hsv_to_rgb(hsv)
    if f == "sepia":
        m = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=x.dtype,
                         device=x.device)
        s = torch.einsum("ij,njhw->nihw", m, x)
        return x + p["amount"] * (s - x)
    if f == "mono_tint":
        y = luminance(x) * _t(p["tint"], x)
        return x + p["amount"] * (y - x)
    if f == "channel_mix":
        m = torch.tensor(p["m"], dtype=x.dtype, device=x.device)
        m = m / m.sum(1, keepdim=True).clamp(min=0.5)
        return torch.einsum("ij,njhw->nihw", m, x)
    if f == "split_tone":
        y = luminance(x)
        w = torch.sigmoid((y - p["balance"]) * 10)
        return x + (1 - w) * _t(p["shadow"], x) + w * _t(p["high"], x)
    if f == "selective_colour":
        hsv = rgb_to_hsv(x.clamp(0, 1))
        d = (hsv[:, :1] - p["hue"] + 0.5) % 1.0 - 0.5
        w = torch.exp(-0.5 * (d / p["width"]) ** 2) * hsv[:, 1:2].clamp(0, 1).sqrt()
        h2 = hsv[:, :1] + w * p["dh"]
        s2 = hsv[:, 1:2] * (1 + w * (p["ds"] - 1))
        v2 = hsv[:, 2:3] * (1 + w * (p["dv"] - 1))
        return hsv_to_rgb(torch.cat([h2, s2.clamp(0, 1), v2], 1))
    if f == "blur":
        return blur(x, p["sigma"])
    if f == "sharpen":
        return x + p["amount"] * (x - blur(x, p["sigma"]))
    if f == "clarity":
        y = luminance(x)
        d = y - blur(y, p["sigma"])
        # mid-tone weighted local contrast, as photo editors do
        return x + p["amount"] * d * (1 - (2 * y - 1) ** 2)
    if f == "vignette_add":
        return x * (1 - p["strength"] * radial(x) ** p["power"])
    if f == "vignette_remove":
        return x / (1 - p["strength"] * radial(x) ** p["power"])
    if f == "cross_process":
        x = x.clamp(0, 1)
        s_curve = lambda c, k: torch.where(c < 0.5, 0.5 * (2 * c) ** (1 + k), 1 - 0.5 * (2 - 2 * c) ** (1 + k))  # noqa: E731
        b = p["lift"] + (1 - p["lift"] - p["cut"]) * x[:, 2:3]
        return torch.cat([s_curve(x[:, :1], p["kr"]), s_curve(x[:, 1:2], p["kg"]), b], 1)
    if f == "denoise":
        return x  # the noise is added to the before image, see make_before
    raise ValueError(f)


def apply_edit(x, edit):
    """edit: (family, params) or a list of them (a chain). Output clamped to [0,1]."""
    chain = edit if isinstance(edit, list) else [edit]
    for f, p in chain:
        x = apply_one(x, f, p)
    return x.clamp(0, 1)


def make_before(x, edit, gen=None):
    """For removal edits the before is derived from the clean photo; otherwise it is the photo."""
    chain = edit if isinstance(edit, list) else [edit]
    for f, p in chain:
        if f == "denoise":
            # drawn on the generator's device (quads may be made on a GPU from a CPU generator)
            dev = gen.device if gen is not None else x.device
            n = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=dev).to(x.device) * p["noise"]
            if not p["chroma"]:
                n = n[:, :1].expand_as(x)
            x = (x + n).clamp(0, 1)
        elif f == "vignette_remove":
            x = x * (1 - p["strength"] * radial(x) ** p["power"])
    return x


def make_pair(x, edit, gen=None):
    """x: clean photos (N,3,H,W) -> (before, after)."""
    before, after, _ = make_pair_clipped(x, edit, gen)
    return before, after


def make_pair_clipped(x, edit, gen=None):
    """make_pair, and the fraction of pixels that an edit step pushed out of [0, 1] by more
    than half an 8-bit level in any channel: what the clamp throws away, which no undo gets back."""
    before = make_before(x, edit, gen)
    chain = edit if isinstance(edit, list) else [edit]
    after = before
    lost = torch.zeros_like(before[:, :1], dtype=torch.bool)
    for f, p in chain:
        if f == "denoise":
            after = x
            continue
        if f == "vignette_remove":
            after = after / (1 - p["strength"] * radial(x) ** p["power"])
        else:
            after = apply_one(after, f, p)
        half = 0.5 / 255
        lost |= ((after < -half) | (after > 1 + half)).any(1, keepdim=True)
        if f == "vignette_remove":
            after = after.clamp(0, 1)
    return before.clamp(0, 1), after.clamp(0, 1), lost.float().mean().item()


def misalign(x, rng, amount=0.04):
    """Shift, rotate and scale by a few percent, as when the part moves between shots."""
    n = x.shape[0]
    th = []
    for _ in range(n):
        a = math.radians(rng.uniform(-2.5, 2.5))
        s = 1 + rng.uniform(-amount, amount)
        tx, ty = rng.uniform(-amount, amount) * 2, rng.uniform(-amount, amount) * 2
        th.append([[s * math.cos(a), -s * math.sin(a), tx], [s * math.sin(a), s * math.cos(a), ty]])
    theta = torch.tensor(th, dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
