"""The model card's takumi columns measured through the release binary (not the Python mirror).

    models/train/.venv/bin/python models/train/eval_cli.py --bin target/release/takumi \
        [--per-family 5] [--workers 2] [--sheets models/card] [--json models/eval_cli.json] \
        [--limit N] [--families a,b] [--moved-per-family 2] [--threads T] [--fake]

Held-out quads (A, A', B, B') are built exactly as eval.py's quads(). For each quad the script
writes 8-bit PNGs and runs `takumi learn` on (A, A'), `takumi apply` on B (scored against B') and
`takumi apply --reverse` on the true B' (scored against B: the undo; beside it, how much of B'
the edit clipped, and for the families with a closed-form inverse, that inverse with the true
parameters: the undo no method can beat). The classical fits of
eval.py (affine, 17^3 LUT, filter bank) are fitted on (A, A') and applied to B, and their output
is scored as the 8-bit image a tool would write, like takumi's PNG and the truth B' (in float
they scored up to 1.3 dB higher on the colour-matrix families, against an 8-bit truth; session 8).
Scores: PSNR and CIEDE2000 (mean and 95th percentile over pixels).

A second, "moved" set checks registration: for each sampled edit the after shot is the same
photo region rotated by U(-5, 5) deg, scaled by U(0.92, 1.08) and shifted by up to 10 % of the
side (bilinear on a 1.5x larger crop around the same centre, then centre-cropped, so there are no
empty borders); takumi learned from the moved pair is compared with takumi learned from the
aligned pair of the same edit, both scored on the same B.

--fake replaces the binary by the bank fit (tests the script only). A failing binary call is
recorded in the json with its stderr and counted; it does not stop the run."""
import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from skimage.color import deltaE_ciede2000, rgb2lab

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import edits  # noqa: E402
import eval as ev  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
W, H = ev.W, ev.H
CLASSICAL = ("affine", "lut", "bank")
METHODS = ("identity",) + CLASSICAL + ("takumi",)
# edits that throw information away: an exact undo is impossible (marked in the undo table)
LOSSY = {"sepia", "mono_tint", "blur", "denoise"}
# an edit that pushes more than this share of B′ out of [0, 1] has lost what the clamp took
CLIPPED = 0.001
SHEET_ROWS, MOVED_SHEET_ROWS = 2, 4
BIG = 1.5  # the moved set's larger crop, as a multiple of the 320x240 frame
# A camera model for the moved set: both shots are the area average of the scene at SENSOR x the
# frame's resolution, so the moved shot is not blurrier than the aligned one (a bilinear resample
# at frame resolution would add a blur no camera adds, and charge it to registration).
SENSOR = 4


# ------------------------------------------------------------------ images and scores

