"""Rebuild a PyTorch checkpoint from the committed float ONNX models, to warm-start training.

    python models/train/warmstart.py --out runs/warm.pt
    python models/train/train.py --init runs/warm.pt --out runs/long ...

The checkpoint holds {"hyper": HyperNet state_dict, "backbone": Backbone state_dict} (the format
train.py's --init reads). Initializers are matched to state_dict keys by name first (the dynamo
exporter keeps names like "h.thumb_enc.0.0.weight" or "g.w.c3"). The exporter constant-folds some
tensors (w.unsqueeze(0) -> "unsqueeze_1", bias.view(1,-1,1,1) -> "view_24"); those are matched
by shape with size-1 dimensions dropped, in the order the graph first uses them. Any parameter
left unmatched, or a shape group whose candidate count differs from its parameter count, is an
error. The result is checked against onnxruntime on random inputs.
"""
import argparse
import os
import re
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

import takumi_model as tm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.normpath(os.path.join(HERE, ".."))
TOL = 1e-4


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def norm(name):
    """Canonical form of a parameter name: 'h.thumb_enc.0.0.weight', 'p_h_thumb_enc_0_0_weight',
    'thumb_enc.0.0.weight' all become 'thumb_enc_0_0_weight'."""
    n = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_")
    n = re.sub(r"^(p|b|c)_(?=[hg]_)", "", n)  # torch.export's parameter/buffer/constant prefixes
    n = re.sub(r"^[hg]_", "", n)  # the export wrapper's attribute (HyperExport.h / BackboneExport.g)
    return n


def squeezed(shape):
    return tuple(d for d in shape if d != 1)


def first_use_order(graph):
    order = {}
    for node in graph.node:
        for i in node.input:
            order.setdefault(i, len(order))
    return order


def map_weights(module, onnx_path):
    """state_dict of `module` filled from the initializers of `onnx_path`; returns (sd, report)."""
    m = onnx.load(onnx_path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    use = first_use_order(m.graph)
    sd = module.state_dict()
    by_norm = {}
    for name in inits:
        by_norm.setdefault(norm(name), []).append(name)

    out, report, used = {}, [], set()
    unmatched = []
    for key, ref in sd.items():
        cands = by_norm.get(norm(key), [])
        if len(cands) > 1:
            die(f"{onnx_path}: '{key}' matches several initializers by name: {cands}")
        if cands and tuple(inits[cands[0]].shape) == tuple(ref.shape):
            out[key] = inits[cands[0]]
            used.add(cands[0])
            report.append((key, cands[0], "name"))
        elif cands:
            die(f"{onnx_path}: '{key}' matches '{cands[0]}' by name but its shape is "
                f"{inits[cands[0]].shape}, not {tuple(ref.shape)}")
        else:
            unmatched.append(key)

    # fall back to shape (size-1 dims dropped), grouped, in graph first-use order
    groups = {}
    for key in unmatched:
        groups.setdefault(squeezed(sd[key].shape), []).append(key)
    for shape, keys in groups.items():
        cands = [n for n in inits if n not in used and squeezed(inits[n].shape) == shape]
        cands.sort(key=lambda n: use.get(n, 1 << 30))
        if len(cands) != len(keys):
            die(f"{onnx_path}: parameters {keys} (shape {shape}) have {len(cands)} candidate initializers "
                f"{cands}: cannot match them unambiguously")
        if any(n not in use for n in cands):
            die(f"{onnx_path}: candidate initializers {cands} are not all used by the graph")
        for key, n in zip(keys, cands):
            out[key] = inits[n].reshape(sd[key].shape)
            used.add(n)
            report.append((key, n, "shape" if len(keys) == 1 else f"shape+order ({len(keys)} of {shape})"))

    missing = [k for k in sd if k not in out]
    if missing:
        die(f"{onnx_path}: unmatched parameters {missing}")
    return {k: torch.from_numpy(np.array(v, copy=True)).to(sd[k].dtype) for k, v in out.items()}, report


def ort_run(path, feeds):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    if sorted(names) != sorted(feeds):
        die(f"{path}: inputs are {names}, expected {sorted(feeds)}")
    return s.run(None, feeds)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="checkpoint to write (e.g. runs/warm.pt)")
    ap.add_argument("--hypernet", default=os.path.join(MODELS, "hypernet.onnx"))
    ap.add_argument("--backbone", default=os.path.join(MODELS, "backbone.onnx"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print the name mapping")
    a = ap.parse_args()

    h, g = tm.HyperNet().eval(), tm.Backbone().eval()
    hsd, hrep = map_weights(h, a.hypernet)
    gsd, grep_ = map_weights(g, a.backbone)
    h.load_state_dict(hsd, strict=True)
    g.load_state_dict(gsd, strict=True)
    for tag, rep in (("hypernet", hrep), ("backbone", grep_)):
        kinds = {}
        for _, _, how in rep:
            kinds[how.split(" ")[0]] = kinds.get(how.split(" ")[0], 0) + 1
        print(f"{tag}: {len(rep)} tensors mapped {kinds}")
        for key, n, how in rep:
            if a.verbose or how != "name":
                print(f"  {key:28s} <- {n:28s} [{how}]")

    # verification against onnxruntime on random inputs
    gen = torch.Generator().manual_seed(a.seed)
    hin = [torch.rand(1, 3, tm.THUMB, tm.THUMB, generator=gen) for _ in range(4)]
    hnames = ["thumb_a", "thumb_a2", "patch_a", "patch_a2"]
    with torch.no_grad():
        t_torch = h(*hin)
    t_ort = ort_run(a.hypernet, {k: v.numpy() for k, v in zip(hnames, hin)})
    d_h = float(np.abs(t_ort - t_torch.numpy()).max())

    thumb = torch.rand(1, 3, tm.THUMB, tm.THUMB, generator=gen)
    T = tm.template_len()
    d_g = {}
    # a random template at the scale of the hypernet's outputs, and the hypernet's own template
    scale = float(t_torch.std())
    for tag, tmpl in (("random", torch.randn(1, T, generator=gen) * scale), ("hypernet", t_torch)):
        with torch.no_grad():
            grid = g(thumb, tmpl)
        grid_ort = ort_run(a.backbone, {"thumb": thumb.numpy(), "template": tmpl.numpy()})
        d_g[tag] = float(np.abs(grid_ort - grid.numpy()).max())
        print(f"backbone ({tag} template, std {float(tmpl.std()):.3g}, grid max |x| "
              f"{float(grid.abs().max()):.3g}): max abs diff torch vs onnxruntime {d_g[tag]:.3e}")
    print(f"hypernet (template max |x| {float(t_torch.abs().max()):.3g}): "
          f"max abs diff torch vs onnxruntime {d_h:.3e}")
    worst = max(d_h, *d_g.values())
    if worst >= TOL:
        die(f"torch and onnxruntime differ by {worst:.3e} >= {TOL}: the mapping is wrong")

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    torch.save(dict(hyper=h.state_dict(), backbone=g.state_dict(),
                    source=dict(hypernet=os.path.abspath(a.hypernet), backbone=os.path.abspath(a.backbone)),
                    ort_max_abs_diff=dict(hypernet=d_h, backbone=d_g)), a.out)
    print(f"wrote {a.out} (max abs diff {worst:.3e} < {TOL})")


if __name__ == "__main__":
    main()
