//! Slicing: the coefficient grid, interpolated bilinearly in space (PyTorch's
//! align_corners=False) and linearly across luminance bins, applied to each pixel's features.
//! out_c = x_c + sum_l w_l(lum) sum_k coef[l][c][k] f_k.

use super::filterbank::{Blurs, pixel_at};
use super::model::{CK, GRID, GRID_CH, K, LBINS};
use super::par;
use crate::Frame;

/// PyTorch's source index for bilinear resize with align_corners=False.
#[inline]
fn src_index(dst: usize, in_size: usize, out_size: usize) -> (usize, usize, f32) {
    let scale = in_size as f32 / out_size as f32;
    let s = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
    let i0 = (s as usize).min(in_size - 1);
    let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
    (i0, i1, s - i0 as f32)
}

/// `grid` is `[GRID_CH][GRID][GRID]` with channel `(l*3 + c)*K + k`.
pub fn apply(frame: &Frame, blurs: &Blurs, grid: &[f32], threads: usize) -> Frame {
    let (w, h) = (frame.width, frame.height);
    let n = w * h;
    // transpose to [gy][gx][ch] so one cell's coefficients are contiguous
    let mut cells = vec![0.0f32; GRID * GRID * GRID_CH];
    for ch in 0..GRID_CH {
        for g in 0..GRID * GRID {
            cells[g * GRID_CH + ch] = grid[ch * GRID * GRID + g];
        }
    }
    let xs: Vec<(usize, usize, f32)> = (0..w).map(|x| src_index(x, GRID, w)).collect();
    let mut out = vec![0.0f32; 3 * n];
    // work on interleaved rows [w][3], then de-interleave: keeps each band's output contiguous
    par::rows(&mut out, 3 * w, threads, |y0, band| {
        let mut rowg = vec![0.0f32; GRID * GRID_CH];
        let mut f = [0.0f32; K];
        for (dy, orow) in band.chunks_mut(3 * w).enumerate() {
            let y = y0 + dy;
            let (gy0, gy1, fy) = src_index(y, GRID, h);
            for gx in 0..GRID {
                let a = &cells[(gy0 * GRID + gx) * GRID_CH..][..GRID_CH];
                let b = &cells[(gy1 * GRID + gx) * GRID_CH..][..GRID_CH];
                let r = &mut rowg[gx * GRID_CH..][..GRID_CH];
                for i in 0..GRID_CH {
                    r[i] = a[i] + fy * (b[i] - a[i]);
                }
            }
            for x in 0..w {
                let i = y * w + x;
                let (rgb, (l0, w0, w1)) = pixel_at(frame, blurs, i, &mut f);
                let (gx0, gx1, fx) = xs[x];
                let mut coef = [0.0f32; CK];
                for (l, wl) in [(l0, w0), (l0 + 1, w1)] {
                    if l >= LBINS || wl == 0.0 {
                        continue;
                    }
                    let a = &rowg[gx0 * GRID_CH + l * CK..][..CK];
                    let b = &rowg[gx1 * GRID_CH + l * CK..][..CK];
                    for j in 0..CK {
                        coef[j] += wl * (a[j] + fx * (b[j] - a[j]));
                    }
                }
                for c in 0..3 {
                    let cc = &coef[c * K..(c + 1) * K];
                    let mut s = 0.0f32;
                    for k in 0..K {
                        s += cc[k] * f[k];
                    }
                    orow[3 * x + c] = rgb[c] + s;
                }
            }
        }
    });
    let mut res = Frame::zeros(w, h);
    for i in 0..n {
        for c in 0..3 {
            res.data[c * n + i] = out[3 * i + c];
        }
    }
    res
}
