//! Closed-form refinement of a template in `learn`: the least-squares global coefficient offset
//! that best explains what the hypernetwork's template left unexplained on the (aligned) pair.
//! The offset enters G linearly, so this is ridge regression on per-pixel features. Its strength
//! is chosen by two-fold validation on a checkerboard of 32 px blocks of the pair itself (never
//! on B), and the offset is dropped when it does not beat leaving it out.
//! Mirrors `Fit` in models/train/takumi_learn.py.

use super::filterbank::{Blurs, pixel_at};
use super::model::{CK, K, LBINS};
use crate::Frame;

const P: usize = LBINS * K;
const BLOCK: usize = 32;
pub const TARGET_SAMPLES: f64 = 30000.0;

pub struct FitAcc {
    m: [Vec<f64>; 2],
    v: [Vec<f64>; 2],
    rr: [f64; 2],
    samples: usize,
}

impl Default for FitAcc {
    fn default() -> Self {
        FitAcc {
            m: [vec![0.0; P * P], vec![0.0; P * P]],
            v: [vec![0.0; P * 3], vec![0.0; P * 3]],
            rr: [0.0; 2],
            samples: 0,
        }
    }
}

pub fn stride(w: usize, h: usize) -> usize {
    (((w * h) as f64 / TARGET_SAMPLES).sqrt().round() as usize).max(2)
}

impl FitAcc {
    /// Adds one pair: `a` (before) with its blurs, `after`, `pred` = G(template, a), and the shift
    /// of `after` against `a`. The two folds accumulate on two threads: each keeps its own
    /// normal equations, so the sums are the same as on one thread.
    pub fn add(
        &mut self,
        a: &Frame,
        blurs: &Blurs,
        after: &Frame,
        pred: &Frame,
        shift: (i64, i64),
    ) {
        let (ox, oy, ow, oh) = super::align::overlap(a.width, a.height, shift.0, shift.1);
        let s = stride(ow, oh);
        let rect = (ox, oy, ow, oh, s);
        let [m0, m1] = &mut self.m;
        let [v0, v1] = &mut self.v;
        let [r0, r1] = &mut self.rr;
        let (n0, n1) = std::thread::scope(|sc| {
            let h = sc.spawn(|| accumulate(0, rect, a, blurs, after, pred, shift, m0, v0, r0));
            let n1 = accumulate(1, rect, a, blurs, after, pred, shift, m1, v1, r1);
            (h.join().unwrap_or(0), n1)
        });
        self.samples += n0 + n1;
    }

    /// The offset in the template's layout `[(l*3 + c)*K + k]`, or None when it does not validate.
    pub fn solve(&self) -> Option<Vec<f32>> {
        let tr: f64 = (0..P)
            .map(|i| self.m[0][i * P + i] + self.m[1][i * P + i])
            .sum();
        if tr <= 0.0 {
            return None;
        }
        let base = self.rr[0] + self.rr[1];
        let mut best: (f64, Option<f64>) = (base, None);
        for j in 1..=6 {
            let lam = tr / P as f64 * 10f64.powi(-j);
            let mut err = 0.0;
            for (a, b) in [(0, 1), (1, 0)] {
                let Some(d) = ridge(&self.m[a], &self.v[a], lam) else {
                    err = f64::INFINITY;
                    break;
                };
                err += val_error(&self.m[b], &self.v[b], self.rr[b], &d);
            }
            if err < best.0 {
                best = (err, Some(lam));
            }
        }
        let lam = best.1?;
        let m: Vec<f64> = self.m[0]
            .iter()
            .zip(&self.m[1])
            .map(|(a, b)| a + b)
            .collect();
        let v: Vec<f64> = self.v[0]
            .iter()
            .zip(&self.v[1])
            .map(|(a, b)| a + b)
            .collect();
        let d = ridge(&m, &v, lam)?;
        let mut out = vec![0.0f32; LBINS * CK];
        for l in 0..LBINS {
            for c in 0..3 {
                for k in 0..K {
                    out[(l * 3 + c) * K + k] = d[(l * K + k) * 3 + c] as f32;
                }
            }
        }
        Some(out)
    }
}

impl FitAcc {
    /// Mean squared error per channel value on the sampled pixels once `offset` (solve's result,
    /// or None) is added: how well the finished template reproduces its pairs.
    /// Pixels sampled; 0 when every pair was left out (misregistered).
    pub fn samples(&self) -> usize {
        self.samples
    }

