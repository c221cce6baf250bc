//! Full-resolution stages of G that run in Rust: gaussian filter bank, per-pixel features,
//! thumbnail and centre patch. Each matches `models/train/takumi_model.py` to within 1e-5 (see
//! tests/golden.rs).

use super::model::{HUES, K, LBINS, LUMA, PATCH, SIGMAS, THUMB};
use super::par;
use crate::Frame;

pub fn gauss_kernel(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as i64;
    let w: Vec<f32> = (-r..=r)
        .map(|x| (-((x * x) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// Separable gaussian with replicate borders, rows then columns, on one plane.
pub fn blur_plane(src: &[f32], w: usize, h: usize, kernel: &[f32], threads: usize) -> Vec<f32> {
    let r = kernel.len() / 2;
    let mut tmp = vec![0.0f32; w * h];
    par::rows(&mut tmp, w, threads, |y0, band| {
        let mut padded = vec![0.0f32; w + 2 * r];
        for (dy, out) in band.chunks_mut(w).enumerate() {
            let row = &src[(y0 + dy) * w..(y0 + dy + 1) * w];
            padded[..r].fill(row[0]);
            padded[r..r + w].copy_from_slice(row);
            padded[r + w..].fill(row[w - 1]);
            out.fill(0.0);
            for (t, &k) in kernel.iter().enumerate() {
                for (o, &p) in out.iter_mut().zip(&padded[t..t + w]) {
                    *o += k * p;
                }
            }
        }
    });
    let mut out = vec![0.0f32; w * h];
    par::rows(&mut out, w, threads, |y0, band| {
        for (dy, orow) in band.chunks_mut(w).enumerate() {
            let y = (y0 + dy) as i64;
            orow.fill(0.0);
            for (t, &k) in kernel.iter().enumerate() {
                let sy = (y + t as i64 - r as i64).clamp(0, h as i64 - 1) as usize;
                for (o, &p) in orow.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                    *o += k * p;
                }
            }
        }
    });
    out
}

/// The two blurred copies of the frame, `[sigma][channel]` planes.
pub struct Blurs {
    pub planes: [[Vec<f32>; 3]; 2],
}

pub fn blurs(f: &Frame, threads: usize) -> Blurs {
    let k0 = gauss_kernel(SIGMAS[0]);
    let k1 = gauss_kernel(SIGMAS[1]);
    let b = |k: &[f32], c| blur_plane(f.plane(c), f.width, f.height, k, threads);
    Blurs {
        planes: [
            [b(&k0, 0), b(&k0, 1), b(&k0, 2)],
            [b(&k1, 0), b(&k1, 1), b(&k1, 2)],
        ],
    }
}

#[inline]
pub fn luminance(r: f32, g: f32, b: f32) -> f32 {
    (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).clamp(0.0, 1.0)
}

const HUE_DIRS: [(f32, f32); HUES] = {
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

/// Adaptive average pooling to THUMB x THUMB (PyTorch's bin edges).
pub fn thumbnail(f: &Frame) -> Vec<f32> {
    let (w, h) = (f.width, f.height);
    let mut out = vec![0.0f32; 3 * THUMB * THUMB];
    for c in 0..3 {
        let p = f.plane(c);
        for ty in 0..THUMB {
            let (y0, y1) = (ty * h / THUMB, ((ty + 1) * h).div_ceil(THUMB));
            for tx in 0..THUMB {
                let (x0, x1) = (tx * w / THUMB, ((tx + 1) * w).div_ceil(THUMB));
                let mut s = 0.0f64;
                for y in y0..y1 {
                    s += p[y * w + x0..y * w + x1]
                        .iter()
                        .map(|&v| v as f64)
                        .sum::<f64>();
                }
                out[(c * THUMB + ty) * THUMB + tx] = (s / ((y1 - y0) * (x1 - x0)) as f64) as f32;
            }
        }
    }
    out
}

/// Native-resolution PATCH x PATCH centre crop (the caller guarantees the frame is large enough).
pub fn centre_patch(f: &Frame) -> Vec<f32> {
    let (t, l) = ((f.height - PATCH) / 2, (f.width - PATCH) / 2);
    f.crop(l, t, PATCH, PATCH).data
}
