//! The residual stage: a closed-form linear map, stored in the template, that runs after G on
//! features G's grid cannot express: more blur scales (detail layers are their differences
//! with the colour) and smooth position terms for vignette and lens shading.
//! out_c = G(delta, x)_c + sum_j w[j][c] * phi_j(x).
//!
//! Feature order (`NF` = 39): colour (3), blurs at sigma 1, 1.5, 2.5, 6, 12 (3 each), a bias,
//! then position: u, v, r2, r2^2, r2^3, and each of u, v, r2, r2^2, r2^3 times the colour
//! (u, v in [-1, 1] across the frame; r2 = (u^2 + v^2) / 2, 1 in the corners).

use super::filterbank::{Blurs, blur_into, blur_plane, gauss_kernel};
use super::par;
use crate::Frame;

pub const NF: usize = 39;
/// Feature indices of the bank group (colour, blurs, bias) and of the position group.
pub const BANK: std::ops::Range<usize> = 0..BIAS + 1;
pub const POSITION: std::ops::Range<usize> = BIAS + 1..NF;
const BIAS: usize = 18;
/// The blurred planes (sigma 1, 1.5, 2.5, 6, 12; each `[r, g, b]`) within the bank group.
pub const BLURS: std::ops::Range<usize> = 3..BIAS;
/// Blurs the residual stage adds to G's (sigma 1.5 and 6); sigma 12 runs at quarter resolution.
const SIGMA_FINE: f32 = 1.0;
const SIGMA_MID: f32 = 2.5;
const SIGMA_WIDE: f32 = 12.0;
const WIDE_STEP: usize = 4;

/// The extra blurred planes of one frame, `[sigma 1, 2.5, 12][channel]`; empty when the
/// residual's bank group is all zero (nothing to compute).
pub struct Planes {
    blurs: Vec<[Vec<f32>; 3]>,
}

/// Whether weights `w` (`NF x 3`, feature-major) use any feature of `range`.
pub fn uses(w: &[f32], range: std::ops::Range<usize>) -> bool {
    w.len() == NF * 3
        && range
            .clone()
            .any(|j| w[3 * j..3 * j + 3].iter().any(|&v| v != 0.0))
}

pub fn planes(f: &Frame, need_blurs: bool, threads: usize) -> Planes {
    if !need_blurs {
        return Planes { blurs: Vec::new() };
    }
    let (w, h) = (f.width, f.height);
    let (k1, k2) = (gauss_kernel(SIGMA_FINE), gauss_kernel(SIGMA_MID));
    let mut fine: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; w * h]);
    let mut mid: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; w * h]);
    let [f0, f1, f2] = &mut fine;
    let [m0, m1, m2] = &mut mid;
    let outs = [f0, f1, f2, m0, m1, m2].map(|v| v.as_mut_slice());
    let srcs = [f.plane(0), f.plane(1), f.plane(2)];
    blur_into(&srcs, w, h, &k1, &k2, outs, threads);
    let wide = std::array::from_fn(|c| wide_blur(f.plane(c), w, h, threads));
    Planes {
        blurs: vec![fine, mid, wide],
    }
}

/// A sigma-12 gaussian as a box-downsample by 4, a sigma-3 blur and a bilinear upsample:
/// 16x fewer taps than at full resolution, and the result is smooth either way.
fn wide_blur(p: &[f32], w: usize, h: usize, threads: usize) -> Vec<f32> {
    let (ws, hs) = (w.div_ceil(WIDE_STEP), h.div_ceil(WIDE_STEP));
    let mut small = vec![0.0f32; ws * hs];
    for ys in 0..hs {
        for xs in 0..ws {
            let (y0, x0) = (ys * WIDE_STEP, xs * WIDE_STEP);
            let (y1, x1) = ((y0 + WIDE_STEP).min(h), (x0 + WIDE_STEP).min(w));
            let mut s = 0.0f32;
            for y in y0..y1 {
                s += p[y * w + x0..y * w + x1].iter().sum::<f32>();
            }
            small[ys * ws + xs] = s / ((y1 - y0) * (x1 - x0)) as f32;
        }
    }
    let k = gauss_kernel(SIGMA_WIDE / WIDE_STEP as f32);
    let small = blur_plane(&small, ws, hs, &k, 1);
    let mut out = vec![0.0f32; w * h];
    let src = |d: usize, n: usize| {
        let s = ((d as f32 + 0.5) / WIDE_STEP as f32 - 0.5).clamp(0.0, (n - 1) as f32);
        let i0 = s as usize;
        (i0, (i0 + 1).min(n - 1), s - i0 as f32)
    };
    let xs: Vec<_> = (0..w).map(|x| src(x, ws)).collect();
    par::rows(&mut out, w, threads, |y0, band| {
        for (dy, row) in band.chunks_mut(w).enumerate() {
            let (a, b, fy) = src(y0 + dy, hs);
            let (ra, rb) = (&small[a * ws..(a + 1) * ws], &small[b * ws..(b + 1) * ws]);
            for (o, &(i0, i1, fx)) in row.iter_mut().zip(&xs) {
                let top = ra[i0] + fx * (ra[i1] - ra[i0]);
                let bot = rb[i0] + fx * (rb[i1] - rb[i0]);
                *o = top + fy * (bot - top);
            }
        }
    });
    out
}

