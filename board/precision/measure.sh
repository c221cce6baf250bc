#!/usr/bin/env bash
# What "quantized" means on each aarch64 board, measured under qemu-user (board/README.md,
# "Precision per board"): for each precision, the quality against float through the shipped
# binary, and the guest instructions one 640x480 apply executes, counted by a qemu TCG plugin.
#
#   board/precision/measure.sh        (after board/cross-build.sh aarch64 --test)
#
# Needs: the aarch64 release binary and the `arm` test binary of that build ($CARGO_TARGET_DIR),
# qemu-user, gcc (the plugin), and models/train/.venv (onnxruntime, for the operator-form int8
# models; numpy and PIL, for the comparison). Writes $OUT (default /tmp/takumi-precision).
#
# Precisions: float; f16 (tract's f32_to_f16 transform); int8 as shipped (QDQ); int8 in operator
# form, static (QLinearConv/QLinearMatMul) and dynamic (ConvInteger/MatMulInteger), made by
# board/precision/qoperator.py. CPUs: qemu's cortex-a72 (Pi 4: no fp16 arithmetic, no dot
# product) and cortex-a76 (Pi 5; Orin's A78AE has the same ARMv8.2 extensions). Under qemu-user
# tract reads the host's /proc/cpuinfo and misses `asimdhp`, so the a76 runs add
# TRACT_CPU_ISA=+fp16, which is what tract detects on a real Pi 5; the dot product it finds in
# the auxiliary vector, which qemu fills per CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${CARGO_TARGET_DIR:-$PWD/target}/aarch64-unknown-linux-gnu/release
BIN=$T/takumi
TESTBIN=$(ls -t "$T"/deps/arm-* | grep -v '\.d$' | head -1)
OUT=${OUT:-/tmp/takumi-precision}
PY=${PY:-models/train/.venv/bin/python}
SYSROOT=/usr/aarch64-linux-gnu
mkdir -p "$OUT"
echo "binary $BIN, test binary $TESTBIN, results in $OUT"

gcc -shared -fPIC -O2 -o "$OUT/insn.so" board/precision/insn.c
for m in static dynamic; do
    [[ -e $OUT/models-$m/backbone.int8.onnx ]] ||
        "$PY" board/precision/qoperator.py "$OUT/models-$m" "$m" 2>&1 | grep -v -i warning
done

# NAME CPU PRECISION MODELS EXTRA_ENV
configs=(
    "float-a72 cortex-a72 float models -"
    "float-a76 cortex-a76 float models TRACT_CPU_ISA=+fp16"
    "f16-a76 cortex-a76 f16 models TRACT_CPU_ISA=+fp16"
    "f16-a72 cortex-a72 f16 models -"
    "int8qdq-a72 cortex-a72 int8 models -"
    "int8static-a72 cortex-a72 int8 $OUT/models-static -"
    "int8static-a76 cortex-a76 int8 $OUT/models-static TRACT_CPU_ISA=+fp16"
    "int8dynamic-a72 cortex-a72 int8 $OUT/models-dynamic -"
    "int8dynamic-a76 cortex-a76 int8 $OUT/models-dynamic TRACT_CPU_ISA=+fp16"
)
run() { # CPU EXTRA_ENV PROGRAM... (under qemu, as the board would run it)
    local cpu=$1 extra=$2
    shift 2
    local e=()
    [[ $extra == - ]] || e=("$extra")
    env "${e[@]}" qemu-aarch64 -cpu "$cpu" -L "$SYSROOT" "$@"
}

# --- quality, through the binary ---------------------------------------------------------------
# Two templates per precision, both applied to the pair's before image and to the three captures:
#  ref    learnt once, in float, as `learn` does by default. On the sample pair the closed-form
#         tone fit is all of it ("parts: hypernet +0.00 dB, tone +11.22 dB"), so only G's base
#         path and the grid offset carry it;
#  nofit  learnt by each precision with `learn --no-fit`: the template is H(A, A') alone, so the
#         hypernetwork and G's LoRA path, where quantisation can hurt, carry all of the edit.
# Each output is compared with float's (the same template kind) and with the pair's after image,
# registered (the pair is shifted by a few pixels; the analysis finds the integer shift).
pair=(--before models/samples/pair_before.jpg --after models/samples/pair_after.jpg)
[[ -d $OUT/store-ref ]] ||
    run cortex-a72 - "$BIN" learn --store "$OUT/store-ref" "${pair[@]}" --name ref >/dev/null
