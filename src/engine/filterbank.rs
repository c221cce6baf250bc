//! Full-resolution stages of G that run in Rust: gaussian filter bank, per-pixel features,
//! thumbnail and centre patch. Each matches `models/train/takumi_model.py` to within 1e-5 (see
//! tests/golden.rs).

use pulp::{Simd, WithSimd};

use super::model::{HUES, K, LBINS, LUMA, PATCH, SIGMAS, THUMB};
use super::{kernels, par};
use crate::Frame;

pub fn gauss_kernel(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as i64;
    let w: Vec<f32> = (-r..=r)
        .map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// Separable gaussian with replicate borders on one plane (see [`blur_into`]).
pub fn blur_plane(src: &[f32], w: usize, h: usize, kernel: &[f32], threads: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w * h];
    blur_into(&[src], w, h, &[], kernel, [&mut out], threads);
    out
}

/// The two blurred copies of the frame, `[sigma][channel]` planes.
pub struct Blurs {
    pub planes: [[Vec<f32>; 3]; 2],
}

/// The planes of the last dropped [`Blurs`], for the next frame of the same size: fresh pages
/// cost a fault each, and on the build machine the faults of six new planes took as long as
/// blurring them. Planes of another size are freed before anything is allocated, so a job's
/// peak memory is what it was without them.
static SPARE: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// The most planes [`SPARE`] keeps: G's six blurs.
const MOST_SPARE: usize = 6;

impl Drop for Blurs {
    fn drop(&mut self) {
        give_back(self.planes.iter_mut().flatten());
    }
}

/// Returns planes to [`SPARE`], which keeps only planes of their size.
fn give_back<'a>(planes: impl Iterator<Item = &'a mut Vec<f32>>) {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    for p in planes.map(std::mem::take).filter(|p| !p.is_empty()) {
        spare.retain(|s| s.len() == p.len());
        if spare.len() < MOST_SPARE {
            spare.push(p);
        }
    }
}

/// `N` planes of n values, from [`SPARE`] where it has them (their contents are overwritten).
fn take_planes<const N: usize>(n: usize) -> [Vec<f32>; N] {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    spare.retain(|p| p.len() == n);
    std::array::from_fn(|_| spare.pop().unwrap_or_else(|| vec![0.0f32; n]))
}

/// Six planes of n values for [`blurs`].
fn planes_of(n: usize) -> [[Vec<f32>; 3]; 2] {
    let mut flat = take_planes::<6>(n).into_iter();
    std::array::from_fn(|_| std::array::from_fn(|_| flat.next().unwrap_or_default()))
}

pub fn blurs(f: &Frame, threads: usize) -> Blurs {
    blurs_scaled(f, threads, 1.0)
}

/// [`blurs`] with every sigma times `k`: what learn reads where the after shot's pixels are
/// `k` of the frame's (a spatial edit is measured in the after shot's pixels, as its apply
/// will be in the capture's).
pub fn blurs_scaled(f: &Frame, threads: usize, k: f32) -> Blurs {
    const { assert!(SIGMAS[0] < SIGMAS[1]) };
    let (short, long) = (gauss_kernel(SIGMAS[0] * k), gauss_kernel(SIGMAS[1] * k));
    let n = f.width * f.height;
    let mut planes = planes_of(n);
    let [[s0, s1, s2], [l0, l1, l2]] = &mut planes;
    let srcs = [f.plane(0), f.plane(1), f.plane(2)];
    let outs = [s0, s1, s2, l0, l1, l2].map(|v| v.as_mut_slice());
    blur_into(&srcs, f.width, f.height, &short, &long, outs, threads);
    Blurs { planes }
}

/// Gaussians of the planes `srcs` (w x h, replicate borders) into `outs`: by `short` into
/// `outs[c]` (none when `short` is empty), by `long` into the last `srcs.len()` outputs.
/// Columns, then rows, on SIMD lanes of neighbouring pixels, in tiles of rows that stay in
/// cache; both kernels share the vertical pass's loads (the short one is centred in the long).
pub fn blur_into<const P: usize>(
    srcs: &[&[f32]],
    w: usize,
    h: usize,
    short: &[f32],
    long: &[f32],
    outs: [&mut [f32]; P],
    threads: usize,
) {
    assert!(short.len() <= long.len() && long.len() % 2 == 1);
    assert_eq!(P, srcs.len() * (1 + usize::from(!short.is_empty())));
    par::planes(outs, w, threads, |y0, mut bands| {
        let band = BlurBand {
            srcs,
            w,
            h,
            short,
            long,
            y0,
            outs: &mut bands,
        };
        kernels::simd(w, band)
    });
}

