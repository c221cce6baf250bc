"""Export a trained checkpoint to ONNX (float and int8 QDQ) and write the golden vectors.

    python models/train/export.py --ckpt models/train/runs/main/ckpt.pt

Writes models/hypernet.onnx, models/backbone.onnx, models/hypernet.int8.onnx,
models/backbone.int8.onnx, models/model.json and tests/fixtures/golden/*.safetensors.
"""
import argparse
import json
import os
import random
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from safetensors.numpy import save_file

import data
import edits
import takumi_model as tm

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.normpath(os.path.join(HERE, ".."))
GOLDEN = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "fixtures", "golden"))


class HyperExport(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, thumb_a, thumb_a2, patch_a, patch_a2):
        return self.h(thumb_a, thumb_a2, patch_a, patch_a2)


class BackboneExport(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, thumb, template):
        return self.g(thumb, template)


def load(ckpt):
    h, g = tm.HyperNet(), tm.Backbone()
    ck = torch.load(ckpt, weights_only=False, map_location="cpu")
    h.load_state_dict(ck["hyper"])
    g.load_state_dict(ck["backbone"])
    return h.eval(), g.eval(), ck


def export(model, args, names, out, path):
    ep = torch.onnx.export(model, args, dynamo=True, opset_version=17, input_names=names, output_names=[out],
                           external_data=False)
    ep.save(path, external_data=False)
    m = onnx.load(path)
    onnx.checker.check_model(m)


def save(path, arrays):
    # safetensors writes a view's underlying buffer: make every array contiguous first
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, path)


def run_ort(path, feeds):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def calibration_pairs(n, seed=7):
    """Synthetic pairs from the training photos for int8 calibration."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    _, photos = data.load_split(test=False)
    a, a2, b, b2 = data.synthetic_quads(photos, n, 192, rng, gen)
    return a, a2, b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--calib", type=int, default=48)
    ap.add_argument("--models-dir", default=MODELS, help="where the ONNX files and model.json go")
    ap.add_argument("--golden-dir", default=GOLDEN, help="where the golden vectors go")
    a = ap.parse_args()
    export_to(a)


def export_to(a):
    MODELS, GOLDEN = a.models_dir, a.golden_dir
    os.makedirs(MODELS, exist_ok=True)
    if not os.path.exists(a.ckpt):
        data.fail(f"--ckpt {a.ckpt}: no such checkpoint; train first (models/train/README.md)")
    h, g, ck = load(a.ckpt)
    T = tm.template_len()
    os.makedirs(GOLDEN, exist_ok=True)

    ca, ca2, cb = calibration_pairs(a.calib)
    with torch.no_grad():
        hin = [x for x in tm.hyper_inputs(ca[:1], ca2[:1])]
        t = h(*hin)
        thumb_b = tm.thumbnail(cb[:1])
    hp, gp = os.path.join(MODELS, "hypernet.onnx"), os.path.join(MODELS, "backbone.onnx")
    hnames = ["thumb_a", "thumb_a2", "patch_a", "patch_a2"]
    export(HyperExport(h), tuple(hin), hnames, "template", hp)
    export(BackboneExport(g), (thumb_b, t), ["thumb", "template"], "grid", gp)

    # int8: QDQ, per-channel weights (tract folds QDQ; QLinearConv would be ~20x slower there)
    hfeeds, gfeeds = [], []
    with torch.no_grad():
        for i in range(a.calib):
            hi = tm.hyper_inputs(ca[i:i + 1], ca2[i:i + 1])
            ti = h(*hi)
            hfeeds.append({k: v.numpy() for k, v in zip(hnames, hi)})
            gfeeds.append({"thumb": tm.thumbnail(cb[i:i + 1]).numpy(), "template": ti.numpy()})
    for src, feeds in ((hp, hfeeds), (gp, gfeeds)):
        dst = src.replace(".onnx", ".int8.onnx")
        quantize_static(src, dst, Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "Gemm", "MatMul"],
                        extra_options={"ActivationSymmetric": True})

    # golden vectors: onnxruntime's outputs on fixed inputs, for the Rust side to match
    errs = {}
    for tag, hpath, gpath in (("float", hp, gp), ("int8", hp.replace(".onnx", ".int8.onnx"),
                                                   gp.replace(".onnx", ".int8.onnx"))):
        feeds = hfeeds[1]
        tt = run_ort(hpath, feeds)
        save(os.path.join(GOLDEN, f"hypernet_{tag}.safetensors"), {**feeds, "template": tt})
        gf = {"thumb": gfeeds[2]["thumb"], "template": gfeeds[2]["template"]}
        grid = run_ort(gpath, gf)
        save(os.path.join(GOLDEN, f"backbone_{tag}.safetensors"), {**gf, "grid": grid})
        with torch.no_grad():
            tref = h(*[torch.from_numpy(feeds[k]) for k in hnames]).numpy()
            gref = g(torch.from_numpy(gf["thumb"]), torch.from_numpy(gf["template"])).numpy()
        errs[tag] = dict(hypernet=float(np.abs(tt - tref).max()), backbone=float(np.abs(grid - gref).max()))

    # the full-resolution stages (thumbnail, filter bank, slicing), from the PyTorch reference
    with torch.no_grad():
        img = cb[3:4, :, :75, :101].contiguous()
        tmpl = torch.from_numpy(gfeeds[3]["template"])
        grid = g(tm.thumbnail(img), tmpl)
        out = tm.slice_apply(img, grid)
    save(os.path.join(GOLDEN, "pipeline.safetensors"), {"image": img.numpy(), "thumb": tm.thumbnail(img).numpy(), "features": tm.features(img).numpy(),
               "grid": grid.numpy(), "template": tmpl.numpy(), "output": out.numpy(),
               "patch": tm.centre_patch(cb[3:4]).numpy(), "patch_src": cb[3:4].numpy()})

    meta = dict(template_len=T, thumb=tm.THUMB, patch=tm.PATCH, grid=tm.GRID, lbins=tm.LBINS, k=tm.K,
                sigmas=list(tm.SIGMAS), hues=tm.HUES, luma=list(tm.LUMA), layout=[[n, list(s)] for n, s in tm.layout()],
                train_step=ck["step"], train_args=ck["args"], ort_vs_torch=errs)
    with open(os.path.join(MODELS, "model.json"), "w") as f:
        json.dump(meta, f, indent=1)
    sizes = {p: os.path.getsize(os.path.join(MODELS, p)) for p in os.listdir(MODELS) if p.endswith(".onnx")}
    print(json.dumps(dict(errors=errs, sizes=sizes, total_mb=sum(sizes.values()) / 1e6), indent=1))


if __name__ == "__main__":
    sys.exit(main())
