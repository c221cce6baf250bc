"""What the filter bank's blur features gain from resampling alone: the calibration of `learn`'s
RESAMPLED_BLUR_GAIN_DB (src/engine/fit.rs).

    models/train/.venv/bin/python models/train/calibrate_resampled.py --bin target/release/takumi \
        [--pairs 40] [--seed 5]

Moved pairs are drawn as eval_cli.py's moved set draws them (the camera model, rotation up to
5 deg, scale 0.92-1.08, shift up to 10 %), from the training photos (never the card's held-out
ones), with edits of the colour families only: edits with no spatial part, where whatever the
blur features gain on the registered pair is the two shots' sampling and the warp, not the edit.
`takumi learn` logs that gain per direction (TAKUMI_LOG=debug); the script prints its
distribution. The constant is its 95th percentile, rounded up to a tenth of a dB."""
import argparse
import os
import random
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import edits  # noqa: E402
import eval_cli as ec  # noqa: E402

COLOUR = ["exposure_wb", "gamma", "scurve", "lift_gain", "saturation", "vibrance", "hue_rotate",
          "sepia", "mono_tint", "channel_mix", "split_tone", "selective_colour"]
# fit.rs logs every blur gain with the bar it must clear; a resampled pair's bar is the constant
# (RESAMPLED_BLUR_GAIN_DB), above the aligned pairs' MIN_PART_GAIN_DB (0.5)
GAIN = re.compile(r"blur features gain (-?[0-9.]+) dB \(kept from ([0-9.]+) dB\)")
MIN_PART_GAIN_DB = 0.5


def gains(bin_path, a, a2m):
    with tempfile.TemporaryDirectory() as d:
        for name, x in (("a", a), ("a2", a2m)):
            Image.fromarray(x).save(os.path.join(d, name + ".png"))
        env = dict(os.environ, TAKUMI_LOG="debug", NO_COLOR="1")
        models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
        r = subprocess.run([bin_path, "--models", models, "learn", "--store", os.path.join(d, "s"),
                            "--before", os.path.join(d, "a.png"), "--after", os.path.join(d, "a2.png"),
                            "--name", "t"], capture_output=True, text=True, env=env)
        return [float(g) for g, bar in GAIN.findall(r.stdout + r.stderr) if float(bar) > MIN_PART_GAIN_DB]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    _, photos = data.load_split(test=False)
    q8 = lambda x: ec.to_u8(x[0].clamp(0, 1).numpy())  # noqa: E731
    found = []
    for k in range(args.pairs):
        e = edits.sample(rng, COLOUR[k % len(COLOUR)])
        big = ec.big_crop(photos[rng.randrange(len(photos))], rng)
        ang, sc = rng.uniform(-5, 5), rng.uniform(0.92, 1.08)
        tx, ty = rng.uniform(-0.1, 0.1) * ec.W, rng.uniform(-0.1, 0.1) * ec.H
        a, _ = edits.make_pair(ec.centre(big), e, gen)
        _, a2m = edits.make_pair(ec.moved_frame(big, ang, sc, tx, ty), e, gen)
        g = gains(args.bin, q8(a), q8(a2m))
        print(f"{k:3d} {e[0]:16s} angle {ang:+.2f} scale {sc:.3f}: " + " ".join(f"{v:.3f}" for v in g))
        found += g
    v = np.array(found)
    print(f"\n{len(v)} gains (both directions) from {args.pairs} moved colour-edit pairs: median {np.median(v):.3f}, "
          f"90th {np.percentile(v, 90):.3f}, 95th {np.percentile(v, 95):.3f}, max {v.max():.3f} dB")


if __name__ == "__main__":
    main()