/// What [`blur_add`] adds to each tile of output rows once the blurs are in, while those rows
/// are still in cache (the residual stage's per-row terms, bank.rs): one pass over the output
/// instead of two.
pub trait TileAdd: Sync {
    /// What one thread keeps from tile to tile.
    type State;
    fn state(&self) -> Self::State;
    /// Adds to `outs`, the output rows from row `y` on.
    fn add<S: Simd>(&self, s: S, state: &mut Self::State, y: usize, outs: [&mut [f32]; 3]);
}

/// Adds gaussians of the three planes `srcs` to the three planes `outs` without keeping them:
/// `outs[c] += sum_ch weights[c][ch][0] * short(srcs[ch]) + weights[c][ch][1] * long(srcs[ch])`,
/// then `then`'s terms, tile by tile. An empty `short` is not computed (its weights must be 0).
/// As [`blur_into`], but each tile's blurred rows live in a tile-sized buffer, so no plane is
/// written and read back (the residual stage's own blurs, bank.rs).
#[allow(
    clippy::too_many_arguments,
    reason = "blur_into's arguments, the weights and what follows them"
)]
pub fn blur_add<T: TileAdd>(
    srcs: [&[f32]; 3],
    (w, h): (usize, usize),
    short: &[f32],
    long: &[f32],
    weights: [[[f32; 2]; 3]; 3],
    outs: [&mut [f32]; 3],
    then: &T,
    threads: usize,
) {
    assert!(short.len() <= long.len() && long.len() % 2 == 1);
    par::planes(outs, w, threads, |y0, bands| {
        let band = BlurAddBand {
            srcs,
            w,
            h,
            kernels: [short, long],
            weights,
            y0,
            outs: bands,
            then,
        };
        kernels::simd(w, band)
    });
}

/// One thread's rows of [`blur_add`].
struct BlurAddBand<'a, T> {
    srcs: [&'a [f32]; 3],
    w: usize,
    h: usize,
    kernels: [&'a [f32]; 2],
    weights: [[[f32; 2]; 3]; 3],
    y0: usize,
    outs: [&'a mut [f32]; 3],
    then: &'a T,
}

impl<T: TileAdd> WithSimd for BlurAddBand<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let w = self.w;
        let [short, long] = self.kernels;
        let n_rows = self.outs[0].len() / w;
        let mut tiles = [0, 1].map(|_| vec![0.0f32; TILE_ROWS * w]);
        let mut buf = vec![0.0f32; w + 2 * (long.len() / 2)];
        let mut outs = self.outs;
        let mut state = self.then.state();
        for t0 in (0..n_rows).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(n_rows - t0);
            for (ch, src) in self.srcs.iter().enumerate() {
                let wts = self.weights.map(|c| c[ch]);
                if wts.iter().flatten().all(|&v| v == 0.0) {
                    continue;
                }
                let ext = tile_rows(src, w, self.h, self.y0 + t0, rows, long.len());
                let [ts, tl] = &mut tiles;
                let (ts, tl) = (&mut ts[..rows * w], &mut tl[..rows * w]);
                vertical_tile(s, &ext, w, 0..rows, [short, long], [&mut *ts, &mut *tl]);
                horizontal_rows(s, ts, w, 0..rows, short, &mut buf);
                horizontal_rows(s, tl, w, 0..rows, long, &mut buf);
                for (o, [a, b]) in outs.iter_mut().zip(wts) {
                    let o = &mut o[t0 * w..(t0 + rows) * w];
                    axpy2(s, o, [a, b], [ts, tl]);
                }
            }
            let tile = outs.each_mut().map(|o| &mut o[t0 * w..(t0 + rows) * w]);
            self.then.add(s, &mut state, self.y0 + t0, tile);
        }
    }
}

