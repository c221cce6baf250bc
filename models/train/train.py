"""Train takumi's hypernetwork H and backbone G on synthetic quads, with the LoRA Reverse loss.

    python models/train/train.py --out models/train/runs/main            # from scratch
    python models/train/train.py --out models/train/runs/main --resume   # continue from ckpt.pt
    python models/train/train.py --out runs/ablation --reverse-weight 0  # the ablation
    python models/train/train.py --out runs/gpu --device cuda --workers 14  # quads made by 14 processes
    python models/train/train.py --out runs/gpu --device cuda --quads-on cuda --workers 14
                                                # quads made on the GPU, topped up by 14 processes (gpu.sh)
    python models/train/train.py --pairs DIR --init runs/main/ckpt.pt --out runs/plant
                                                # pairs-only fine-tuning, flipped pair as query
"""
import argparse
import json
import math
import os
import queue
import random
import sys
import threading
import time

import torch
import torch.nn.functional as F

import data
from takumi_model import Backbone, HyperNet, apply_g_points, features, gather, hyper_inputs, random_points

POINTS = 1536  # pixels per image the loss is evaluated at


def build():
    return HyperNet(), Backbone()


def losses(hyper, backbone, quad, reverse_weight, gen=None):
    a, a2, b, b2 = quad
    n, _, h, w = b.shape
    idx, pts = random_points(n, h, w, POINTS, gen)
    idx, pts = idx.to(b.device), pts.to(b.device)
    with torch.no_grad():
        fb, fb2 = features(b), features(b2)
    t = hyper(*hyper_inputs(a, a2))
    l_fwd = F.l1_loss(apply_g_points(backbone, t, b, fb, idx, pts), gather(b2, idx))
    if reverse_weight > 0:
        # LoRA Reverse: the negated template must undo the edit on the true B'
        l_rev = F.l1_loss(apply_g_points(backbone, -t, b2, fb2, idx, pts), gather(b, idx))
    else:
        l_rev = torch.zeros(())
    return l_fwd, l_rev


class QuadStream(torch.utils.data.IterableDataset):
    """Synthetic batches made in worker processes, so a GPU is not left waiting on the CPU's quads.
    Each worker draws from its own seed; the batches are not reproducible across runs as in-process ones are."""

    def __init__(self, photos, batch, crop, seed, under_p):
        self.photos, self.batch, self.crop, self.seed, self.under_p = photos, batch, crop, seed, under_p

    def __iter__(self):
        wid = torch.utils.data.get_worker_info().id
        torch.set_num_threads(1)
        rng = random.Random(self.seed * 1000 + wid)
        gen = torch.Generator().manual_seed(self.seed * 1000 + wid)
        while True:
            yield data.synthetic_quads(self.photos, self.batch, self.crop, rng, gen, under_p=self.under_p)


class Feeder:
    """The worker stream drained by a thread, so that the training loop takes a worker batch only
    when one is waiting and makes its own on the GPU otherwise (the two together outrun either)."""

    def __init__(self, stream):
        self.q, self.error, self.stream = queue.Queue(maxsize=4), None, stream
        threading.Thread(target=self._drain, args=(stream,), daemon=True).start()

    def close(self):
        # the loader's own shutdown (what its __del__ does), so that its pin-memory thread stops
        # before the worker processes go, instead of dying at exit on a reset connection
        self.stream._shutdown_workers()

    def _drain(self, stream):
        try:
            for b in stream:
                self.q.put(b)
        except Exception as e:  # a worker killed: the loop carries on with its own quads
            self.error = e

    def poll(self):
        try:
            return self.q.get_nowait()
        except queue.Empty:
            return None


def device_quads(src, args):
    """A batch made in the training loop from the photos held on the quad device."""
    return data.synthetic_quads(src["photos_dev"], args.batch, args.crop, src["rng"], src["gen_dev"], under_p=args.under)


def next_quads(src, args):
    """The next batch and where it came from ("workers", "device" or "here"). src holds the worker
    stream or feeder, the photos (on the quad device too, with --quads-on) and the generators."""
    if src.get("feeder") is not None:
        b = src["feeder"].poll()
        if b is not None:
            return b, "workers"
        if src.get("photos_dev") is not None:
            try:
                return device_quads(src, args), "device"
            except RuntimeError as e:  # the device path failing must not lose the run: the workers go on
                print(f"warning: making quads on {args.quads_on} failed ({e}); workers only from now", flush=True)
                src["photos_dev"] = None
        while src["feeder"].error is None:
            try:
                return src["feeder"].q.get(timeout=1.0), "workers"
            except queue.Empty:
                pass
        print(f"warning: quad workers failed ({src['feeder'].error}); making quads in the training process", flush=True)
        src["feeder"] = None
        torch.set_num_threads(max(args.threads, os.cpu_count() or 1))
    if args.pairs:
        return data.pair_quads(src["source"], args.batch, args.crop, src["rng"]), "here"
    if src.get("photos_dev") is not None:
        return device_quads(src, args), "device"
    return data.synthetic_quads(src["source"], args.batch, args.crop, src["rng"], src["gen"], under_p=args.under), "here"