/// Normalised position of column x / row y: -1 at the first, +1 at the last.
#[inline]
fn coord(i: usize, n: usize) -> f32 {
    if n > 1 {
        2.0 * i as f32 / (n - 1) as f32 - 1.0
    } else {
        0.0
    }
}

/// All `NF` features of pixel (x, y). Blur features are 0 when `planes` holds none.
#[inline]
pub fn features(f: &Frame, g: &Blurs, planes: &Planes, x: usize, y: usize, out: &mut [f32; NF]) {
    let rgb = colour_features(f, g, planes, y * f.width + x, out);
    position(
        coord(x, f.width),
        coord(y, f.height),
        rgb,
        position_slot(out),
    );
}

/// The position group's part of a feature vector.
#[inline]
fn position_slot(out: &mut [f32; NF]) -> &mut [f32; POSITION_LEN] {
    let (_, pos) = out.split_at_mut(POSITION.start);
    pos.try_into().unwrap_or_else(|_| unreachable!())
}

/// The bank group's features of pixel i (colour, blurs, bias); returns the colour.
#[inline]
fn colour_features(
    f: &Frame,
    g: &Blurs,
    planes: &Planes,
    i: usize,
    out: &mut [f32; NF],
) -> [f32; 3] {
    let n = f.width * f.height;
    let rgb = [f.data[i], f.data[n + i], f.data[2 * n + i]];
    out[BANK].fill(0.0);
    out[..3].copy_from_slice(&rgb);
    for c in 0..3 {
        out[6 + c] = g.planes[0][c][i];
        out[12 + c] = g.planes[1][c][i];
    }
    if let [b1, b25, b12] = planes.blurs.as_slice() {
        for c in 0..3 {
            out[3 + c] = b1[c][i];
            out[9 + c] = b25[c][i];
            out[15 + c] = b12[c][i];
        }
    }
    out[BIAS] = 1.0;
    rgb
}

/// Features of the position group.
pub const POSITION_LEN: usize = NF - POSITION.start;

/// The position terms at normalised coordinates (u, v) for colour `rgb`.
#[inline]
pub fn position(u: f32, v: f32, rgb: [f32; 3], out: &mut [f32; POSITION_LEN]) {
    let r2 = 0.5 * (u * u + v * v);
    let pos = [u, v, r2, r2 * r2, r2 * r2 * r2];
    out[..5].copy_from_slice(&pos);
    for (k, p) in pos.iter().enumerate() {
        for c in 0..3 {
            out[5 + 3 * k + c] = p * rgb[c];
        }
    }
}

