"""Checks, without a GPU, that the synthetic quads can be made on one (train.py --quads-on cuda):
under FakeTensorMode, tensors created on "cuda" are fakes that raise on any CPU/CUDA mix, as
CUDA would. Every edit family (and the misalignment) on fake CUDA images, then synthetic_quads on
fake CUDA photos.

    models/train/.venv/bin/python models/train/check_device.py     # prints "device check: ok"
"""
import os
import random
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import edits  # noqa: E402
import takumi_model as tm  # noqa: E402

_blur_matrix = tm.blur_matrix


def _real_blur_matrix(n, sigma):
    # a constant built with numpy on the CPU, then moved: as on the GPU machine
    with unset_fake_temporarily():
        return _blur_matrix(n, sigma)


def main():
    tm.blur_matrix = _real_blur_matrix
    bad = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 3, 64, 64, device="cuda")
        for f in edits.FAMILIES + edits.UNSEEN:
            for seed in range(3):
                try:
                    edits.make_pair(x, edits.sample(random.Random(seed), f), None)
                    edits.misalign(x, random.Random(seed))
                except Exception as e:
                    bad.append(f"{f}: {type(e).__name__}: {str(e)[:200]}")
        photos = [torch.empty(3, 300, 260 + 10 * i, device="cuda") for i in range(5)]
        rng = random.Random(2)
        for _ in range(20):
            try:
                data.synthetic_quads(photos, 8, 96, rng, None, under_p=0.5)
            except Exception as e:
                bad.append(f"synthetic_quads: {type(e).__name__}: {str(e)[:200]}")
                break
    for b in bad:
        print(b)
    print("device check: " + ("ok" if not bad else f"{len(bad)} failures"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