for c in "${configs[@]}"; do
    read -r name cpu precision models extra <<<"$c"
    d=$OUT/q/$name
    mkdir -p "$d"
    flags=(--models "$models" --precision "$precision")
    [[ -s $d/nofit-store.txt ]] || {
        rm -rf "$d/nofit-store"
        run "$cpu" "$extra" "$BIN" "${flags[@]}" learn --no-fit --store "$d/nofit-store" "${pair[@]}" \
            --name nofit >"$d/nofit-store.txt"
    }
    for img in models/samples/pair_before.jpg models/samples/captures/*.jpg; do
        for t in ref nofit; do
            o=$d/$t-$(basename "$img" .jpg).png
            store=$OUT/store-ref
            [[ $t == ref ]] || store=$d/nofit-store
            [[ -s $o ]] || run "$cpu" "$extra" "$BIN" "${flags[@]}" apply --store "$store" --template "$t" \
                --input "$img" --output "$o" >/dev/null
        done
    done
    [[ -s $d/kernels.txt ]] ||
        TAKUMI_LOG=takumi=debug run "$cpu" "$extra" "$BIN" "${flags[@]}" apply --store "$OUT/store-ref" \
            --template ref --input models/samples/captures/chelsea.jpg --output "$d/kernels.png" 2>&1 |
        grep -o 'models ([a-z0-9]*) run matmul kernels .*' >"$d/kernels.txt" || true
    echo "quality $name: done ($(cat "$d/kernels.txt"))"
done

# --- instructions per 640x480 apply ------------------------------------------------------------
count() { # CPU EXTRA_ENV PRECISION MODELS STAGE APPLIES -> guest instructions of the whole run
    local log
    log=$(mktemp)
    TAKUMI_PROBE_APPLIES=$6 TAKUMI_PROBE_PRECISION=$3 TAKUMI_PROBE_MODELS=$4 TAKUMI_PROBE_STAGE=$5 \
        TAKUMI_PROBE_STORE=$OUT/store-ref TAKUMI_PROBE_TEMPLATE=ref \
        run "$1" "$2" -plugin "$OUT/insn.so" -d plugin -D "$log" "$TESTBIN" --ignored --exact \
        probe_apply_640x480 --test-threads 1 >/dev/null 2>&1
    sed -n 's/^insns: //p' "$log"
    rm -f "$log"
}
touch "$OUT/insns.txt"
for c in "${configs[@]}"; do
    read -r name cpu precision models extra <<<"$c"
    for stage in apply backbone; do
        ! grep -q "^$name $stage " "$OUT/insns.txt" || continue
        n1=$(count "$cpu" "$extra" "$precision" "$models" "$stage" 1)
        n3=$(count "$cpu" "$extra" "$precision" "$models" "$stage" 3)
        echo "$name $stage $(((n3 - n1) / 2)) $n1 $n3" | tee -a "$OUT/insns.txt"
    done
done

"$PY" - "$OUT" <<'PYEOF'
"""The table: quality (dB) against float and against the pair's after image, and instructions."""
import math, os, sys
import numpy as np
from PIL import Image

out = sys.argv[1]
def img(p):
    return np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
def psnr(a, b):
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
after = img("models/samples/pair_after.jpg")
M = 8  # margin, and the largest shift tried
def registered(a, dx, dy):
    h, w, _ = a.shape
    return psnr(a[M:h - M, M:w - M], after[M + dy:h - M + dy, M + dx:w - M + dx])
ref = os.path.join(out, "q", "float-a72")
f0 = img(os.path.join(ref, "ref-pair_before.png"))
_, dx, dy = max((registered(f0, x, y), x, y) for x in range(-M, M + 1) for y in range(-M, M + 1))
caps = ["pair_before", "astronaut", "chelsea", "rocket"]
ins = {}
for line in open(os.path.join(out, "insns.txt")):
    name, stage, n, *_ = line.split()
    ins[(name, stage)] = int(n)
base = {t: registered(img(os.path.join(ref, f"{t}-pair_before.png")), dx, dy) for t in ("ref", "nofit")}
print(f"pair registered at dx={dx}, dy={dy}; float: ref {base['ref']:.2f} dB, nofit {base['nofit']:.2f} dB")
print("| config | matmul kernels | vs after, ref (Δ float) | vs after, nofit (Δ float) "
      "| vs float, min over 4 images: ref / nofit | Minsn per apply | Minsn backbone |")
print("|---|---|---|---|---|---|---|")
for name in sorted(os.listdir(os.path.join(out, "q"))):
    d = os.path.join(out, "q", name)
    cells = []
    for t in ("ref", "nofit"):
        p = registered(img(os.path.join(d, f"{t}-pair_before.png")), dx, dy)
        cells.append(f"{p:.2f} ({p - base[t]:+.3f})")
    fid = [min(psnr(img(os.path.join(d, f"{t}-{c}.png")), img(os.path.join(ref, f"{t}-{c}.png")))
               for c in caps) for t in ("ref", "nofit")]
    k = open(os.path.join(d, "kernels.txt")).read().strip().split("kernels ", 1)[-1]
    a, b = ins.get((name, "apply")), ins.get((name, "backbone"))
    mi = lambda n, f: f"{n / 1e6:{f}}" if n else "-"
    print(f"| {name} | {k} | {cells[0]} | {cells[1]} | {fid[0]:.1f} / {fid[1]:.1f} "
          f"| {mi(a, '.1f')} | {mi(b, '.2f')} |")
PYEOF
