"""takumi's edit model: hypernetwork H(A, A') -> template, backbone G(template, B) -> B'.

G has two parts:
  * a low-resolution CNN ("backbone.onnx") that sees a 64x64 thumbnail of B and, through the
    template's LoRA factors, predicts a bilateral grid of coefficient *changes* (GY x GX cells x
    L luminance bins x 3 outputs x K features);
  * a full-resolution filter bank and slicing step (src/apply/ in Rust, `slice_apply` here):
    K cheap per-pixel features of B (colour, two gaussian blurs, bias, six hue-sector chroma
    terms) are combined with the coefficients, interpolated trilinearly at (x, y, luminance).

The grid's last layer has zero base weights, so with a zero template G(0, B) == B exactly.
The template is one flat float vector; negating it is LoRA Reverse.
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

THUMB = 64  # thumbnail side seen by H and by the backbone CNN
PATCH = 64  # native-resolution centre patch seen by H (fine detail, noise)
GRID = 8  # spatial cells of the coefficient grid
LBINS = 8  # luminance bins of the coefficient grid
K = 16  # per-pixel features
SIGMAS = (1.5, 6.0)  # filter-bank gaussian sigmas, in full-resolution pixels
HUES = 6
GRID_CH = LBINS * 3 * K  # 384
RANK_INNER = 4
RANK_FINAL = 8
LUMA = (0.299, 0.587, 0.114)

# backbone convs: (name, cin, cout, k, stride)
CONVS = [
    ("c1", 3, 24, 3, 2),
    ("c2", 24, 32, 3, 2),
    ("c3", 32, 48, 3, 2),
    ("c4", 48, 64, 3, 1),
    ("c5", 64, 64, 3, 1),
    ("g1", 64, 64, 1, 1),
]
FINAL_IN = 65  # 64 features + a constant-one channel


def layout():
    """(name, shape) of every piece of the flat template vector, in order."""
    out = []
    for name, cin, cout, k, _ in CONVS:
        out.append((name + ".a", (RANK_INNER, cin * k * k)))
        out.append((name + ".b", (cout, RANK_INNER)))
    out.append(("final.a", (RANK_FINAL, FINAL_IN)))
    out.append(("final.b", (GRID_CH, RANK_FINAL)))
    # rank-1 LoRA of the final layer on its constant channel: a global coefficient offset.
    # `learn` refines it in closed form (least squares on the pair).
    out.append(("offset", (GRID_CH,)))
    return out


def template_len():
    return sum(math.prod(s) for _, s in layout())


def split_template(t):
    """t: (N, T) -> dict name -> (N, *shape)."""
    parts, o = {}, 0
    for name, shape in layout():
        n = math.prod(shape)
        parts[name] = t[:, o:o + n].reshape((t.shape[0],) + shape)
        o += n
    return parts


# ---------------------------------------------------------------- full-resolution filter bank

def gauss_kernel(sigma):
    r = int(math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    w = torch.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum(), r


@functools.lru_cache(maxsize=128)  # bounded: the edits draw sigma from a continuous range
def blur_matrix(n, sigma):
    """(n, n) matrix of a 1-D gaussian with replicate borders folded in: a GEMM is much faster on
    CPU than a depthwise conv, and it is the same function the Rust filter bank computes. Built with
    one np.add.at in the order of the former loop (column by column, tap by tap), so the float32
    sums are the same, ~1000x faster than a Python loop over taps."""
    w, r = gauss_kernel(sigma)
    i = np.repeat(np.arange(n), 2 * r + 1)
    t = np.tile(np.arange(-r, r + 1), n)
    m = np.zeros((n, n), dtype=np.float32)
    np.add.at(m, (np.clip(i + t, 0, n - 1), i), w.numpy()[t + r])
    return torch.from_numpy(m)


@functools.lru_cache(maxsize=128)
def _blur_matrix_on(n, sigma, device, dtype):
    return blur_matrix(n, sigma).to(device=device, dtype=dtype)


def blur(x, sigma):
    """Separable gaussian with replicate borders (the Rust filter bank matches this)."""
    h, w = x.shape[-2:]
    mw = _blur_matrix_on(w, sigma, x.device, x.dtype)
    mh = _blur_matrix_on(h, sigma, x.device, x.dtype)
    y = x @ mw  # rows
    return (y.transpose(-1, -2) @ mh).transpose(-1, -2)  # columns


def luminance(x):
    return (LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]).clamp(0, 1)


def hue_features(x):
    """Chroma in six hue sectors: C * max(0, cos(h - 60deg*j))^2, from opponent coordinates."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    oa = r - 0.5 * (g + b)
    ob = 0.8660254 * (g - b)
    c = torch.sqrt(oa * oa + ob * ob + 1e-6)
    out = []
    for j in range(HUES):
        t = math.pi / 3 * j
        p = F.relu(oa * math.cos(t) + ob * math.sin(t))
        out.append(p * p / c)
    return torch.cat(out, 1)


def features(x):
    """x: (N,3,H,W) in [0,1] -> (N,K,H,W)."""
    ones = torch.ones_like(x[:, :1])
    return torch.cat([x, blur(x, SIGMAS[0]), blur(x, SIGMAS[1]), ones, hue_features(x)], 1)


