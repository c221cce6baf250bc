"""True int8 models for the precision measurement (board/README.md, "Precision per board").

The shipped models/*.int8.onnx are QDQ, which tract folds back to float. This writes, into a
scratch model folder, the same float models quantised in operator form instead, which keeps
integer arithmetic in the graph:

  static   QLinearConv / QLinearMatMul: int8 weights and activations, activation scales calibrated
           on the same synthetic pairs as models/train/export.py (48, seed 7);
  dynamic  ConvInteger / MatMulInteger: int8 weights, uint8 activations quantised at run time.

Only Conv and MatMul are quantised (Gemm would become com.microsoft's QGemm, which tract does
not have). The float files and model.json are copied alongside, so templates learnt with the
shipped models apply unchanged (the model hash covers the float files only).

    models/train/.venv/bin/python board/precision/qoperator.py OUT_DIR static|dynamic
"""
import os
import random
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.normpath(os.path.join(HERE, "..", "..", "models", "train"))
MODELS = os.path.normpath(os.path.join(TRAIN, ".."))
sys.path.insert(0, TRAIN)

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: E402
                                      quantize_dynamic, quantize_static)

import data  # noqa: E402
import takumi_model as tm  # noqa: E402

HNAMES = ["thumb_a", "thumb_a2", "patch_a", "patch_a2"]


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def feeds(n, seed=7):
    """export.py's calibration inputs, with the templates from the float hypernet.onnx."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    _, photos = data.load_split(test=False)
    a, a2, b, _ = data.synthetic_quads(photos, n, 192, rng, gen)
    h = ort.InferenceSession(os.path.join(MODELS, "hypernet.onnx"), providers=["CPUExecutionProvider"])
    hf, gf = [], []
    with torch.no_grad():
        for i in range(n):
            hi = {k: v.numpy() for k, v in zip(HNAMES, tm.hyper_inputs(a[i:i + 1], a2[i:i + 1]))}
            t = h.run(None, hi)[0]
            hf.append(hi)
            gf.append({"thumb": tm.thumbnail(b[i:i + 1]).numpy(), "template": t})
    return hf, gf


def main():
    out, mode = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for f in ("model.json", "hypernet.onnx", "backbone.onnx"):
        shutil.copy(os.path.join(MODELS, f), out)
    hf, gf = feeds(48) if mode == "static" else (None, None)
    for name, fs in (("hypernet", hf), ("backbone", gf)):
        src, dst = os.path.join(MODELS, f"{name}.onnx"), os.path.join(out, f"{name}.int8.onnx")
        if mode == "static":
            quantize_static(src, dst, Reader(fs), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "MatMul"],
                            extra_options={"ActivationSymmetric": True})
        else:
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["Conv", "MatMul"])
    print(f"{out}: {mode} int8 models written")


if __name__ == "__main__":
    main()