/// out += a * x + b * y on SIMD lanes (nothing where both weights are zero). `x` is not read
/// where `a` is zero (a kernel [`blur_add`] did not compute); adding 0 * x changed no bit anyway.
#[inline(always)]
fn axpy2<S: Simd>(s: S, out: &mut [f32], [a, b]: [f32; 2], [x, y]: [&[f32]; 2]) {
    if a == 0.0 && b == 0.0 {
        return;
    }
    if a == 0.0 {
        let (b, step) = (s.splat_f32s(b), S::F32_LANES);
        for i in (0..out.len()).step_by(step) {
            let n = step.min(out.len() - i);
            let v = s.mul_add_e_f32s(b, load_n::<S>(&y[i..], n), load_n::<S>(&out[i..], n));
            store_n::<S>(&mut out[i..], n, v);
        }
        return;
    }
    let (a, b, step) = (s.splat_f32s(a), s.splat_f32s(b), S::F32_LANES);
    for i in (0..out.len()).step_by(step) {
        let n = step.min(out.len() - i);
        let v = load_n::<S>(&out[i..], n);
        let v = s.mul_add_e_f32s(a, load_n::<S>(&x[i..], n), v);
        let v = s.mul_add_e_f32s(b, load_n::<S>(&y[i..], n), v);
        store_n::<S>(&mut out[i..], n, v);
    }
}

/// One thread's rows of [`blur_into`].
struct BlurBand<'a, 'b, 'c> {
    srcs: &'a [&'a [f32]],
    w: usize,
    h: usize,
    short: &'a [f32],
    long: &'a [f32],
    y0: usize,
    outs: &'b mut [&'c mut [f32]],
}

/// Rows a band blurs at a time: their vertical pass's output, and the source rows its windows
/// cover, stay in L2 until the horizontal pass has read them again (1080p: 250 + 400 KB).
const TILE_ROWS: usize = 16;

impl WithSimd for BlurBand<'_, '_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let (w, n_src) = (self.w, self.srcs.len());
        let n_rows = self.outs[0].len() / w;
        let (shorts, longs) = self.outs.split_at_mut(self.outs.len() - n_src);
        let mut buf = vec![0.0f32; w + 2 * (self.long.len() / 2)];
        for t0 in (0..n_rows).step_by(TILE_ROWS) {
            let tile = t0..(t0 + TILE_ROWS).min(n_rows);
            for (c, src) in self.srcs.iter().enumerate() {
                let (out_s, out_l): (&mut [f32], &mut [f32]) = match shorts.get_mut(c) {
                    Some(o) => (o, &mut longs[c]),
                    None => (&mut [], &mut longs[c]),
                };
                let ext = tile_rows(src, w, self.h, self.y0 + t0, tile.len(), self.long.len());
                let kernels = [self.short, self.long];
                vertical_tile(
                    s,
                    &ext,
                    w,
                    tile.clone(),
                    kernels,
                    [&mut *out_s, &mut *out_l],
                );
                horizontal_rows(s, out_s, w, tile.clone(), self.short, &mut buf);
                horizontal_rows(s, out_l, w, tile.clone(), self.long, &mut buf);
            }
        }
    }
}

/// The source rows the windows of `n` output rows from row y need, clamped at the edges.
fn tile_rows(src: &[f32], w: usize, h: usize, y: usize, n: usize, taps: usize) -> Vec<&[f32]> {
    let r = taps / 2;
    (y..y + n + 2 * r)
        .map(|t| {
            let sy = t.saturating_sub(r).min(h - 1);
            &src[sy * w..(sy + 1) * w]
        })
        .collect()
}