def to_u8(x):
    """(3,H,W) float in [0,1] -> (H,W,3) uint8."""
    return (np.clip(x, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)


def from_u8(u):
    return u.transpose(2, 0, 1).astype(np.float32) / 255


def as_8bit(x):
    """A fit's output as the 8-bit image it would be written as (what takumi's output is)."""
    return from_u8(to_u8(x))


def save_png(x, path):
    Image.fromarray(to_u8(x)).save(path)


def load_png(path):
    return from_u8(np.asarray(Image.open(path).convert("RGB")))


def delta_e(x, y):
    """CIEDE2000 between two sRGB (3,H,W) images: (mean, 95th percentile)."""
    lx = rgb2lab(np.clip(x, 0, 1).transpose(1, 2, 0).astype(np.float64))
    ly = rgb2lab(np.clip(y, 0, 1).transpose(1, 2, 0).astype(np.float64))
    d = deltaE_ciede2000(lx, ly)
    return float(d.mean()), float(np.percentile(d, 95))


def jsonable(e):
    if isinstance(e, list):
        return [jsonable(x) for x in e]
    if isinstance(e, tuple):
        return {"family": e[0], "params": e[1]}
    return e


# ------------------------------------------------------------------ the moved (misaligned) set

def big_crop(img, rng):
    """A (BIG*H, BIG*W) region of the photo at a random scale (as eval.crop, upsampling photos that
    are too small), from which both the aligned and the moved 320x240 frames are cut."""
    bh, bw = round(H * BIG), round(W * BIG)
    _, h, w = img.shape
    lo = max(bh / h, bw / w)
    s = rng.uniform(lo, max(lo, 1.0))
    nh, nw = max(bh, round(h * s)), max(bw, round(w * s))
    t, l = rng.randint(0, nh - bh), rng.randint(0, nw - bw)
    # the scene at SENSOR x resolution (see SENSOR)
    x = F.interpolate(img[None], size=(nh * SENSOR, nw * SENSOR), mode="bicubic", align_corners=False)
    k = SENSOR
    return x[:, :, t * k:(t + bh) * k, l * k:(l + bw) * k].clamp(0, 1)


def centre(big):
    _, _, bh, bw = big.shape
    k = SENSOR
    t, l = (bh // k - H) // 2, (bw // k - W) // 2
    return F.avg_pool2d(big[:, :, t * k:(t + H) * k, l * k:(l + W) * k], k)


def moved_frame(big, angle_deg, scale, tx, ty):
    """The centre 320x240 frame after the part moved: output pixel p (centred, px) shows source
    point R(angle) p / scale + (tx, ty) of the big crop; done in pixel units, so it is a true
    rotation whatever the aspect ratio."""
    _, _, bh, bw = big.shape
    bh, bw = bh / SENSOR, bw / SENSOR  # in frame pixels, the unit of tx and ty
    a = math.radians(angle_deg)
    m = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / scale
    d_out, d_in = np.diag([W / 2, H / 2]), np.diag([bw / 2, bh / 2])
    lin = np.linalg.inv(d_in) @ m @ d_out
    off = np.linalg.inv(d_in) @ np.array([tx, ty])
    theta = torch.tensor(np.concatenate([lin, off[:, None]], 1)[None], dtype=big.dtype)
    k = SENSOR
    grid = F.affine_grid(theta, [1, 3, H * k, W * k], align_corners=False)
    assert float(grid.abs().max()) < 1, "moved frame leaves the big crop"
    fine = F.grid_sample(big, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(fine, k)


def moved_set(photos, per_family, seed=23):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    q8 = lambda x: to_u8(x[0].clamp(0, 1).numpy())  # noqa: E731
    out = []
    for f in edits.FAMILIES:
        for _ in range(per_family):
            i, j = rng.sample(range(len(photos)), 2)
            e = edits.sample(rng, f)
            big = big_crop(photos[i], rng)
            ang, sc = rng.uniform(-5, 5), rng.uniform(0.92, 1.08)
            tx, ty = rng.uniform(-0.1, 0.1) * W, rng.uniform(-0.1, 0.1) * H
            a, a2 = edits.make_pair(centre(big), e, gen)
            _, a2m = edits.make_pair(moved_frame(big, ang, sc, tx, ty), e, gen)
            b, b2 = edits.make_pair(ev.crop(photos[j], rng), e, gen)
            out.append(dict(kind="moved", set=f, edit=e, a=q8(a), a2=q8(a2), a2m=q8(a2m), b=q8(b), b2=q8(b2),
                            motion=dict(angle_deg=ang, scale=sc, dx_px=tx, dy_px=ty)))
    return out


# ------------------------------------------------------------------ the binary

_W = {}


def init_worker(args):
    torch.set_num_threads(1)
    _W["args"] = args
    _W["tmp"] = tempfile.mkdtemp(prefix="w", dir=args.tmp)
    _W["store"] = os.path.join(_W["tmp"], "store")
    os.makedirs(_W["store"], exist_ok=True)
    _W["cfg"] = None
    if args.threads:
        _W["cfg"] = os.path.join(_W["tmp"], "takumi.toml")
        with open(_W["cfg"], "w") as f:
            f.write(f"[engine]\nthreads = {args.threads}\n")


def takumi(*argv, timeout=600):
    """Runs the binary from the repo root; returns a record (cmd, rc, stdout, stderr, seconds)."""
    a = _W["args"]
    cmd = [a.bin, "--store", _W["store"], "--models", a.models]
    if _W["cfg"]:
        cmd += ["--config", _W["cfg"]]
    cmd += list(argv)
    t0 = time.time()
    for attempt in range(2):  # a call killed by a signal (not our timeout) is tried once more
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            rc, so, se = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, so, se = -999, e.stdout or "", f"timeout after {timeout} s"
            so = so.decode() if isinstance(so, bytes) else so
        except OSError as e:
            rc, so, se = -1, "", f"cannot run {a.bin}: {e}"
        if not (rc < 0 and rc not in (-1, -999)):
            break
        se = f"(killed by signal {-rc}; tried again) " + se
    return dict(cmd=" ".join(argv[:1]), rc=rc, stdout=so.strip(), stderr=se.strip()[-2000:],
                s=round(time.time() - t0, 2))


NUM = r"([+-]?\d+(?:\.\d+)?)"


def parse_learn(line):
    c = dict(raw=line)
    m = re.search(r"in " + NUM + r" ms", line)
    c["learn_ms"] = float(m.group(1)) if m else None
    m = re.search(r"validated gain " + NUM + r" dB", line)
    if m:
        c["status"], c["validated_gain_db"] = "validated", float(m.group(1))
    elif "not validated" in line:
        c["status"], c["validated_gain_db"] = "not validated", None
    elif re.search(r"\bidentity\b", line):
        m = re.search(r"identity[^(]*\(" + NUM + r" dB\)", line)
        c["status"], c["validated_gain_db"] = "identity", (float(m.group(1)) if m else 0.0)
    else:
        c["status"], c["validated_gain_db"] = "unknown", None
    return c


def parse_show(text):
    c = dict(raw=text, registration=[])
    m = re.search(r"hypernet " + NUM + r" dB, tone " + NUM + r" dB, bank " + NUM + r" dB, position " + NUM + " dB", text)
    if m:
        c["parts_db"] = dict(zip(("hypernet", "tone", "bank", "position"), map(float, m.groups())))
        b = re.search(r"the bank's blurs " + NUM + " dB", text)
        if b:
            c["parts_db"]["blurs"] = float(b.group(1))
    m = re.search(r"self-PSNR\s+" + NUM + " dB", text)
    c["self_psnr_db"] = float(m.group(1)) if m else None
    m = re.search(r"closed-form\s+(used|not used)", text)
    c["fit_used"] = (m.group(1) == "used") if m else None
    m = re.search(r"^undo\s+" + NUM + " dB", text, re.M)
    c["reverse_gain_db"] = float(m.group(1)) if m else None
    m = re.search(r"^validated\s+(.*)$", text, re.M)
    c["validated_line"] = m.group(1) if m else None
    m = re.search(r"^apply\s+(.*)$", text, re.M)
    c["apply_passes"] = m.group(1) if m else None
    for m in re.finditer(r"^register (\d+)\s+(ok|FAILED) shift \(" + NUM + ", " + NUM + r"\) px, rotation " + NUM
                         + r" deg, scale x" + NUM + r", residual " + NUM + " px", text, re.M):
        i, ok, dx, dy, ang, sc, res = m.groups()
        c["registration"].append(dict(pair=int(i), registered=ok == "ok", dx=float(dx), dy=float(dy),
                                      angle_deg=float(ang), scale=float(sc), residual_px=float(res)))
    return c


def run_binary(name, A, A2, B, B2, reverse=True):
    """learn on (A, A2); apply to B; apply --reverse to B2. Returns (out, back, record)."""
    d = os.path.join(_W["tmp"], name)
    os.makedirs(d, exist_ok=True)
    for x, f in ((A, "A.png"), (A2, "A2.png"), (B, "B.png"), (B2, "B2.png")):
        save_png(x, os.path.join(d, f))
    p = lambda f: os.path.join(d, f)  # noqa: E731
    rec, calls = {}, []
    out = back = None
    lr = takumi("learn", "--before", p("A.png"), "--after", p("A2.png"), "--name", name)
    calls.append(lr)
    if lr["rc"] == 0:
        rec["card"] = parse_learn(lr["stdout"].splitlines()[-1] if lr["stdout"] else "")
        if lr["stderr"]:
            rec["learn_stderr"] = lr["stderr"]
        sr = takumi("templates", "show", name)
        calls.append(sr)
        if sr["rc"] == 0:
            rec["show"] = parse_show(sr["stdout"])
        ar = takumi("apply", "--template", name, "--input", p("B.png"), "--output", p("out.png"))
        calls.append(ar)
        if ar["rc"] == 0:
            rec["apply_line"] = ar["stdout"]
            out = load_png(p("out.png"))
        if reverse:
            rr = takumi("apply", "--template", name, "--input", p("B2.png"), "--output", p("back.png"), "--reverse")
            calls.append(rr)
            if rr["rc"] == 0:
                rec["reverse_line"] = rr["stdout"]
                back = load_png(p("back.png"))
        takumi("templates", "rm", name)
    for img in (out, back):
        if img is not None and img.shape != B.shape:
            rec.setdefault("errors", []).append(f"output shape {img.shape} != {B.shape}")
    rec["errors"] = rec.get("errors", []) + [dict(cmd=c["cmd"], rc=c["rc"], stderr=c["stderr"]) for c in calls
                                             if c["rc"] != 0]
    rec["seconds"] = round(sum(c["s"] for c in calls), 2)
    shutil.rmtree(d, ignore_errors=True)
    return out, back, rec


def fake_binary(A, A2, B, B2, reverse=True):
    out = as_8bit(ev.fit_bank(A, A2)(B))
    back = as_8bit(ev.fit_bank(A2, A)(B2)) if reverse else None
    return out, back, dict(card=dict(status="fake", validated_gain_db=None), show=dict(registration=[]),
                           errors=[], seconds=0.0)


def learn_apply(name, A, A2, B, B2, reverse=True):
    if _W["args"].fake:
        return fake_binary(A, A2, B, B2, reverse)
    return run_binary(name, A, A2, B, B2, reverse)


def exact_undo(edit, B2):
    """The edit's own inverse with its true parameters, on the 8-bit B′ (None where the family
    has no closed-form inverse): what any undo can reach once clipping and 8 bits have taken
    their share."""
    if isinstance(edit, list):
        return None
    f, p = edit
    x = torch.from_numpy(B2[None].copy())
    t = lambda v: torch.tensor(v, dtype=x.dtype).view(1, 3, 1, 1)  # noqa: E731
    if f == "exposure_wb":
        y = edits.lin_to_srgb(edits.srgb_to_lin(x) / (2 ** p["ev"]) / t(p["wb"]))
    elif f == "gamma":
        y = x.clamp(0, 1) ** (1 / p["g"])
    elif f == "lift_gain":
        y = (x - t(p["lift"])) / (t(p["gain"]) - t(p["lift"]))
    elif f == "saturation":
        lum = edits.luminance(x)
        y = lum + (x - lum) / p["s"]
    elif f in ("vignette_add", "vignette_remove"):
        gain = 1 - p["strength"] * edits.radial(x) ** p["power"]
        y = x / gain if f == "vignette_add" else x * gain
    else:
        return None
    return as_8bit(y[0].numpy())


# ------------------------------------------------------------------ one job

def score_main(q):
    A, A2, B, B2 = (from_u8(q[k]) for k in ("a", "a2", "b", "b2"))
    r = dict(kind="main", idx=q["idx"], set=q["set"], edit=jsonable(q["edit"]))
    res = {"identity": B}
    for name, fit in (("affine", ev.fit_affine), ("lut", ev.fit_lut), ("bank", ev.fit_bank)):
        res[name] = as_8bit(fit(A, A2)(B))
    out, back, rec = learn_apply(f"q{q['idx']}", A, A2, B, B2)
    r.update(rec)
    if out is not None:
        res["takumi"] = out
    for m in METHODS:
        if m in res:
            r[m] = ev.psnr(res[m], B2)
            r[f"de_{m}"], r[f"de95_{m}"] = delta_e(res[m], B2)
        else:
            r[m] = None
    r["undo"] = ev.psnr(back, B) if back is not None else None
    r["undo_nothing"] = ev.psnr(B2, B)
    r["b_clipped"] = q.get("b_clipped")
    exact = exact_undo(q["edit"], B2)
    r["undo_exact"] = ev.psnr(exact, B) if exact is not None else None
    imgs = None
    if q.get("sheet"):
        imgs = {m: to_u8(res[m]) for m in CLASSICAL + ("takumi",) if m in res}
    return r, imgs


def score_moved(q):
    A, A2, A2m, B, B2 = (from_u8(q[k]) for k in ("a", "a2", "a2m", "b", "b2"))
    r = dict(kind="moved", idx=q["idx"], set=q["set"], edit=jsonable(q["edit"]), motion=q["motion"])
    imgs = {}
    for tag, after in (("aligned", A2), ("moved", A2m)):
        out, _, rec = learn_apply(f"m{q['idx']}{tag[0]}", A, after, B, B2, reverse=False)
        r[tag] = rec
        r[f"takumi_{tag}"] = ev.psnr(out, B2) if out is not None else None
        r[f"bank_{tag}"] = ev.psnr(as_8bit(ev.fit_bank(A, after)(B)), B2)
        if out is not None and q.get("sheet"):
            imgs[tag] = to_u8(out)
    r["identity"] = ev.psnr(B, B2)
    regs = r["moved"].get("show", {}).get("registration", []) if isinstance(r["moved"], dict) else []
    if regs:  # the binary may report the motion or its inverse: the smaller error of the two
        g, mo = regs[0], q["motion"]
        r["reg_angle_err_deg"] = min(abs(g["angle_deg"] - mo["angle_deg"]), abs(g["angle_deg"] + mo["angle_deg"]))
        r["reg_scale_err"] = min(abs(g["scale"] - mo["scale"]), abs(g["scale"] - 1 / mo["scale"]))
    a, m = r["takumi_aligned"], r["takumi_moved"]
    r["diff"] = m - a if a is not None and m is not None else None
    return r, (imgs if q.get("sheet") else None)


def job(q):
    try:
        return (score_main if q["kind"] == "main" else score_moved)(q)
    except Exception as e:  # a broken quad is a row with its error, not a dead run
        import traceback
        return dict(kind=q["kind"], idx=q["idx"], set=q["set"], edit=jsonable(q["edit"]),
                    errors=[dict(cmd="python", rc=-1, stderr=traceback.format_exc()[-2000:])],
                    crashed=repr(e)), None


# ------------------------------------------------------------------ report

def mean(v):
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else float("nan")


def f2(x, sign=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def best_classical(rs):
    m = {c: mean([r.get(c) for r in rs]) for c in CLASSICAL}
    return max(m, key=lambda c: -1e9 if math.isnan(m[c]) else m[c])


def report(rows, moved, failures, args):
    main = [r for r in rows if r.get("kind") == "main"]
    sets = list(dict.fromkeys(r["set"] for r in main))
    fams = [s for s in sets if s in edits.FAMILIES]
    P = print
    P(f"# takumi through the binary ({'FAKE: bank fit stands in for takumi' if args.fake else args.bin + ', ' + args.bin_id})\n")
    P(f"{len(main)} quads at {W}x{H} from held-out photos (eval.py's quads, per family {args.per_family}), "
      f"{len(moved)} moved-pair edits; binary calls failed: {failures['calls']}, quads without a takumi "
      f"result: {failures['quads']}\n")

    P("## Per set (mean PSNR against B′, dB; ΔE00 against B′)\n")
    P("| set | n | identity | affine | lut | bank | takumi | best classical | takumi − best | takumi − identity "
      "| ΔE00 takumi mean / p95 | ΔE00 best mean / p95 |")
    P("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summ = {}
    for s in sets:
        rs = [r for r in main if r["set"] == s]
        m = {c: mean([r.get(c) for r in rs]) for c in METHODS}
        b = best_classical(rs)
        d = dict(m=m, best=b, margin=m["takumi"] - m[b], gain=m["takumi"] - m["identity"])
        summ[s] = d
        de = lambda c: f"{f2(mean([r.get(f'de_{c}') for r in rs]))} / {f2(mean([r.get(f'de95_{c}') for r in rs]))}"  # noqa: E731
        P(f"| {s} | {len(rs)} | " + " | ".join(f2(m[c]) for c in METHODS)
          + f" | {b} {f2(m[b])} | {f2(d['margin'], True)} | {f2(d['gain'], True)} | {de('takumi')} | {de(b)} |")
    if main:
        m = {c: mean([r.get(c) for r in main]) for c in METHODS}
        P(f"| all | {len(main)} | " + " | ".join(f2(m[c]) for c in METHODS) + " | | | "
          f"{f2(m['takumi'] - m['identity'], True)} | {f2(mean([r.get('de_takumi') for r in main]))} / "
          f"{f2(mean([r.get('de95_takumi') for r in main]))} | |")
    P()

    P("## Targets\n")
    below_id = [s for s in fams if summ[s]["gain"] < 0]
    below_best = [s for s in fams if summ[s]["margin"] < -1]
    fm = mean([summ[s]["margin"] for s in fams])
    txt_id = ", ".join("%s (%+.2f)" % (s, summ[s]["gain"]) for s in below_id) or "none"
    txt_best = ", ".join("%s (%+.2f vs %s)" % (s, summ[s]["margin"], summ[s]["best"]) for s in below_best) or "none"
    P(f"* families below identity (takumi worse than doing nothing): {txt_id} (target: none)")
    P(f"* families more than 1 dB below the best classical fit: {txt_best} (target: none)")
    P(f"* mean over the {len(fams)} families of takumi − best classical: {f2(fm, True)} dB")
    for s in ("misaligned", "chain"):
        if s in summ:
            P(f"* {s} set (eval.py's, not a family): takumi − best classical {f2(summ[s]['margin'], True)} dB, "
              f"takumi − identity {f2(summ[s]['gain'], True)} dB")
    diffs = [r["diff"] for r in moved if r.get("diff") is not None]
    if diffs:
        P(f"* moved pair (rotation ±5°, scale 0.92–1.08, shift ±10 %) − aligned pair, takumi on B: mean "
          f"{np.mean(diffs):+.2f} dB, worst {min(diffs):+.2f} dB over {len(diffs)} edits (target: both ≥ −1)")
    passes = [(r.get("show") or {}).get("apply_passes") for r in main]
    passes = [p for p in passes if p]
    if passes:
        alone = sum(1 for p in passes if p.startswith("G alone"))
        named = ("sigma 1 blur", "sigma 2.5 blur", "sigma 12 blur", "position terms")
        each = ", ".join(f"{sum(1 for p in passes if n in p)} the {n}" for n in named)
        P(f"* what `apply` runs for the {len(passes)} templates (`templates show`; issue 9: apply time unchanged "
          f"within 10 %): G alone, the residual stage folded into its grid or absent, for {alone}; after G, {each}")
    blur_gains = [((r.get("show") or {}).get("parts_db") or {}).get("blurs") for r in main]
    kept = [g for g in blur_gains if g]
    if any(g is not None for g in blur_gains):
        P(f"* the bank's blur features (kept where they buy ≥ 0.5 dB, 1.4 dB on a resampled pair): kept by "
          f"{len(kept)} of {len(blur_gains)} templates, validated gain median "
          f"{f2(float(np.median(kept)) if kept else None)} dB")
    P()

    if moved:
        P("## Moved pairs (same edit, same B; learned from the aligned pair and from the moved pair)\n")
        P("| family | n | identity | takumi aligned | takumi moved | moved − aligned (mean / worst) | bank aligned "
          "| bank moved | moved pairs registered | registration error: angle deg / scale | moved status (validated / identity / not validated) |")
        P("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in dict.fromkeys(r["set"] for r in moved):
            rs = [r for r in moved if r["set"] == s]
            ds = [r["diff"] for r in rs if r.get("diff") is not None]
            regs = [all(g["registered"] for g in r["moved"]["show"]["registration"]) for r in rs
                    if r.get("moved", {}).get("show", {}).get("registration")]
            st = [r.get("moved", {}).get("card", {}).get("status") for r in rs]
            P(f"| {s} | {len(rs)} | {f2(mean([r.get('identity') for r in rs]))} | "
              f"{f2(mean([r.get('takumi_aligned') for r in rs]))} | {f2(mean([r.get('takumi_moved') for r in rs]))} | "
              f"{f2(mean(ds), True)} / {f2(min(ds) if ds else None, True)} | {f2(mean([r.get('bank_aligned') for r in rs]))} | "
              f"{f2(mean([r.get('bank_moved') for r in rs]))} | {sum(regs)}/{len(regs)} | "
              f"{f2(mean([r.get('reg_angle_err_deg') for r in rs]))} / {f2(mean([r.get('reg_scale_err') for r in rs]))} | "
              f"{st.count('validated')} / {st.count('identity')} / {st.count('not validated')} |")
        P()

    P("## Undo (apply --reverse to the true B′, PSNR against B)\n")
    P(f"Beside every quad: whether the edit clipped B′ (pushed more than {CLIPPED:.1%} of its pixels out of "
      "[0, 1] by over half a level: what no undo gets back), the family means over the quads it did not "
      "clip, and where the family has a closed-form inverse, that inverse with the edit's true parameters "
      "on the 8-bit B′ (the exact undo).\n")
    P("| set | undo | doing nothing (B′ vs B) | forward (takumi) | undo ≥ forward − 3 | undo ≥ doing nothing "
      "| quads clipped | undo / forward, unclipped quads | ≥ forward − 3 there | exact undo | note |")
    P("|---|---|---|---|---|---|---|---|---|---|---|")
    viol, viol_kept = [], []
    for s in sets:
        rs = [r for r in main if r["set"] == s]
        u, n, fw = mean([r.get("undo") for r in rs]), mean([r.get("undo_nothing") for r in rs]), \
            mean([r.get("takumi") for r in rs])
        if math.isnan(u) or math.isnan(fw):
            P(f"| {s} | {f2(u)} | {f2(n)} | {f2(fw)} | – | – | – | – | – | – | no binary result |")
            continue
        ok1, ok2 = u >= fw - 3, u >= n
        worst_q = sum(1 for r in rs if r.get("undo") is not None and r["undo"] < r["undo_nothing"])
        note = "loses information" if s in LOSSY else ("may contain a lossy edit" if s == "chain" else "")
        if not (ok1 and ok2):
            viol.append((s, note))
        kept = [r for r in rs if (r.get("b_clipped") or 0) <= CLIPPED]
        uk, fk = mean([r.get("undo") for r in kept]), mean([r.get("takumi") for r in kept])
        ok3 = None if math.isnan(uk) or math.isnan(fk) else uk >= fk - 3
        if ok3 is False and s not in LOSSY:
            viol_kept.append(s)
        P(f"| {s} | {f2(u)} | {f2(n)} | {f2(fw)} | {'yes' if ok1 else '**no**'} | "
          f"{'yes' if ok2 else '**no**'} ({worst_q}/{len(rs)} quads below) | {len(rs) - len(kept)}/{len(rs)} | "
          f"{f2(uk)} / {f2(fk)} | {'–' if ok3 is None else ('yes' if ok3 else '**no**')} | "
          f"{f2(mean([r.get('undo_exact') for r in rs]))} | {note} |")
    P()
    P("violations of \"undo ≥ forward − 3 dB and never below doing nothing\" (family means): "
      + (", ".join(f"{s} ({n})" if n else s for s, n in viol) or "none"))
    P()
    P("\"undo ≥ forward − 3 dB\" on the quads the edit did not clip, outside the families that lose "
      "information: " + (", ".join(viol_kept) + " miss it" if viol_kept else "met everywhere"))
    P()

    P("## The card (learn's validation on the pair itself)\n")
    P("| set | n | mean validated gain (dB) | actual gain on B (takumi − identity) | identity templates "
      "| not validated | unregistered pair | closed-form used | apply flagged needs_review | mean learn ms |")
    P("|---|---|---|---|---|---|---|---|---|---|")
    for s in sets:
        rs = [r for r in main if r["set"] == s]
        cards = [r.get("card") or {} for r in rs]
        shows = [r.get("show") or {} for r in rs]
        st = [c.get("status") for c in cards]
        unreg = sum(1 for sh in shows if any(not g["registered"] for g in sh.get("registration", [])))
        fit = sum(1 for sh in shows if sh.get("fit_used"))
        P(f"| {s} | {len(rs)} | {f2(mean([c.get('validated_gain_db') for c in cards]), True)} | "
          f"{f2(summ[s]['gain'], True)} | {st.count('identity')} | {st.count('not validated')} | {unreg} | {fit} | "
          f"{sum(1 for r in rs if 'needs_review' in (r.get('apply_line') or ''))} | "
          f"{f2(mean([c.get('learn_ms') for c in cards]))} |")
    P()
    if failures["examples"]:
        P("## Failed binary calls (first few)\n")
        for e in failures["examples"][:5]:
            P(f"* {e}")
        P()
    return summ


# ------------------------------------------------------------------ contact sheets

def tile(u8, label):
    im = Image.fromarray(u8).convert("RGB")
    if im.size != (W, H):
        im = im.resize((W, H))
    d = ImageDraw.Draw(im)
    tw = int(d.textlength(label)) if hasattr(d, "textlength") else 6 * len(label)
    d.rectangle([0, 0, tw + 6, 13], fill=(0, 0, 0))
    d.text((3, 1), label, fill=(255, 255, 255))
    return im


def sheet(rows_of_tiles, title, path):
    cols = max(len(r) for r in rows_of_tiles)
    top = 16
    im = Image.new("RGB", (cols * W, top + len(rows_of_tiles) * H), (40, 40, 40))
    ImageDraw.Draw(im).text((4, 2), title, fill=(255, 255, 255))
    for i, r in enumerate(rows_of_tiles):
        for j, t in enumerate(r):
            im.paste(t, (j * W, top + i * H))
    # committed with the model card: half size and a 256-colour palette keep each sheet ~100 kB
    im = im.resize((im.width // 2, im.height // 2), Image.LANCZOS)
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(
        path, optimize=True)


def edit_str(e):
    if isinstance(e, list):
        return " + ".join(edit_str(x) for x in e)
    f, p = e["family"], e["params"]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, list):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return str(v)
    return f + "(" + ", ".join(f"{k}={fmt(v)}" for k, v in p.items()) + ")"


def write_sheets(d, qs, rows, imgs, mq, mrows, mimgs, summ):
    os.makedirs(d, exist_ok=True)
    written = []
    by_idx = {q["idx"]: q for q in qs}
    for s in dict.fromkeys(r["set"] for r in rows):
        best = summ[s]["best"]
        lines = []
        for r in [r for r in rows if r["set"] == s and r["idx"] in imgs][:SHEET_ROWS]:
            q, im = by_idx[r["idx"]], imgs[r["idx"]]
            ps = lambda m: f"{r[m]:.2f} dB" if r.get(m) is not None else "failed"  # noqa: E731
            t = [tile(q["a"], f"A  q{r['idx']}"), tile(q["a2"], "A' (edited)"), tile(q["b"], f"B  {ps('identity')}")]
            t.append(tile(im["takumi"], f"takumi {ps('takumi')}") if "takumi" in im else
                     tile(np.zeros((H, W, 3), np.uint8), "takumi failed"))
            t += [tile(im[best], f"{best} {ps(best)}"), tile(q["b2"], "truth B'")]
            lines.append(t)
        if lines:
            ex = [r for r in rows if r["set"] == s and r["idx"] in imgs][:SHEET_ROWS]
            title = f"{s}: " + " | ".join(edit_str(r["edit"]) for r in ex)
            p = os.path.join(d, f"{s}.png")
            sheet(lines, title[:200], p)
            written.append(p)
    by_m = {q["idx"]: q for q in mq}
    lines, names = [], []
    for r in [r for r in mrows if r["idx"] in mimgs][:MOVED_SHEET_ROWS]:
        q, im = by_m[r["idx"]], mimgs[r["idx"]]
        mo = r["motion"]
        ps = lambda k: f"{r[k]:.2f} dB" if r.get(k) is not None else "failed"  # noqa: E731
        blank = np.zeros((H, W, 3), np.uint8)
        lines.append([tile(q["a"], f"A  {r['set']}"),
                      tile(q["a2m"], f"A' moved {mo['angle_deg']:+.1f} deg x{mo['scale']:.3f} "
                                     f"({mo['dx_px']:+.0f},{mo['dy_px']:+.0f}) px"),
                      tile(q["b"], f"B  {ps('identity')}"),
                      tile(im.get("aligned", blank), f"takumi (aligned pair) {ps('takumi_aligned')}"),
                      tile(im.get("moved", blank), f"takumi (moved pair) {ps('takumi_moved')}"),
                      tile(q["b2"], "truth B'")])
        names.append(r["set"])
    if lines:
        p = os.path.join(d, "moved.png")
        sheet(lines, "moved pairs (rotation, scale, shift): " + ", ".join(names), p)
        written.append(p)
    return written


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "takumi"))
    ap.add_argument("--models", default=os.path.join(REPO, "models"), help="passed as takumi --models")
    ap.add_argument("--per-family", type=int, default=5)
    ap.add_argument("--moved-per-family", type=int, default=2, help="edits per family in the moved set (0: none)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="engine.threads for each binary call (default: cores / workers, at least 1)")
    ap.add_argument("--sheets", help="folder for one contact sheet PNG per set")
    ap.add_argument("--json", default=os.path.join(REPO, "models", "eval_cli.json"))
    ap.add_argument("--limit", type=int, help="only the first N quads (and the first N moved edits)")
    ap.add_argument("--families", help="comma-separated sets to keep (families, misaligned, chain)")
    ap.add_argument("--resume", action="store_true", help="reuse the jobs an interrupted run finished (JSON.partial/)")
    ap.add_argument("--fake", action="store_true", help="testing only: the bank fit stands in for the binary")
    a = ap.parse_args()
    a.bin = os.path.abspath(a.bin)
    a.models = os.path.abspath(a.models)
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 2) // max(1, a.workers))
    if not a.fake:
        if not os.access(a.bin, os.X_OK):
            data.fail(f"{a.bin}: no executable takumi binary (build it with cargo build --release)")
        chk = subprocess.run([a.bin, "--models", a.models, "learn", "--help"], cwd=REPO, capture_output=True, text=True)
        if chk.returncode != 0:
            data.fail(f"{a.bin} learn --help failed: {chk.stderr.strip()}")
    a.bin_id = "fake"
    if not a.fake:
        import hashlib
        st = os.stat(a.bin)
        a.bin_id = (f"sha256 {hashlib.sha256(open(a.bin, 'rb').read()).hexdigest()[:16]}, built "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(st.st_mtime))}")
    torch.set_num_threads(1)
    t0 = time.time()
    names, photos = data.load_split(test=True)
    qs = ev.quads(photos, a.per_family)
    for i, q in enumerate(qs):
        q.update(kind="main", idx=i)
        for k in ("a", "a2", "b", "b2"):
            q[k] = to_u8(q[k])
        q.pop("c"), q.pop("c2")
    mq = moved_set(photos, a.moved_per_family) if a.moved_per_family > 0 else []
    for i, q in enumerate(mq):
        q["idx"] = i
    if a.families:
        keep = set(a.families.split(","))
        unknown = keep - set(edits.FAMILIES) - {"misaligned", "chain"}
        if unknown:
            data.fail(f"--families: unknown {sorted(unknown)}; known: {edits.FAMILIES + ['misaligned', 'chain']}")
        qs = [q for q in qs if q["set"] in keep]
        mq = [q for q in mq if q["set"] in keep]
    if a.limit is not None:
        qs, mq = qs[:a.limit], mq[:a.limit]
    seen = {}
    for q in qs:
        seen[q["set"]] = seen.get(q["set"], 0) + 1
        q["sheet"] = bool(a.sheets) and seen[q["set"]] <= SHEET_ROWS
    for i, q in enumerate(mq):
        q["sheet"] = bool(a.sheets) and i < MOVED_SHEET_ROWS
    print(f"{len(qs)} quads and {len(mq)} moved edits from {len(photos)} held-out photos; "
          f"{a.workers} workers, {a.threads} engine thread(s) each", file=sys.stderr)
    jobs = mq + qs  # the moved set's jobs run two learns each: start them first
    rows, imgs, mrows, mimgs = [], {}, [], {}
    # every finished job is kept in JSON.partial/ until the run completes; --resume reuses them
    part = a.json + ".partial"
    if not a.resume:
        shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part, exist_ok=True)

    def keep(r, im):
        (rows if r["kind"] == "main" else mrows).append(r)
        if im is not None:
            (imgs if r["kind"] == "main" else mimgs)[r["idx"]] = im

    todo = []
    for q in jobs:
        f = os.path.join(part, f"{q['kind']}{q['idx']}.json")
        if a.resume and os.path.exists(f):
            with open(f) as fh:
                r = json.load(fh)
            npz = f[:-5] + ".npz"
            keep(r, dict(np.load(npz)) if os.path.exists(npz) else None)
        else:
            todo.append(q)
    if a.resume:
        print(f"resumed {len(jobs) - len(todo)} finished jobs from {part}", file=sys.stderr)
    a.tmp = tempfile.mkdtemp(prefix="tkeval_")
    done = 0
    with mp.get_context("fork").Pool(a.workers, initializer=init_worker, initargs=(a,)) as pool:
        for r, im in pool.imap_unordered(job, todo, chunksize=1):
            done += 1
            keep(r, im)
            f = os.path.join(part, f"{r['kind']}{r['idx']}.json")
            with open(f + ".tmp", "w") as fh:
                json.dump(r, fh)
            os.replace(f + ".tmp", f)
            if im is not None:
                np.savez(f[:-5] + ".npz", **im)
            if done % 10 == 0 or done == len(todo):
                print(f"  {done}/{len(todo)} done, {time.time() - t0:.0f} s", file=sys.stderr)
    shutil.rmtree(a.tmp, ignore_errors=True)
    rows.sort(key=lambda r: r["idx"])
    mrows.sort(key=lambda r: r["idx"])
    errs = [e for r in rows + mrows for e in r.get("errors", [])] + \
        [e for r in mrows for t in ("aligned", "moved") for e in r.get(t, {}).get("errors", [])]
    failures = dict(calls=len(errs), quads=sum(1 for r in rows if r.get("takumi") is None),
                    examples=[f"{e['cmd']} rc={e['rc']}: {e['stderr'][-300:]!r}" for e in errs])
    summ = report(rows, mrows, failures, a)
    el = time.time() - t0
    print(f"run time {el:.0f} s ({el / 60:.1f} min)")
    with open(a.json, "w") as f:
        json.dump(dict(bin=a.bin, bin_id=a.bin_id, fake=a.fake, per_family=a.per_family, seconds=round(el, 1), size=[W, H],
                       failed_calls=failures["calls"], quads=rows, moved=mrows), f, indent=1)
    written = write_sheets(a.sheets, qs, rows, imgs, mq, mrows, mimgs, summ) if a.sheets else []
    shutil.rmtree(part, ignore_errors=True)
    print(f"wrote {a.json}" + (f" and {len(written)} sheets in {a.sheets}" if written else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
