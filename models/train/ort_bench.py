"""onnxruntime on the same float models and inputs as `takumi bench` (called by it).

    python ort_bench.py MODELS_DIR INPUTS.f32 THREADS ITERS  ->  "hypernet_ms backbone_ms" (medians)
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    models, inputs, threads, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    meta = json.load(open(os.path.join(models, "model.json")))
    raw = np.fromfile(inputs, dtype="<f4")
    n = 3 * meta["thumb"] * meta["thumb"]
    t = [raw[i * n:(i + 1) * n].reshape(1, 3, meta["thumb"], meta["thumb"]) for i in range(4)]
    delta = raw[4 * n:].reshape(1, -1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    h = ort.InferenceSession(os.path.join(models, "hypernet.onnx"), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(os.path.join(models, "backbone.onnx"), so, providers=["CPUExecutionProvider"])
    hf = dict(zip(["thumb_a", "thumb_a2", "patch_a", "patch_a2"], t))
    bf = {"thumb": t[0], "template": delta}
    out = []
    for s, f in ((h, hf), (b, bf)):
        s.run(None, f)
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            s.run(None, f)
            ts.append((time.perf_counter() - t0) * 1e3)
        out.append(float(np.median(ts)))
    print(f"{out[0]:.4f} {out[1]:.4f}")


if __name__ == "__main__":
    main()