/// Vertical pass of the band rows `tile` by kernels `[short, long]` into `[out_s, out_l]`, by column strips: a strip's
/// window of source rows (37 x 8 vectors) stays in L1 as it slides down the tile. Blocks of
/// vectors give independent FMA chains to hide their latency: 8 where there are 32 registers
/// (AVX-512), 4 on AVX2 and NEON.
#[inline(always)]
fn vertical_tile<S: Simd>(
    s: S,
    ext: &[&[f32]],
    w: usize,
    tile: std::ops::Range<usize>,
    kernels: [&[f32]; 2],
    outs: [&mut [f32]; 2],
) {
    let step = S::F32_LANES;
    if S::REGISTER_COUNT >= 32 && w >= 8 * step {
        vertical_strips::<S, 8>(s, ext, w, tile, kernels, outs);
    } else if w >= 4 * step {
        vertical_strips::<S, 4>(s, ext, w, tile, kernels, outs);
    } else {
        vertical_strips::<S, 1>(s, ext, w, tile, kernels, outs);
    }
}

#[inline(always)]
fn vertical_strips<S: Simd, const B: usize>(
    s: S,
    ext: &[&[f32]],
    w: usize,
    tile: std::ops::Range<usize>,
    [short, long]: [&[f32]; 2],
    [out_s, out_l]: [&mut [f32]; 2],
) {
    for x in starts(w, B * S::F32_LANES) {
        for (i, dy) in tile.clone().enumerate() {
            let window = &ext[i..i + long.len()];
            let vs: &mut [f32] = if short.is_empty() {
                &mut []
            } else {
                &mut out_s[dy * w..(dy + 1) * w]
            };
            vertical_block::<S, B>(
                s,
                window,
                short,
                long,
                x,
                vs,
                &mut out_l[dy * w..(dy + 1) * w],
            );
        }
    }
}

/// The horizontal pass of band rows `tile` of `out`, in place (none for an empty kernel).
#[inline(always)]
fn horizontal_rows<S: Simd>(
    s: S,
    out: &mut [f32],
    w: usize,
    tile: std::ops::Range<usize>,
    k: &[f32],
    buf: &mut [f32],
) {
    if k.is_empty() {
        return;
    }
    let r = k.len() / 2;
    let p = &mut buf[..w + 2 * r];
    for dy in tile {
        let row = &mut out[dy * w..(dy + 1) * w];
        p[r..r + w].copy_from_slice(row);
        pad(p, r, w);
        horizontal(s, p, k, row);
    }
}

/// Replicates a row's end values into its r-wide margins.
fn pad(p: &mut [f32], r: usize, w: usize) {
    let (first, last) = (p[r], p[r + w - 1]);
    p[..r].fill(first);
    p[r + w..].fill(last);
}

/// The widest vector pulp gives: AVX-512's 16 f32.
pub(crate) const MAX_LANES: usize = 16;

/// One vector from the start of `s`, which holds at least one.
#[inline(always)]
pub(crate) fn load<S: Simd>(s: &[f32]) -> S::f32s {
    S::as_simd_f32s(s).0[0]
}

#[inline(always)]
pub(crate) fn store<S: Simd>(s: &mut [f32], v: S::f32s) {
    S::as_mut_simd_f32s(s).0[0] = v;
}

/// Lanes from `row[..n]`, n <= lanes; a short group repeats its last pixel, so the lanes' bin
/// range stays the group's own.
#[inline(always)]
pub(crate) fn load_n<S: Simd>(row: &[f32], n: usize) -> S::f32s {
    if n == S::F32_LANES {
        return load::<S>(row);
    }
    let mut buf = [row[n - 1]; MAX_LANES];
    buf[..n].copy_from_slice(&row[..n]);
    load::<S>(&buf)
}

#[inline(always)]
pub(crate) fn store_n<S: Simd>(row: &mut [f32], n: usize, v: S::f32s) {
    if n == S::F32_LANES {
        return store::<S>(row, v);
    }
    let mut buf = [0.0f32; MAX_LANES];
    store::<S>(&mut buf, v);
    row[..n].copy_from_slice(&buf[..n]);
}

/// Starts of `step`-wide column blocks covering 0..w; the last block is moved back to end at w,
/// recomputing some columns to the same values (every column's sum runs the same way). w >= step.
#[inline(always)]
fn starts(w: usize, step: usize) -> impl Iterator<Item = usize> {
    (0..w.div_ceil(step)).map(move |i| (i * step).min(w - step))
}

/// `B` vectors of columns from x on, as vectors: one bounds check for all of them.
#[inline(always)]
fn cols<S: Simd, const B: usize>(row: &[f32], x: usize) -> &[S::f32s] {
    S::as_simd_f32s(&row[x..x + B * S::F32_LANES]).0
}

