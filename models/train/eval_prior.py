"""What the hypernetwork adds, through the release binary: the fit with H's prior (`takumi learn`,
the default), the same fit with a zero prior (`--prior zero`), H alone (`--no-fit`), doing nothing,
and the classical fits of eval.py, on four sets of held-out quads (A, A', B, B'):

* families: one edit per family, as eval.py's quads() (the model card's main set);
* under: under-determined pairs: A dark or dull while B is normal, or B dark or dull while A is
  normal (the pair never shows tones or hues the query has; data.restrict_range, as in training);
* unregistered: A' is the edit of another part of the same photo, so no registration can map it
  onto A and the fit has no pixels to use;
* small: the pair is a 96 x 72 or 64 x 64 crop; B is a full 320 x 240 frame.

    models/train/.venv/bin/python models/train/eval_prior.py --bin target/release/takumi \
        [--per-family 2] [--workers 1] [--json models/eval_prior.json] [--sets families,under] \
        [--precision int8]

Prints markdown tables (mean PSNR against B' per set; per family for the families set) and
writes every score to the json. A failing binary call is recorded with its stderr."""
import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
import edits  # noqa: E402
import eval as ev  # noqa: E402
import eval_cli as ec  # noqa: E402

SETS = ("families", "under", "unregistered", "small")
LEARNED = {"hypernet": [], "zero": ["--prior", "zero"], "h_alone": ["--no-fit"]}
CLASSICAL = {"affine": ev.fit_affine, "lut": ev.fit_lut, "bank": ev.fit_bank}
METHODS = ("identity",) + tuple(CLASSICAL) + tuple(LEARNED)
UNDER_KINDS = [("a", "dark"), ("a", "dull"), ("b", "dark"), ("b", "dull")]
SMALL = [(96, 72), (64, 64)]


def q8(x):
    return ec.to_u8(x[0].clamp(0, 1).numpy())


