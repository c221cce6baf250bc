"""Loss curves of a training run, from its log.jsonl (written by train.py every 50 steps).

    python models/train/curves.py runs/long                 # table every 250 steps + runs/long/curves.png
    python models/train/curves.py runs/long/log.jsonl --every 500 --png /tmp/c.png

The table shows forward and reverse L1 (each averaged over the steps since the previous log line),
the identity L1 (|B - B'| of the last batch: the loss of doing nothing) and seconds per step.
The plot (PIL only, no matplotlib) draws fwd and rev L1 against step, with a light identity line.
"""
import argparse
import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont


def read_log(path):
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    if not os.path.exists(path):
        print(f"error: no log at {path}", file=sys.stderr)
        sys.exit(2)
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line still being written
    # a resumed run appends: keep the last record of each step
    by_step = {r["step"]: r for r in recs}
    return path, [by_step[s] for s in sorted(by_step)]


def table(recs, every, window):
    """One row per `every` steps; fwd/rev/identity averaged over the log records of the last
    `window` steps up to that row (identity is a single batch per record, so it is noisy)."""
    print(f"{'step':>7} {'fwd L1':>8} {'rev L1':>8} {'ident L1':>9} {'fwd/id':>7} {'s/step':>7} {'lr':>9}")
    # the first record past each multiple of `every` (a resumed or chained run's steps need not hit it)
    rows = [r for i, r in enumerate(recs) if r["step"] // every > (recs[i - 1]["step"] // every if i else 0)]
    if recs and (not rows or rows[-1]["step"] != recs[-1]["step"]):
        rows.append(recs[-1])
    for r in rows:
        win = [q for q in recs if r["step"] - window < q["step"] <= r["step"]] or [r]
        m = lambda k: sum(q[k] for q in win) / len(win)
        fwd, rev, ident = m("fwd"), m("rev"), m("identity_l1")
        print(f"{r['step']:>7} {fwd:>8.4f} {rev:>8.4f} {ident:>9.4f} {fwd / max(ident, 1e-9):>7.3f} "
              f"{m('s_per_step'):>7.2f} {r.get('lr', float('nan')):>9.2e}")


def smooth(ys, k):
    if k <= 1:
        return ys
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def font(size):
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if os.path.exists(p):
            return ImageFont.truetype(p, size)
    return ImageFont.load_default()


def plot(recs, out, title, smooth_k, w=900, h=540):
    steps = [r["step"] for r in recs]
    series = [("fwd L1", smooth([r["fwd"] for r in recs], smooth_k), (31, 119, 180), 2),
              ("rev L1", smooth([r["rev"] for r in recs], smooth_k), (214, 39, 40), 2),
              ("identity L1", smooth([r["identity_l1"] for r in recs], smooth_k), (170, 170, 170), 1)]
    L, R, T, B = 80, 20, 40, 60
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    f, fs = font(14), font(12)
    x0, x1 = min(steps), max(steps)
    if x1 == x0:
        x1 = x0 + 1
    ys = [y for _, s, _, _ in series[:2] for y in s]
    ys_all = ys + series[2][1]
    y0, y1 = 0.0, max(ys_all) * 1.05 if ys_all else 1.0
    # the identity line can dwarf the losses: cap the axis at 1.5x the largest loss
    y1 = min(y1, max(ys) * 1.5) if ys else y1
    px = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    py = lambda y: h - B - (min(y, y1) - y0) / (y1 - y0) * (h - T - B)
    # grid and ticks
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        yy = py(yv)
        d.line([(L, yy), (w - R, yy)], fill=(230, 230, 230))
        d.text((L - 8, yy), f"{yv:.3f}", fill="black", font=fs, anchor="rm")
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        xx = px(xv)
        d.line([(xx, T), (xx, h - B)], fill=(230, 230, 230))
        d.text((xx, h - B + 6), f"{int(round(xv))}", fill="black", font=fs, anchor="mt")
    d.rectangle([L, T, w - R, h - B], outline="black")
    d.text((w / 2, h - 18), "step", fill="black", font=f, anchor="mm")
    d.text((w / 2, 18), title, fill="black", font=f, anchor="mm")
    for name, s, col, width in series:
        pts = [(px(x), py(y)) for x, y in zip(steps, s)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=width)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=col)
    for i, (name, s, col, _) in enumerate(series):
        yy = T + 12 + 18 * i
        d.line([(w - R - 150, yy), (w - R - 120, yy)], fill=col, width=3)
        last = f" {s[-1]:.4f}" if s else ""
        if s and s[-1] > y1:
            last += " (off scale)"
        d.text((w - R - 112, yy), name + last, fill="black", font=fs, anchor="lm")
    im.save(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="a run folder (with log.jsonl) or a log.jsonl file")
    ap.add_argument("--every", type=int, default=250, help="table row every N steps")
    ap.add_argument("--window", type=int, default=0, help="average the table over this many steps (default: --every)")
    ap.add_argument("--png", help="plot path (default: curves.png next to the log)")
    ap.add_argument("--smooth", type=int, default=5, help="plot: moving average over this many log records")
    a = ap.parse_args()
    path, recs = read_log(a.log)
    if not recs:
        print(f"{path}: no records yet")
        return
    table(recs, a.every, a.window or a.every)
    out = a.png or os.path.join(os.path.dirname(path), "curves.png")
    plot(recs, out, f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}: L1 vs step", a.smooth)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