/// The gaussians are symmetric bit for bit ([`gauss_kernel`]), so taps t and 2r - t share a
/// weight: each pair is summed first, which halves the FMA chains. Accumulators pass by value,
/// element by element: behind a reference or a slice copy they stay on the stack.
#[inline(always)]
fn vertical_block<S: Simd, const B: usize>(
    s: S,
    window: &[&[f32]],
    short: &[f32],
    long: &[f32],
    x: usize,
    vs: &mut [f32],
    vl: &mut [f32],
) {
    let zero = s.splat_f32s(0.0);
    let (mut acc_s, mut acc_l) = ([zero; B], [zero; B]);
    let (r, off) = (long.len() / 2, (long.len() - short.len()) / 2);
    // taps of the long kernel alone, then of both, then the centre: no test per vector
    for t in 0..off {
        let v = pair_sum::<S, B>(s, window[t], window[2 * r - t], x);
        let kl = s.splat_f32s(long[t]);
        for i in 0..B {
            acc_l[i] = s.mul_add_e_f32s(kl, v[i], acc_l[i]);
        }
    }
    for t in off..r {
        let v = pair_sum::<S, B>(s, window[t], window[2 * r - t], x);
        let (kl, ks) = (s.splat_f32s(long[t]), s.splat_f32s(short[t - off]));
        for i in 0..B {
            acc_l[i] = s.mul_add_e_f32s(kl, v[i], acc_l[i]);
            acc_s[i] = s.mul_add_e_f32s(ks, v[i], acc_s[i]);
        }
    }
    let v = cols::<S, B>(window[r], x);
    let kl = s.splat_f32s(long[r]);
    let ks = s.splat_f32s(short.get(r - off).copied().unwrap_or(0.0));
    for i in 0..B {
        acc_l[i] = s.mul_add_e_f32s(kl, v[i], acc_l[i]);
        acc_s[i] = s.mul_add_e_f32s(ks, v[i], acc_s[i]);
    }
    put::<S, B>(vl, x, acc_l);
    if !short.is_empty() {
        put::<S, B>(vs, x, acc_s);
    }
}

/// a[x..] + b[x..], B vectors.
#[inline(always)]
fn pair_sum<S: Simd, const B: usize>(s: S, a: &[f32], b: &[f32], x: usize) -> [S::f32s; B] {
    let (a, b) = (cols::<S, B>(a, x), cols::<S, B>(b, x));
    let mut v = [s.splat_f32s(0.0); B];
    for i in 0..B {
        v[i] = s.add_f32s(a[i], b[i]);
    }
    v
}

/// Stores B vectors at column x.
#[inline(always)]
#[allow(
    clippy::manual_memcpy,
    reason = "copy_from_slice kept the accumulators on the stack"
)]
fn put<S: Simd, const B: usize>(out: &mut [f32], x: usize, acc: [S::f32s; B]) {
    let out = S::as_mut_simd_f32s(&mut out[x..x + B * S::F32_LANES]).0;
    for b in 0..B {
        out[b] = acc[b];
    }
}

/// out[x] = sum_t k[t] p[x + t] for x in 0..out.len(), `p` padded by k.len() / 2 each side.
#[inline(always)]
fn horizontal<S: Simd>(s: S, p: &[f32], k: &[f32], out: &mut [f32]) {
    let (w, step) = (out.len(), S::F32_LANES);
    if S::REGISTER_COUNT >= 32 && w >= 8 * step {
        for x in starts(w, 8 * step) {
            horizontal_block::<S, 8>(s, p, k, x, out);
        }
    } else if w >= 4 * step {
        for x in starts(w, 4 * step) {
            horizontal_block::<S, 4>(s, p, k, x, out);
        }
    } else {
        for x in starts(w, step) {
            horizontal_block::<S, 1>(s, p, k, x, out);
        }
    }
}