def build(photos, per_family, seed=31):
    """The quads of every set, as uint8 (H, W, 3) arrays. A quad whose edit leaves B unchanged at
    8 bits (B' == B) is drawn again: it tests nothing, and doing nothing scores the 120 dB cap on
    it, which outweighs every other quad in a mean (one vibrance quad did, before)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for f in edits.FAMILIES:
        for n in range(per_family * 4):
            q = draw(photos, f, n, rng, gen)
            while np.array_equal(q["b"], q["b2"]):
                q = draw(photos, f, n, rng, gen)
            out.append(q)
    return out


def draw(photos, f, n, rng, gen):
    """Quad n of family f: its set is SETS[n % 4]."""
    kind = SETS[n % 4]
    i, j = rng.sample(range(len(photos)), 2)
    e = edits.sample(rng, f)
    A, B = ev.crop(photos[i], rng), ev.crop(photos[j], rng)
    q = dict(set=kind, family=f, edit=ec.jsonable(e))
    if kind == "under":
        who, how = UNDER_KINDS[(n // 4) % 4]
        amount = rng.uniform(0.6, 1.0)
        if who == "a":
            A = data.restrict_range(A, how, amount)
        else:
            B = data.restrict_range(B, how, amount)
        q["under"] = f"{who.upper()} {how} {amount:.2f}"
    a, a2 = edits.make_pair(A, e, gen)
    b, b2 = edits.make_pair(B, e, gen)
    if kind == "unregistered":
        _, a2 = edits.make_pair(ev.crop(photos[i], rng), e, gen)
    if kind == "small":
        w, h = SMALL[(n // 4) % 2]
        t, l = rng.randint(0, ev.H - h), rng.randint(0, ev.W - w)
        a, a2 = a[:, :, t:t + h, l:l + w], a2[:, :, t:t + h, l:l + w]
        q["small"] = f"{w}x{h}"
    q.update(a=q8(a), a2=q8(a2), b=q8(b), b2=q8(b2))
    return q


def learn_apply(name, flags, A, A2, B):
    d = os.path.join(ec._W["tmp"], name)
    os.makedirs(d, exist_ok=True)
    p = lambda f: os.path.join(d, f)  # noqa: E731
    for x, f in ((A, "A.png"), (A2, "A2.png"), (B, "B.png")):
        ec.save_png(x, p(f))
    rec = dict(errors=[])
    prec = ["--precision", ec._W["args"].precision]
    lr = ec.takumi("learn", "--before", p("A.png"), "--after", p("A2.png"), "--name", name, *flags, *prec)
    out = None
    if lr["rc"] == 0:
        rec["learn"] = lr["stdout"].splitlines()[-1] if lr["stdout"] else ""
        ar = ec.takumi("apply", "--template", name, "--input", p("B.png"), "--output", p("out.png"), *prec)
        if ar["rc"] == 0:
            out = ec.load_png(p("out.png"))
        else:
            rec["errors"].append(dict(cmd="apply", rc=ar["rc"], stderr=ar["stderr"]))
        ec.takumi("templates", "rm", name)
    else:
        rec["errors"].append(dict(cmd="learn", rc=lr["rc"], stderr=lr["stderr"]))
    shutil.rmtree(d, ignore_errors=True)
    return out, rec


def job(q):
    A, A2, B, B2 = (ec.from_u8(q[k]) for k in ("a", "a2", "b", "b2"))
    r = {k: v for k, v in q.items() if k not in ("a", "a2", "b", "b2")}
    r["identity"] = ev.psnr(B, B2)
    for m, fit in CLASSICAL.items():
        r[m] = ev.psnr(ec.as_8bit(fit(A, A2)(B)), B2)  # scored as the 8-bit image, like takumi's
    for m, flags in LEARNED.items():
        out, rec = learn_apply(f"p{q['idx']}{m}", flags, A, A2, B)
        r[m] = ev.psnr(out, B2) if out is not None else None
        r[f"{m}_run"] = rec
    return r


def mean(v):
    v = [x for x in v if x is not None]
    return float(np.mean(v)) if v else float("nan")


def report(rows):
    lines = ["| set | quads | " + " | ".join(METHODS) + " | H prior − zero | H alone − identity |",
             "|---" * (len(METHODS) + 4) + "|"]
    summ = {}
    for s in SETS + ("all",):
        rs = [r for r in rows if s in (r["set"], "all")]
        if not rs:
            continue
        m = {k: mean([r[k] for r in rs]) for k in METHODS}
        summ[s] = m
        lines.append(f"| {s} | {len(rs)} | " + " | ".join(f"{m[k]:.2f}" for k in METHODS)
                     + f" | {m['hypernet'] - m['zero']:+.2f} | {m['h_alone'] - m['identity']:+.2f} |")
    lines += ["", "Per family (the families set; its mean over families is the issue's 'over all families'):", "",
              "| family | " + " | ".join(METHODS) + " | H prior − zero |", "|---" * (len(METHODS) + 2) + "|"]
    fam = {}
    for f in edits.FAMILIES:
        rs = [r for r in rows if r["family"] == f and r["set"] == "families"]
        if not rs:
            continue
        m = {k: mean([r[k] for r in rs]) for k in METHODS}
        fam[f] = m
        lines.append(f"| {f} | " + " | ".join(f"{m[k]:.2f}" for k in METHODS) + f" | {m['hypernet'] - m['zero']:+.2f} |")
    if fam:
        fm = {k: mean([v[k] for v in fam.values()]) for k in METHODS}
        lines.append("| **mean over families** | " + " | ".join(f"{fm[k]:.2f}" for k in METHODS)
                     + f" | {fm['hypernet'] - fm['zero']:+.2f} |")
        summ["mean_over_families"] = fm
    return "\n".join(lines), summ


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ec.REPO, "target", "release", "takumi"))
    ap.add_argument("--models", default=os.path.join(ec.REPO, "models"))
    ap.add_argument("--per-family", type=int, default=2, help="quads per family in each set")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="float", choices=["float", "int8"], help="the models takumi runs")
    ap.add_argument("--sets", help="comma-separated subset of " + ",".join(SETS))
    ap.add_argument("--json", default=os.path.join(ec.REPO, "models", "eval_prior.json"))
    a = ap.parse_args()
    a.bin, a.models, a.fake = os.path.abspath(a.bin), os.path.abspath(a.models), False
    if not os.access(a.bin, os.X_OK):
        data.fail(f"{a.bin}: no executable takumi binary (build it with cargo build --release)")
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 2) // max(1, a.workers))
    torch.set_num_threads(1)
    t0 = time.time()
    _, photos = data.load_split(test=True)
    qs = build(photos, a.per_family)
    if a.sets:
        keep = set(a.sets.split(","))
        if keep - set(SETS):
            data.fail(f"--sets: unknown {sorted(keep - set(SETS))}; known: {list(SETS)}")
        qs = [q for q in qs if q["set"] in keep]
    for i, q in enumerate(qs):
        q["idx"] = i
    print(f"{len(qs)} quads from {len(photos)} held-out photos, {a.workers} worker(s)", file=sys.stderr)
    a.tmp = tempfile.mkdtemp(prefix="tkprior_")
    rows = []
    with mp.get_context("fork").Pool(a.workers, initializer=ec.init_worker, initargs=(a,)) as pool:
        for r in pool.imap_unordered(job, qs, chunksize=1):
            rows.append(r)
            if len(rows) % 10 == 0:
                print(f"  {len(rows)}/{len(qs)}, {time.time() - t0:.0f} s", file=sys.stderr)
    shutil.rmtree(a.tmp, ignore_errors=True)
    rows.sort(key=lambda r: r["idx"])
    table, summ = report(rows)
    print(table)
    failed = sum(len(r[f"{m}_run"]["errors"]) for r in rows for m in LEARNED)
    print(f"\n{failed} failed binary calls; run time {time.time() - t0:.0f} s")
    with open(a.json, "w") as f:
        json.dump(dict(bin_models=a.models, per_family=a.per_family, seconds=round(time.time() - t0, 1),
                       failed_calls=failed, summary=summ, quads=rows), f, indent=1)


if __name__ == "__main__":
    main()
