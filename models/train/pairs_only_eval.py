"""Pairs-only fine-tuning on an edit family that training never saw (issue 10, item 5).

1. Ten (before, after) pairs of an unseen family (edits.UNSEEN, default cross_process) are made
   from ten training photos and written as NAME_before.png / NAME_after.png;
2. `train.py --pairs DIR --init CKPT` fine-tunes H on them alone (the paper's mode: each pair's
   flipped copy is the query), backbone frozen;
3. held-out quads of that family (held-out photos, other edits of the family) are scored before
   and after: H alone (G(H(A, A'), B), model level) and `takumi learn` + `takumi apply` through
   the binary, with each checkpoint exported to a scratch models folder.

    models/train/.venv/bin/python models/train/pairs_only_eval.py --init models/train/runs/long2/ckpt.pt \\
        --bin target/release/takumi [--steps 300] [--quads 20] [--out models/train/runs/pairs_unseen] \\
        [--json models/eval_pairs_only.json]

Prints a markdown table and writes every score to the json."""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import edits  # noqa: E402
import eval as ev  # noqa: E402
import eval_cli as ec  # noqa: E402
import eval_prior as ep  # noqa: E402
import takumi_learn as tl  # noqa: E402

PY = sys.executable


def make_pairs(family, n, d, seed):
    """n pairs of `family` from training photos, one random edit of the family each."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    _, photos = data.load_split(test=False)
    os.makedirs(d, exist_ok=True)
    for k, i in enumerate(rng.sample(range(len(photos)), n)):
        a, a2 = edits.make_pair(photos[i][None], edits.sample(rng, family), gen)
        ec.save_png(a[0].numpy(), os.path.join(d, f"p{k}_before.png"))
        ec.save_png(a2[0].numpy(), os.path.join(d, f"p{k}_after.png"))


def heldout_quads(family, n, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    _, photos = data.load_split(test=True)
    out = []
    for _ in range(n):
        i, j = rng.sample(range(len(photos)), 2)
        e = edits.sample(rng, family)
        a, a2 = edits.make_pair(ev.crop(photos[i], rng), e, gen)
        b, b2 = edits.make_pair(ev.crop(photos[j], rng), e, gen)
        out.append([ec.from_u8(ep.q8(x)) for x in (a, a2, b, b2)])
    return out


def run(cmd):
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def export(ckpt, d):
    os.makedirs(d, exist_ok=True)
    run([PY, os.path.join(HERE, "export.py"), "--ckpt", ckpt, "--models-dir", d, "--golden-dir",
         os.path.join(d, "golden")])


def score(ckpt, models, quads, args):
    """Mean PSNR against B' of H alone (torch) and of `takumi learn` + `apply` (binary)."""
    model = tl.Torch(ckpt)
    args.models = models
    ec.init_worker(args)
    h_alone, learned, identity = [], [], []
    for k, (A, A2, B, B2) in enumerate(quads):
        th, _ = tl.learn(model, [(A, A2)], refine=False)
        h_alone.append(ev.psnr(tl.apply(model, th, B), B2))
        out, rec = ep.learn_apply(f"q{k}", [], A, A2, B)
        if out is None:
            data.fail(f"takumi failed on quad {k}: {rec['errors']}")
        learned.append(ev.psnr(out, B2))
        identity.append(ev.psnr(B, B2))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return dict(h_alone=mean(h_alone), takumi=mean(learned), identity=mean(identity),
                per_quad=dict(h_alone=h_alone, takumi=learned))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the trained checkpoint to fine-tune")
    ap.add_argument("--bin", default=os.path.join(ec.REPO, "target", "release", "takumi"))
    ap.add_argument("--family", default=edits.UNSEEN[0], choices=edits.UNSEEN)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quads", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "runs", "pairs_unseen"))
    ap.add_argument("--json", default=os.path.join(ec.REPO, "models", "eval_pairs_only.json"))
    a = ap.parse_args()
    a.bin, a.precision, a.fake = os.path.abspath(a.bin), "float", False
    if not os.access(a.bin, os.X_OK):
        data.fail(f"{a.bin}: no executable takumi binary (build it with cargo build --release)")
    t0 = time.time()
    pairs_dir = os.path.join(a.out, "pairs")
    make_pairs(a.family, a.pairs, pairs_dir, seed=41)
    ckpt = os.path.join(a.out, "ckpt.pt")
    if not os.path.exists(ckpt):
        run([PY, os.path.join(HERE, "train.py"), "--pairs", pairs_dir, "--init", a.init, "--out", a.out,
             "--steps", str(a.steps), "--threads", str(a.threads)])
    torch.set_num_threads(a.threads)
    quads = heldout_quads(a.family, a.quads, seed=43)
    a.tmp = tempfile.mkdtemp(prefix="tkpairs_")
    res = {}
    for tag, c in (("before", a.init), ("after", ckpt)):
        models = os.path.join(a.tmp, tag)
        export(c, models)
        res[tag] = score(c, models, quads, a)
    shutil.rmtree(a.tmp, ignore_errors=True)
    print(f"\n{a.family}: {a.pairs} training pairs, {a.steps} pairs-only steps, {a.quads} held-out quads\n")
    print("| | identity | H alone | takumi learn (H prior) |\n|---|---|---|---|")
    for tag in ("before", "after"):
        r = res[tag]
        print(f"| {tag} fine-tuning | {r['identity']:.2f} | {r['h_alone']:.2f} | {r['takumi']:.2f} |")
    print(f"\nrun time {time.time() - t0:.0f} s")
    with open(a.json, "w") as f:
        json.dump(dict(family=a.family, pairs=a.pairs, steps=a.steps, init=os.path.relpath(a.init, ec.REPO),
                       seconds=round(time.time() - t0, 1), results=res), f, indent=1)


if __name__ == "__main__":
    main()