/// As [`vertical_block`], along the row.
#[inline(always)]
fn horizontal_block<S: Simd, const B: usize>(
    s: S,
    p: &[f32],
    k: &[f32],
    x: usize,
    out: &mut [f32],
) {
    let r = k.len() / 2;
    let mut acc = [s.splat_f32s(0.0); B];
    for (t, &kt) in k[..r].iter().enumerate() {
        let (a, b) = (cols::<S, B>(p, x + t), cols::<S, B>(p, x + 2 * r - t));
        let kt = s.splat_f32s(kt);
        for i in 0..B {
            acc[i] = s.mul_add_e_f32s(kt, s.add_f32s(a[i], b[i]), acc[i]);
        }
    }
    let (c, kc) = (cols::<S, B>(p, x + r), s.splat_f32s(k[r]));
    for i in 0..B {
        acc[i] = s.mul_add_e_f32s(kc, c[i], acc[i]);
    }
    put::<S, B>(out, x, acc);
}

#[inline]
pub fn luminance(r: f32, g: f32, b: f32) -> f32 {
    (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).clamp(0.0, 1.0)
}

pub(crate) const HUE_DIRS: [(f32, f32); HUES] = {
    // cos/sin of 60 degree steps
    [
        (1.0, 0.0),
        (0.5, 0.866_025_4),
        (-0.5, 0.866_025_4),
        (-1.0, 0.0),
        (-0.5, -0.866_025_4),
        (0.5, -0.866_025_4),
    ]
};

/// Chroma in six hue sectors, from opponent coordinates.
#[inline]
pub fn hue_features(r: f32, g: f32, b: f32, out: &mut [f32; HUES]) {
    let oa = r - 0.5 * (g + b);
    let ob = 0.866_025_4 * (g - b);
    let c = (oa * oa + ob * ob + 1e-6).sqrt();
    for (o, (cs, sn)) in out.iter_mut().zip(HUE_DIRS) {
        let p = (oa * cs + ob * sn).max(0.0);
        *o = p * p / c;
    }
}

/// The K features of one pixel: colour, blur 1, blur 2, 1, six hue-sector chroma terms.
#[inline]
pub fn pixel_features(rgb: [f32; 3], b0: [f32; 3], b1: [f32; 3], f: &mut [f32; K]) {
    f[0..3].copy_from_slice(&rgb);
    f[3..6].copy_from_slice(&b0);
    f[6..9].copy_from_slice(&b1);
    f[9] = 1.0;
    let mut h = [0.0; HUES];
    hue_features(rgb[0], rgb[1], rgb[2], &mut h);
    f[10..16].copy_from_slice(&h);
}

/// Pixel `i`'s features and luminance bins, from the frame and its blurs: what slicing and the
/// closed-form fit both consume.
#[inline]
pub fn pixel_at(
    frame: &Frame,
    blurs: &Blurs,
    i: usize,
    f: &mut [f32; K],
) -> ([f32; 3], (usize, f32, f32)) {
    let n = frame.width * frame.height;
    let rgb = [frame.data[i], frame.data[n + i], frame.data[2 * n + i]];
    let [p0, p1] = &blurs.planes;
    pixel_features(
        rgb,
        [p0[0][i], p0[1][i], p0[2][i]],
        [p1[0][i], p1[1][i], p1[2][i]],
        f,
    );
    (rgb, lum_bins(luminance(rgb[0], rgb[1], rgb[2])))
}

/// Hat weights of the luminance bins: (first bin, its weight, weight of the next bin).
#[inline]
pub fn lum_bins(lum: f32) -> (usize, f32, f32) {
    let y = lum * (LBINS - 1) as f32;
    let l0 = (y.floor() as usize).min(LBINS - 1);
    let w1 = y - l0 as f32;
    (l0, 1.0 - w1, w1)
}

/// Adaptive average pooling to THUMB x THUMB (PyTorch's bin edges), on one thread.
pub fn thumbnail(f: &Frame) -> Vec<f32> {
    thumbnail_on(f, 1)
}