/// Adds the residual stage to `out` (G's result on `src`), in place. `w` is `NF x 3`.
///
/// Feature by feature over whole rows (out += w_j * phi_j), not pixel by pixel: each step is a
/// contiguous multiply-add that vectorises, where a per-pixel dot product of 39 features was a
/// chain of dependent adds (4x G alone at 640x480 before). Features with zero weight are skipped.
pub fn apply(out: &mut Frame, src: &Frame, g: &Blurs, w: &[f32], threads: usize) {
    if w.len() != NF * 3 || w.iter().all(|&v| v == 0.0) {
        return;
    }
    let planes = planes(
        src,
        uses(w, 3..6) || uses(w, 9..12) || uses(w, 15..18),
        threads,
    );
    let bank = bank_planes(src, g, &planes);
    let with_position = uses(w, POSITION);
    let (width, height) = (src.width, src.height);
    let us: Vec<f32> = (0..width).map(|x| coord(x, width)).collect();
    let n = width * height;
    let (o0, rest) = out.data.split_at_mut(n);
    let (o1, o2) = rest.split_at_mut(n);
    par::planes([o0, o1, &mut o2[..n]], width, threads, |y0, bands| {
        let mut pos = [(); 5].map(|_| vec![0.0f32; width]);
        let rows = bands.map(|b| b.chunks_mut(width));
        for (dy, mut outs) in rows_of(rows).enumerate() {
            let i0 = (y0 + dy) * width;
            let row = |p| row_at(p, i0, width);
            if with_position {
                position_rows(&us, coord(y0 + dy, height), &mut pos);
            }
            for (c, o) in outs.iter_mut().enumerate() {
                let wc = |j: usize| w[3 * j + c];
                for (j, p) in &bank {
                    axpy(o, wc(*j), row(p));
                }
                let bias = wc(BIAS);
                o.iter_mut().for_each(|v| *v += bias);
                if !with_position {
                    continue;
                }
                for (k, pk) in pos.iter().enumerate() {
                    let j = POSITION.start + k;
                    axpy(o, wc(j), pk);
                    for ch in 0..3 {
                        let wk = wc(POSITION.start + 5 + 3 * k + ch);
                        let rgb = row(src.plane(ch));
                        if wk != 0.0 {
                            o.iter_mut()
                                .zip(pk)
                                .zip(rgb)
                                .for_each(|((v, p), x)| *v += wk * p * x);
                        }
                    }
                }
            }
        }
    });
}

/// The planes of the bank group's colour and blur features (index, plane); blurs the frame did
/// not need (all their weights zero) are left out.
fn bank_planes<'a>(src: &'a Frame, g: &'a Blurs, planes: &'a Planes) -> Vec<(usize, &'a [f32])> {
    let mut v: Vec<(usize, &[f32])> = (0..3).map(|c| (c, src.plane(c))).collect();
    for c in 0..3 {
        v.push((6 + c, &g.planes[0][c]));
        v.push((12 + c, &g.planes[1][c]));
    }
    if let [b1, b25, b12] = planes.blurs.as_slice() {
        for c in 0..3 {
            v.extend([
                (3 + c, &b1[c][..]),
                (9 + c, &b25[c][..]),
                (15 + c, &b12[c][..]),
            ]);
        }
    }
    v
}

/// Row `i0 / width` of plane `p`.
#[inline]
fn row_at(p: &[f32], i0: usize, width: usize) -> &[f32] {
    &p[i0..i0 + width]
}

/// The rows of three bands in step: one `[row; 3]` per image row.
fn rows_of<'a>(
    mut rows: [std::slice::ChunksMut<'a, f32>; 3],
) -> impl Iterator<Item = [&'a mut [f32]; 3]> {
    std::iter::from_fn(move || {
        let [a, b, c] = rows.each_mut().map(|r| r.next());
        Some([a?, b?, c?])
    })
}

/// The position terms u, v, r2, r2^2, r2^3 of one row (v fixed) at the columns' `us`.
fn position_rows(us: &[f32], v: f32, pos: &mut [Vec<f32>; 5]) {
    for (x, &u) in us.iter().enumerate() {
        let r2 = 0.5 * (u * u + v * v);
        let terms = [u, v, r2, r2 * r2, r2 * r2 * r2];
        for (p, t) in pos.iter_mut().zip(terms) {
            p[x] = t;
        }
    }
}

/// out += a * x, skipped when a is zero.
#[inline]
fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    if a != 0.0 {
        out.iter_mut().zip(x).for_each(|(o, v)| *o += a * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::filterbank::blurs;

    /// The row-wise apply adds what the fit's per-pixel features and weights say it should.
    #[test]
    fn apply_matches_the_per_pixel_features() {
        let (w, h) = (37, 23);
        let mut src = Frame::zeros(w, h);
        let n = w * h;
        for (i, v) in src.data.iter_mut().enumerate() {
            *v = ((i * 7919 % 1000) as f32 / 1000.0 + (i / n) as f32 * 0.1).fract();
        }
        let weights: Vec<f32> = (0..NF * 3)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 50.0)
            .collect();
        let g = blurs(&src, 1);
        let mut out = Frame::zeros(w, h);
        apply(&mut out, &src, &g, &weights, 2);
        let p = planes(&src, true, 1);
        let mut phi = [0.0f32; NF];
        for y in 0..h {
            for x in 0..w {
                features(&src, &g, &p, x, y, &mut phi);
                for c in 0..3 {
                    let want: f32 = (0..NF).map(|j| weights[3 * j + c] * phi[j]).sum();
                    let got = out.data[c * n + y * w + x];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "({x}, {y}) channel {c}: {got} against {want}"
                    );
                }
            }
        }
    }
}