    pub fn mse_with(&self, offset: Option<&[f32]>) -> f64 {
        let n = (3 * self.samples).max(1) as f64;
        let Some(off) = offset else {
            return (self.rr[0] + self.rr[1]) / n;
        };
        let mut d = vec![0.0f64; P * 3];
        for l in 0..LBINS {
            for c in 0..3 {
                for k in 0..K {
                    d[(l * K + k) * 3 + c] = off[(l * 3 + c) * K + k] as f64;
                }
            }
        }
        let e: f64 = (0..2)
            .map(|f| val_error(&self.m[f], &self.v[f], self.rr[f], &d))
            .sum();
        e.max(0.0) / n
    }
}

/// One fold's share of `FitAcc::add`; returns its sample count.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    fold: usize,
    (ox, oy, ow, oh, s): (usize, usize, usize, usize, usize),
    a: &Frame,
    blurs: &Blurs,
    after: &Frame,
    pred: &Frame,
    shift: (i64, i64),
    m: &mut [f64],
    v: &mut [f64],
    rr: &mut f64,
) -> usize {
    let (w, n) = (a.width, a.width * a.height);
    let mut f = [0.0f32; K];
    let mut count = 0;
    for y in (oy..oy + oh).step_by(s) {
        for x in (ox..ox + ow).step_by(s) {
            if (y / BLOCK + x / BLOCK) % 2 != fold {
                continue;
            }
            let i = y * w + x;
            let j = ((y as i64 + shift.1) as usize) * w + (x as i64 + shift.0) as usize;
            let (_, (l0, w0, w1)) = pixel_at(a, blurs, i, &mut f);
            count += 1;
            let r: [f64; 3] =
                std::array::from_fn(|c| (after.data[c * n + j] - pred.data[c * n + i]) as f64);
            *rr += r.iter().map(|v| v * v).sum::<f64>();
            // phi has 2K non-zeros: bins l0 and l0+1
            let mut idx = [0usize; 2 * K];
            let mut val = [0.0f64; 2 * K];
            let mut nz = 0;
            for (l, wl) in [(l0, w0), (l0 + 1, w1)] {
                if l >= LBINS || wl == 0.0 {
                    continue;
                }
                for (k, fk) in f.iter().enumerate() {
                    idx[nz] = l * K + k;
                    val[nz] = (wl * fk) as f64;
                    nz += 1;
                }
            }
            for p in 0..nz {
                let row = &mut m[idx[p] * P..(idx[p] + 1) * P];
                for q in 0..nz {
                    row[idx[q]] += val[p] * val[q];
                }
                for c in 0..3 {
                    v[idx[p] * 3 + c] += val[p] * r[c];
                }
            }
        }
    }
    count
}

/// sum over the fold of |r - phi.d|^2, from its normal equations.
fn val_error(m: &[f64], v: &[f64], rr: f64, d: &[f64]) -> f64 {
    let mut e = rr;
    for c in 0..3 {
        let mut dv = 0.0;
        let mut dmd = 0.0;
        for p in 0..P {
            dv += d[p * 3 + c] * v[p * 3 + c];
            let mut md = 0.0;
            for q in 0..P {
                md += m[p * P + q] * d[q * 3 + c];
            }
            dmd += d[p * 3 + c] * md;
        }
        e += dmd - 2.0 * dv;
    }
    e
}

/// Solves (m + lam I) d = v for the three columns of v by Cholesky; hand-written because a
/// 128 x 128 solve once per template does not justify a linear-algebra dependency.
fn ridge(m: &[f64], v: &[f64], lam: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; P * P];
    for i in 0..P {
        for j in 0..=i {
            let mut s = m[i * P + j] + if i == j { lam } else { 0.0 };
            for k in 0..j {
                s -= l[i * P + k] * l[j * P + k];
            }
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * P + i] = s.sqrt();
            } else {
                l[i * P + j] = s / l[j * P + j];
            }
        }
    }
    let mut d = vec![0.0f64; P * 3];
    for c in 0..3 {
        let mut y = vec![0.0f64; P];
        for i in 0..P {
            let mut s = v[i * 3 + c];
            for k in 0..i {
                s -= l[i * P + k] * y[k];
            }
            y[i] = s / l[i * P + i];
        }
        for i in (0..P).rev() {
            let mut s = y[i];
            for k in i + 1..P {
                s -= l[k * P + i] * d[k * 3 + c];
            }
            d[i * 3 + c] = s / l[i * P + i];
        }
    }
    Some(d)
}