/// [`thumbnail`] with its rows of bins split over `threads`: on one thread it was an eighth of
/// the apply at 1080p (4.2 ms of 31, `takumi bench`). Each band of rows is summed into column
/// sums first, a pass over contiguous rows that vectorises, then each bin adds its columns; sums
/// in f64, as before.
pub fn thumbnail_on(f: &Frame, threads: usize) -> Vec<f32> {
    let (w, h) = (f.width, f.height);
    let mut out = vec![0.0f32; 3 * THUMB * THUMB];
    let (r, gb) = out.split_at_mut(THUMB * THUMB);
    let (g, b) = gb.split_at_mut(THUMB * THUMB);
    super::par::planes([r, g, b], THUMB, threads, |ty0, bands| {
        let mut cols = vec![0.0f64; w];
        for (c, band) in bands.into_iter().enumerate() {
            let p = f.plane(c);
            for (dy, out) in band.chunks_mut(THUMB).enumerate() {
                let ty = ty0 + dy;
                let (y0, y1) = (ty * h / THUMB, ((ty + 1) * h).div_ceil(THUMB));
                cols.fill(0.0);
                for row in p[y0 * w..y1 * w].chunks_exact(w) {
                    for (s, &v) in cols.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
                for (tx, o) in out.iter_mut().enumerate() {
                    let (x0, x1) = (tx * w / THUMB, ((tx + 1) * w).div_ceil(THUMB));
                    let s: f64 = cols[x0..x1].iter().sum();
                    *o = (s / ((y1 - y0) * (x1 - x0)) as f64) as f32;
                }
            }
        }
    });
    out
}

/// Native-resolution PATCH x PATCH centre crop (the caller guarantees the frame is large enough).
pub fn centre_patch(f: &Frame) -> Vec<f32> {
    let (t, l) = ((f.height - PATCH) / 2, (f.width - PATCH) / 2);
    f.crop(l, t, PATCH, PATCH).data
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar blur this module replaced: rows, then columns, on one plane.
    fn reference(src: &[f32], w: usize, h: usize, kernel: &[f32]) -> Vec<f32> {
        let r = kernel.len() as i64 / 2;
        let at = |x: i64, y: i64| {
            src[y.clamp(0, h as i64 - 1) as usize * w + x.clamp(0, w as i64 - 1) as usize]
        };
        let mut tmp = vec![0.0f32; w * h];
        for (i, t) in tmp.iter_mut().enumerate() {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            *t = kernel
                .iter()
                .enumerate()
                .map(|(j, k)| k * at(x + j as i64 - r, y))
                .sum();
        }
        let at = |x: usize, y: i64| tmp[y.clamp(0, h as i64 - 1) as usize * w + x];
        (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, (i / w) as i64);
                kernel
                    .iter()
                    .enumerate()
                    .map(|(j, k)| k * at(x, y + j as i64 - r))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn simd_blurs_match_the_scalar_reference() {
        // 7 wide runs pulp's scalar path; 5 rows are fewer than the long kernel's radius
        for (w, h) in [(7, 40), (16, 5), (70, 50), (203, 61)] {
            let f = Frame {
                width: w,
                height: h,
                data: (0..3 * w * h).map(|i| (i as f32 * 0.618).fract()).collect(),
            };
            let b = blurs(&f, 3);
            for (s, sigma) in SIGMAS.iter().enumerate() {
                for c in 0..3 {
                    let want = reference(f.plane(c), w, h, &gauss_kernel(*sigma));
                    let d = b.planes[s][c]
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max);
                    assert!(d <= 1e-6, "{w}x{h} sigma {sigma}: {d}");
                    let one = blur_plane(f.plane(c), w, h, &gauss_kernel(*sigma), 1);
                    assert_eq!(
                        one, b.planes[s][c],
                        "{w}x{h}: one kernel or two, one band or three"
                    );
                }
            }
        }
    }

    /// The thumbnail split over threads is the one-thread thumbnail, bit for bit, on frames
    /// whose bins do and do not divide them evenly.
    #[test]
    fn thumbnail_on_threads_is_the_one_thread_thumbnail() {
        for (w, h) in [(64, 64), (203, 97), (640, 480)] {
            let f = Frame {
                width: w,
                height: h,
                data: (0..3 * w * h).map(|i| (i as f32 * 0.618).fract()).collect(),
            };
            let one = thumbnail(&f);
            for threads in [2, 3, 5] {
                assert_eq!(thumbnail_on(&f, threads), one, "{w}x{h}, {threads} threads");
            }
        }
    }
}
