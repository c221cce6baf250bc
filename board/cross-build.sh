#!/usr/bin/env bash
# Cross build for the ARM boards with plain cargo (no Docker/Podman needed; with one, see cross.toml).
#
#   board/cross-build.sh aarch64|armv7 [--test|--smoke]
#
# 1. installs what is missing (idempotent): the rustup target, Debian's cross gcc and libc dev
#    (with the target's linux headers, for the v4l feature's bindgen), qemu-user, libclang-dev;
# 2. builds the shipped binary: cargo build --release --locked --target TRIPLE --features v4l
#    -> $CARGO_TARGET_DIR/TRIPLE/release/takumi (CARGO_TARGET_DIR defaults to target/; with
#    CROSS_PROFILE=P, --profile P and .../TRIPLE/P/takumi);
#    the linker, the qemu runner and bindgen's sysroot come from .cargo/config.toml;
# 3. with --test, under qemu-user (the runner in .cargo/config.toml; Cortex-A72 for aarch64,
#    NEON forced for armv7):
#    - the engine's golden vectors (tests/golden.rs), the store tests (tests/store.rs) and the
#      kernel evidence (tests/arm.rs), in step 2's profile: they reuse the build of step 2,
#      where the dev profile would build every dependency a second time;
#    - a `takumi apply` smoke test on the sample pair: learn on the x86 host, apply the template
#      to the three models/samples/captures/ with the ARM binary, and compare with the host's output
#      (SMOKE_MAX_ABS, in 8-bit levels per channel, and SMOKE_MIN_PSNR dB); then learn the same
#      pair with the ARM binary too and compare end to end; and the kernels the shipped binary
#      logs at start-up must be the target's SIMD ones.
#    --smoke runs only the smoke test and the kernel check: no test binaries to build (each is
#    a fat-LTO link of tract, the dearest step of CI), for the second target in CI.
#
# Env: CARGO_TARGET_DIR; CROSS_PROFILE (default release, the shipped binary; CI uses ci-arm,
# release without fat LTO: see Cargo.toml); HOST_TAKUMI (the x86 reference binary; default:
# `cargo build --locked`, i.e. $CARGO_TARGET_DIR/debug/takumi, which CI's `cargo test` has
# already built).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 aarch64|armv7 [--test|--smoke]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
arch=$1
run_tests=0 run_smoke=0
if [[ $# -eq 2 ]]; then
    case $2 in
    --test) run_tests=1 run_smoke=1 ;;
    --smoke) run_smoke=1 ;;
    *) usage ;;
    esac
fi
case $arch in
aarch64)
    triple=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu deb=arm64 qemu=qemu-aarch64
    ;;
armv7)
    triple=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf deb=armhf qemu=qemu-arm
    ;;
*) usage ;;
esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
profile=${CROSS_PROFILE:-release}
# the smoke test's tolerance against x86 (see board/README.md, "ARM builds")
SMOKE_MAX_ABS=${SMOKE_MAX_ABS:-2}
SMOKE_MIN_PSNR=${SMOKE_MIN_PSNR:-45}

step() {
    echo "== cross-build $arch: $*"
}
timed() {
    local t0=$SECONDS
    "$@"
    echo "== cross-build $arch: $1 ${2:-} took $((SECONDS - t0)) s"
}

