//! Pair registration: the integer shift of A' against A, found coarse to fine by correlating
//! normalised gradient magnitudes (robust to the colour and tone changes of the edit itself).
//! Mirrors `align()` in models/train/takumi_learn.py.

use super::filterbank::luminance;
use crate::Frame;

fn luma_plane(f: &Frame) -> Vec<f32> {
    let n = f.width * f.height;
    (0..n)
        .map(|i| luminance(f.data[i], f.data[n + i], f.data[2 * n + i]))
        .collect()
}

fn downsample(p: &[f32], w: usize, h: usize, s: usize) -> (Vec<f32>, usize, usize) {
    let (ws, hs) = (w / s, h / s);
    let mut out = vec![0.0f32; ws * hs];
    for y in 0..hs {
        for x in 0..ws {
            let mut acc = 0.0f32;
            for dy in 0..s {
                let row = &p[(y * s + dy) * w + x * s..][..s];
                acc += row.iter().sum::<f32>();
            }
            out[y * ws + x] = acc / (s * s) as f32;
        }
    }
    (out, ws, hs)
}

/// Gradient magnitude on the (w-1) x (h-1) interior, normalised to zero mean and unit std.
fn grad(p: &[f32], w: usize, h: usize) -> (Vec<f32>, usize, usize) {
    let (gw, gh) = (w - 1, h - 1);
    let mut g = vec![0.0f32; gw * gh];
    for y in 0..gh {
        for x in 0..gw {
            let v = p[y * w + x];
            g[y * gw + x] = (p[y * w + x + 1] - v).abs() + (p[(y + 1) * w + x] - v).abs();
        }
    }
    let n = g.len() as f64;
    let mean = g.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let sd = var.sqrt().max(1e-6);
    for v in &mut g {
        *v = ((*v as f64 - mean) / sd) as f32;
    }
    (g, gw, gh)
}

fn score(a: &[f32], b: &[f32], w: usize, h: usize, dx: i64, dy: i64) -> f64 {
    // a[y][x] against b[y+dy][x+dx] over their overlap
    let x0 = 0.max(-dx) as usize;
    let x1 = (w as i64).min(w as i64 - dx) as usize;
    let y0 = 0.max(-dy) as usize;
    let y1 = (h as i64).min(h as i64 - dy) as usize;
    if x1 <= x0 || y1 <= y0 || (x1 - x0) * (y1 - y0) * 2 < w * h {
        return f64::NEG_INFINITY;
    }
    let mut s = 0.0f64;
    for y in y0..y1 {
        let ra = &a[y * w + x0..y * w + x1];
        let yb = (y as i64 + dy) as usize;
        let xb = (x0 as i64 + dx) as usize;
        let rb = &b[yb * w + xb..yb * w + xb + (x1 - x0)];
        s += ra.iter().zip(rb).map(|(p, q)| p * q).sum::<f32>() as f64;
    }
    s / ((x1 - x0) * (y1 - y0)) as f64
}

/// Shift (dx, dy) such that `after[y+dy][x+dx]` corresponds to `before[y][x]`.
pub fn align(before: &Frame, after: &Frame) -> (i64, i64) {
    let (w, h) = (before.width, before.height);
    let (la, lb) = (luma_plane(before), luma_plane(after));
    let mut levels = vec![];
    let mut s = 1;
    while w / (s * 2) >= 48 && h / (s * 2) >= 48 && s < 16 {
        s *= 2;
    }
    while s >= 1 {
        levels.push(s);
        s /= 2;
    }
    let (mut dx, mut dy) = (0i64, 0i64);
    for (i, &s) in levels.iter().enumerate() {
        let (pa, ws, hs) = downsample(&la, w, h, s);
        let (pb, _, _) = downsample(&lb, w, h, s);
        let (ga, gw, gh) = grad(&pa, ws, hs);
        let (gb, _, _) = grad(&pb, ws, hs);
        let (cx, cy, r) = if i == 0 {
            (0, 0, (0.06 * gw.max(gh) as f64).ceil() as i64)
        } else {
            (dx * 2, dy * 2, 1)
        };
        let mut best = (f64::NEG_INFINITY, cx, cy);
        for ty in cy - r..=cy + r {
            for tx in cx - r..=cx + r {
                let sc = score(&ga, &gb, gw, gh, tx, ty);
                if sc > best.0 {
                    best = (sc, tx, ty);
                }
            }
        }
        dx = best.1;
        dy = best.2;
    }
    (dx, dy)
}

/// The overlapping rectangles of a shifted pair: (x, y, w, h) in `before`, and the same size
/// at (x + dx, y + dy) in `after`.
pub fn overlap(w: usize, h: usize, dx: i64, dy: i64) -> (usize, usize, usize, usize) {
    let x0 = 0.max(-dx) as usize;
    let y0 = 0.max(-dy) as usize;
    let x1 = (w as i64).min(w as i64 - dx).max(x0 as i64) as usize;
    let y1 = (h as i64).min(h as i64 - dy).max(y0 as i64) as usize;
    (x0, y0, x1 - x0, y1 - y0)
}

/// Whether the pair moved by more than a shift (rotation, scale): the quadrants' own shifts then
/// disagree with the whole frame's by more than a pixel. A pixel-wise fit on such a pair learns
/// the misregistration as blur, so `learn` leaves it to the hypernetwork.
pub fn misregistered(before: &Frame, after: &Frame, shift: (i64, i64)) -> bool {
    let (w, h) = (before.width, before.height);
    let (hw, hh) = (w / 2, h / 2);
    if hw < 64 || hh < 64 {
        return false;
    }
    let quads = [
        (0, 0, hw, hh),
        (hw, 0, w - hw, hh),
        (0, hh, hw, h - hh),
        (hw, hh, w - hw, h - hh),
    ];
    // the four registrations are independent: run them side by side
    std::thread::scope(|sc| {
        let handles: Vec<_> = quads
            .iter()
            .map(|&(x, y, qw, qh)| {
                sc.spawn(move || align(&before.crop(x, y, qw, qh), &after.crop(x, y, qw, qh)))
            })
            .collect();
        handles.into_iter().any(|h| {
            h.join()
                .is_ok_and(|(dx, dy)| (dx - shift.0).abs() > 1 || (dy - shift.1).abs() > 1)
        })
    })
}