def lum_weights(x):
    """Hat weights of the L luminance bins: (N,L,H,W), at most two non-zero per pixel."""
    y = luminance(x) * (LBINS - 1)
    centres = torch.arange(LBINS, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return F.relu(1 - (y - centres).abs())


def slice_apply(x, grid, feats=None):
    """x: (N,3,H,W); grid: (N, L*3*K, GRID, GRID) coefficient changes -> (N,3,H,W).

    out_c = x_c + sum_l w_l(lum) * sum_k up(grid)[l,c,k] * f_k, where up() is bilinear
    (align_corners=False) from the grid's cells to the frame."""
    n, _, h, w = x.shape
    f = features(x) if feats is None else feats
    wl = lum_weights(x)
    out = x
    g = grid.view(n, LBINS, 3 * K, GRID, GRID)
    for l in range(LBINS):
        up = F.interpolate(g[:, l], size=(h, w), mode="bilinear", align_corners=False)
        up = up.view(n, 3, K, h, w)
        out = out + wl[:, l:l + 1] * (up * f.unsqueeze(1)).sum(2)
    return out


def slice_points(x, f, grid, pts):
    """slice_apply evaluated only at pts (N,P,2) normalised (x, y) in [-1,1], for training:
    the loss on a random pixel subset is unbiased and skips full-resolution backward passes.
    x: (N,3,P) colours, f: (N,K,P) features at those pixels."""
    n, _, p = x.shape
    g = F.grid_sample(grid, pts.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False)
    g = g.view(n, LBINS, 3, K, p)
    y = (LUMA[0] * x[:, 0] + LUMA[1] * x[:, 1] + LUMA[2] * x[:, 2]).clamp(0, 1) * (LBINS - 1)
    centres = torch.arange(LBINS, dtype=x.dtype, device=x.device).view(1, -1, 1)
    wl = F.relu(1 - (y.unsqueeze(1) - centres).abs())  # (N,L,P)
    coef = (g * wl.view(n, LBINS, 1, 1, p)).sum(1)  # (N,3,K,P)
    return x + (coef * f.unsqueeze(1)).sum(2)


def random_points(n, h, w, p, gen=None):
    """p random pixel centres per image: integer (row, col) and normalised grid_sample coords."""
    idx = torch.randint(0, h * w, (n, p), generator=gen)
    r, c = idx // w, idx % w
    pts = torch.stack([(2 * c.float() + 1) / w - 1, (2 * r.float() + 1) / h - 1], -1)
    return idx, pts


def gather(t, idx):
    """t: (N,C,H,W), idx: (N,P) flat pixel indices -> (N,C,P)."""
    n, c = t.shape[:2]
    return t.reshape(n, c, -1).gather(2, idx.unsqueeze(1).expand(n, c, idx.shape[1]))


def thumbnail(x):
    return F.adaptive_avg_pool2d(x, (THUMB, THUMB))


def centre_patch(x):
    h, w = x.shape[-2:]
    t, l = (h - PATCH) // 2, (w - PATCH) // 2
    return x[..., t:t + PATCH, l:l + PATCH]


# ---------------------------------------------------------------- backbone (low-res CNN)

def lora_conv(x, w, bias, a, b, stride, pad):
    """Per-sample LoRA conv: weight_i = w + b_i @ a_i, run as one grouped conv over the batch."""
    n = x.shape[0]
    cout, cin, k, _ = w.shape
    dw = torch.bmm(b, a).view(n, cout, cin, k, k)
    weff = (w.unsqueeze(0) + dw).reshape(n * cout, cin, k, k)
    y = F.conv2d(x.reshape(1, n * cin, *x.shape[2:]), weff, None, stride, pad, groups=n)
    y = y.view(n, cout, *y.shape[2:])
    return y + bias.view(1, -1, 1, 1)


class Backbone(nn.Module):
    """Thumbnail of B + template -> coefficient-change grid. Frozen after training."""

    def __init__(self):
        super().__init__()
        self.w = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for name, cin, cout, k, _ in CONVS:
            wt = torch.empty(cout, cin, k, k)
            nn.init.kaiming_uniform_(wt, a=math.sqrt(5))
            self.w[name] = nn.Parameter(wt)
            self.bias[name] = nn.Parameter(torch.zeros(cout))
        # zero base weights: the grid is all LoRA, so a zero template is an exact identity
        self.register_buffer("w_final", torch.zeros(GRID_CH, FINAL_IN, 1, 1))

    def forward(self, thumb, template):
        p = split_template(template)
        x = thumb
        feats = {}
        for name, cin, cout, k, s in CONVS[:5]:
            x = F.relu(lora_conv(x, self.w[name], self.bias[name], p[name + ".a"], p[name + ".b"], s, k // 2))
            feats[name] = x
        g = F.adaptive_avg_pool2d(feats["c4"], 1)
        g = lora_conv(g, self.w["g1"], self.bias["g1"], p["g1.a"], p["g1.b"], 1, 0)
        h = F.relu(x + g)
        h = torch.cat([h, torch.ones_like(h[:, :1])], 1)
        zb = torch.zeros(GRID_CH, device=h.device, dtype=h.dtype)
        grid = lora_conv(h, self.w_final, zb, p["final.a"], p["final.b"], 1, 0)
        return grid + p["offset"].view(-1, GRID_CH, 1, 1)


def apply_g(backbone, template, b):
    """G(template, B) on full-resolution B (N,3,H,W)."""
    return slice_apply(b, backbone(thumbnail(b), template))


def apply_g_points(backbone, template, b, feats, idx, pts):
    """G(template, B) at sampled pixels only; feats = features(b), computed once without grad."""
    return slice_points(gather(b, idx), gather(feats, idx), backbone(thumbnail(b), template), pts)


# ---------------------------------------------------------------- hypernetwork

def conv_block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


def pair_stats(a, a2):
    """Alignment-free statistics of a thumbnail pair: per-luminance-bin and per-hue-sector means
    of A and A' (binned by A), global mean and std of both. (N, S)."""
    wl = lum_weights(a)  # (N,L,h,w)
    den = wl.sum((2, 3)) + 1e-3
    out = []
    for img in (a, a2):
        m = torch.einsum("nlhw,nchw->nlc", wl, img) / den.unsqueeze(-1)
        out.append(m.flatten(1))
    hf = hue_features(a)
    hden = hf.sum((2, 3)) + 1e-3
    for img in (a, a2):
        m = torch.einsum("nlhw,nchw->nlc", hf, img) / hden.unsqueeze(-1)
        out.append(m.flatten(1))
    for img in (a, a2):
        out.append(img.mean((2, 3)))
        out.append(img.std((2, 3)))
    out.append(den / (a.shape[2] * a.shape[3]))
    return torch.cat(out, 1)


STATS = 2 * LBINS * 3 + 2 * HUES * 3 + 4 * 3 + LBINS


def detail_stats(p):
    """Band energies of a native-resolution patch at three scales, per channel. (N, 9)."""
    out = []
    for s in (0.8, 1.6, 3.2):
        out.append((p - blur(p, s)).abs().mean((2, 3)))
    return torch.cat(out, 1)


class HyperNet(nn.Module):
    def __init__(self, code=96):
        super().__init__()
        self.thumb_enc = nn.Sequential(conv_block(9, 32, 2), conv_block(32, 48, 2), conv_block(48, 64, 2),
                                       conv_block(64, 96, 2))
        self.patch_enc = nn.Sequential(conv_block(9, 24, 2), conv_block(24, 32, 2), conv_block(32, 48, 2))
        nin = 2 * 96 + 2 * 48 + STATS + 18
        self.mlp = nn.Sequential(nn.Linear(nin, 256), nn.ReLU(), nn.Linear(256, code), nn.ReLU())
        self.heads = nn.ModuleDict()
        for name, shape in layout():
            lin = nn.Linear(code, math.prod(shape))
            if not name.endswith(".a"):
                # B factors (and the global offset) start at zero, so the template starts at 0
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            else:
                nn.init.normal_(lin.weight, std=0.3 / math.sqrt(code))
                nn.init.normal_(lin.bias, std=0.3 / math.sqrt(shape[1]))
            self.heads[name.replace(".", "_")] = lin

    def forward(self, a, a2, pa, pa2):
        """a, a2: thumbnails (N,3,64,64); pa, pa2: native-resolution centre patches (N,3,64,64)."""
        t = self.thumb_enc(torch.cat([a, a2, a2 - a], 1))
        p = self.patch_enc(torch.cat([pa, pa2, pa2 - pa], 1))
        z = torch.cat([t.mean((2, 3)), t.amax((2, 3)), p.mean((2, 3)), p.amax((2, 3)), pair_stats(a, a2),
                       detail_stats(pa), detail_stats(pa2)], 1)
        z = self.mlp(z)
        return torch.cat([self.heads[name.replace(".", "_")](z) for name, _ in layout()], 1)


def hyper_inputs(a, a2):
    return thumbnail(a), thumbnail(a2), centre_patch(a), centre_patch(a2)


def flops_backbone():
    """Multiply-adds x2 of the low-resolution CNN (independent of frame size)."""
    f, s = 0, THUMB
    for name, cin, cout, k, st in CONVS[:5]:
        s = s // st
        f += 2 * s * s * cin * cout * k * k
    f += 2 * 64 * 64
    f += 2 * GRID * GRID * FINAL_IN * GRID_CH
    return f


def flops_per_pixel():
    """Full-resolution work per output pixel: filter bank + slicing (see src/apply/)."""
    taps = sum(2 * (2 * int(math.ceil(3 * s)) + 1) for s in SIGMAS)  # separable, per channel
    blur_f = 3 * taps * 2
    hue_f = 6 * 6 + 10
    slicing = LBINS * 0 + 2 * (4 * 3 * K * 2) + 2 * 3 * K * 2  # 2 bins x bilinear 4 taps x 48 coeffs, then 48 MACs
    return blur_f + hue_f + slicing