def save(path, step, elapsed, hyper, backbone, opt, rng, args):
    tmp = path + ".tmp"
    torch.save(dict(step=step, elapsed=elapsed, hyper=hyper.state_dict(), backbone=backbone.state_dict(), opt=opt.state_dict(),
                    rng=rng.getstate(), torch_rng=torch.get_rng_state(), args=vars(args)), tmp)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder: ckpt.pt, log.jsonl")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=0,
                    help="wall-clock budget: the schedule ends at whichever of --steps and --minutes comes first")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--crop", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reverse-weight", type=float, default=0.5, help="lambda of the LoRA Reverse term")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (gpu.sh)")
    ap.add_argument("--workers", type=int, default=0, help="processes making synthetic quads (0: in the training loop)")
    ap.add_argument("--quads-on", help="also make quads in the training loop on this device (cuda: the photos held "
                    "on the GPU), taking a worker batch whenever one is waiting")
    ap.add_argument("--under", type=float, default=0.25, help="share of under-determined quads (data.under_determined)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--snapshot-at", type=int, default=0, help="also keep OUT/ckpt_<step>.pt at this step")
    ap.add_argument("--pairs", help="pairs-only fine-tuning from NAME_before/NAME_after images in this folder")
    ap.add_argument("--init", help="start from this checkpoint's weights (for --pairs)")
    ap.add_argument("--freeze-backbone", action="store_true",
                    help="train H only (default with --pairs: the backbone stays frozen)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    hyper, backbone = build()
    pairs = photos = None
    if args.pairs:
        pairs = data.load_pairs(args.pairs)
        args.freeze_backbone = True
        if not args.init and not args.resume:
            data.fail("--pairs fine-tunes a trained model: give --init CKPT (for example models/train/runs/main/ckpt.pt)")
    else:
        _, photos = data.load_split(test=False)
        if len(photos) < 2:
            data.fail("fewer than 2 training photos in the cache: re-run fetch_photos.py")
    if args.init:
        if not os.path.exists(args.init):
            data.fail(f"--init {args.init}: no such checkpoint")
        ck = torch.load(args.init, weights_only=False, map_location="cpu")
        hyper.load_state_dict(ck["hyper"])
        backbone.load_state_dict(ck["backbone"])
    dev = torch.device(args.device)
    hyper, backbone = hyper.to(dev), backbone.to(dev)
    params = list(hyper.parameters()) + ([] if args.freeze_backbone else list(backbone.parameters()))
    for p in backbone.parameters():
        p.requires_grad_(not args.freeze_backbone)
    opt = torch.optim.Adam(params, lr=args.lr)
    step, spent = 0, 0.0
    if args.resume:
        if not os.path.exists(ckpt_path):
            data.fail(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        hyper.load_state_dict(ck["hyper"])
        backbone.load_state_dict(ck["backbone"])
        opt.load_state_dict(ck["opt"])
        rng.setstate(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        step = ck["step"]
        spent = ck.get("elapsed", 0.0)
        print(f"resumed at step {step}", flush=True)

    log = open(os.path.join(args.out, "log.jsonl"), "a")
    t0, acc = time.time(), [0.0, 0.0, 0]
    start = time.time() - spent

    def progress():
        p = step / args.steps
        if args.minutes:
            p = max(p, (time.time() - start) / (60 * args.minutes))
        return min(p, 1.0)

    src = dict(source=pairs if args.pairs else photos, rng=rng, gen=gen, feeder=None, photos_dev=None)
    if args.quads_on and not args.pairs:
        src["photos_dev"] = [p.to(args.quads_on) for p in photos]
        src["gen_dev"] = torch.Generator(device=args.quads_on).manual_seed(args.seed + step)
    if args.workers and not args.pairs:
        loader = torch.utils.data.DataLoader(QuadStream(photos, args.batch, args.crop, args.seed + step, args.under),
                                             batch_size=None, num_workers=args.workers, prefetch_factor=2,
                                             pin_memory=dev.type == "cuda")
        src["feeder"] = Feeder(iter(loader))
    origin = dict(workers=0, device=0, here=0)
    while progress() < 1.0:
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * progress()))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            quad, where = next_quads(src, args)
            origin[where] += 1
            quad = tuple(t.to(dev, non_blocking=True) for t in quad)
        l_fwd, l_rev = losses(hyper, backbone, quad, args.reverse_weight, gen)
        loss = l_fwd + args.reverse_weight * l_rev
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        acc[0] += l_fwd.item()
        acc[1] += l_rev.item()
        acc[2] += 1
        if step % 50 == 0 or progress() >= 1.0:
            ident = F.l1_loss(quad[2], quad[3]).item()
            rec = dict(step=step, fwd=acc[0] / acc[2], rev=acc[1] / acc[2], identity_l1=ident, lr=lr,
                       s_per_step=(time.time() - t0) / acc[2], quads=dict(origin))
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, acc = time.time(), [0.0, 0.0, 0]
        elapsed = time.time() - start
        if step % 250 == 0 or progress() >= 1.0:
            save(ckpt_path, step, elapsed, hyper, backbone, opt, rng, args)
        if args.snapshot_at and step == args.snapshot_at:
            save(os.path.join(args.out, f"ckpt_{step}.pt"), step, elapsed, hyper, backbone, opt, rng, args)
    if src["feeder"] is not None:
        src["feeder"].close()
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