# --- 1. install what is missing -------------------------------------------------------------
missing=()
for p in "gcc-$gnu" "libc6-dev-$deb-cross" "linux-libc-dev-$deb-cross" libclang-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-user (Debian 12: also qemu-user-static, whose binaries end in -static) has the emulator
command -v "$qemu" >/dev/null || missing+=(qemu-user)
command -v python3 >/dev/null || missing+=(python3)
if [[ ${#missing[@]} -gt 0 ]]; then
    step "installing ${missing[*]}"
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! rustup target list --installed | grep -qx "$triple"; then
    step "rustup target add $triple"
    rustup target add "$triple"
fi

# --- 2. the binary (release unless CROSS_PROFILE) ------------------------------------------
step "cargo build --profile $profile --locked --target $triple --features v4l"
timed cargo build --profile "$profile" --locked --target "$triple" --features v4l
bin=$CARGO_TARGET_DIR/$triple/$profile/takumi
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "== cross-build $arch: $bin: $(stat -c %s "$bin") bytes (stripped), needs glibc >= ${glibc#GLIBC_}"

[[ $run_smoke -eq 1 ]] || exit 0

# --- 3. under qemu --------------------------------------------------------------------------
# Two store tests re-execute their own test binary (a writer killed with SIGKILL; a child in a
# private tmpfs); qemu-user cannot exec a foreign binary without binfmt_misc, so they are left to
# the host run, where they test the same file-system guarantees.
if [[ $run_tests -eq 1 ]]; then
    step "tests under $qemu: golden, store, arm"
    timed cargo test --profile "$profile" --locked --target "$triple" --features v4l \
        --test golden --test store --test arm -- \
        --skip sigkill_during_saves_never_leaves_a_broken_template \
        --skip full_disk_is_an_io_error_and_keeps_the_old_template
fi

step "takumi apply smoke test under $qemu against x86"
host=${HOST_TAKUMI:-}
if [[ -z $host ]]; then
    cargo build --locked --bin takumi
    host=$CARGO_TARGET_DIR/debug/takumi
fi
# the runner of .cargo/config.toml, as cargo would call it
runner=("$qemu" -L "/usr/$gnu")
if [[ $arch == aarch64 ]]; then
    runner=("$qemu" -cpu cortex-a72 -L "/usr/$gnu")
else
    runner=(env TRACT_CPU_ARM32_NEON=1 "$qemu" -cpu cortex-a15 -L "/usr/$gnu")
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pair=(--before models/samples/pair_before.jpg --after models/samples/pair_after.jpg)
# each capture to a PNG (a folder output would keep the inputs' .jpg, and JPEG is lossy)
apply_captures() { # STORE OUT TAKUMI...
    local store=$1 out=$2
    shift 2
    mkdir -p "$out"
    for c in models/samples/captures/*.jpg; do
        "$@" apply --store "$store" --template smoke --input "$c" --output "$out/$(basename "$c" .jpg).png"
    done
}
"$host" learn --store "$work/x86-store" "${pair[@]}" --name smoke
apply_captures "$work/x86-store" "$work/x86" "$host"
t0=$SECONDS
apply_captures "$work/x86-store" "$work/arm-apply" "${runner[@]}" "$bin"
echo "== cross-build $arch: apply of the x86 template to 3 captures under $qemu took $((SECONDS - t0)) s"
t0=$SECONDS
"${runner[@]}" "$bin" learn --store "$work/arm-store" "${pair[@]}" --name smoke
apply_captures "$work/arm-store" "$work/arm-learn" "${runner[@]}" "$bin"
echo "== cross-build $arch: learn + apply to 3 captures under $qemu took $((SECONDS - t0)) s"
# same kernels as tests/arm.rs, from the shipped binary's own start-up log
TAKUMI_LOG=takumi=debug "${runner[@]}" "$bin" templates list --store "$work/arm-store" 2>&1 |
    grep -o 'tract-linalg kernels: .*' | tee "$work/kernels"
want=$([[ $arch == aarch64 ]] && echo arm64simd_mmm_f32 || echo armv7neon_mmm_f32)
grep -q "$want" "$work/kernels" || { echo "error: the $arch binary did not pick $want" >&2; exit 1; }
! grep -qi sve "$work/kernels" || { echo "error: the $arch binary picked an SVE kernel" >&2; exit 1; }

python3 - "$work" "$SMOKE_MAX_ABS" "$SMOKE_MIN_PSNR" <<'EOF'
"""Compares the ARM outputs with x86's, per channel in 8-bit levels (PNG, decoded here)."""
import math, os, struct, sys, zlib

def png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0, (path, depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw, stride = zlib.decompress(idat), w * bpp
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        f, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1: row[i] = (row[i] + a) & 255
            elif f == 2: row[i] = (row[i] + b) & 255
            elif f == 3: row[i] = (row[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += row
        prev = row
    return w, h, bytes(out)

work, max_abs_tol, min_psnr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
passed = failed = 0
for run in ("arm-apply", "arm-learn"):
    for name in sorted(os.listdir(os.path.join(work, "x86"))):
        a = png(os.path.join(work, "x86", name))
        b = png(os.path.join(work, run, name))
        assert a[:2] == b[:2], (name, a[:2], b[:2])
        diffs = [abs(x - y) for x, y in zip(a[2], b[2])]
        worst, mse = max(diffs), sum(d * d for d in diffs) / len(diffs)
        psnr = math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)
        differ = sum(d > 0 for d in diffs)
        good = worst <= max_abs_tol and psnr >= min_psnr
        passed, failed = passed + good, failed + (not good)
        print(f"smoke {run}/{name}: max abs diff {worst}/255, {differ} of {len(diffs)} values "
              f"differ, PSNR {psnr:.1f} dB vs x86: {'ok' if good else 'FAILED'}")
print(f"smoke: tolerance max abs diff <= {max_abs_tol}/255 and PSNR >= {min_psnr} dB")
print(f"smoke: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
EOF
