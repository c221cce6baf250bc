//! Pair registration: where the after shot A' sits on the before shot A, as a similarity
//! transform (shift, rotation, scale), and A' resampled onto A's pixel grid.
//!
//! The two shots are of a part placed twice by hand: between them it moves by a small similarity
//! (shift within ±10% of the side, rotation within ±5°, scale within ±8%) and the exposure may
//! change a little, while the edit itself changes colours and tones and may blur or sharpen. Raw
//! pixels would not correlate across that; features of luma that keep edges and drop shading,
//! compared by zero-mean normalised correlation (ZNCC, blind to gain and offset), do.
//!
//! Method, on a pyramid of luma (each level half the size of the one before):
//! 1. at the coarsest level (short side 48 to 95 px) a search over a grid of rotations and
//!    scales, each with every shift in range, correlating gradient magnitudes, finds the pose
//!    to within about a coarse pixel;
//! 2. every finer level warps A' by the estimate, measures each tile's remaining shift to
//!    sub-pixel precision (quadratic through the correlation peak of a band-pass of luma, see
//!    `band_pass`) and refits the similarity to the tile centres by least squares, dropping
//!    tiles that disagree by over 2 px (a part that moved on its own, a reflection);
//! 3. full resolution repeats step 2 until the estimate settles. Measuring what is left after
//!    warping keeps each tile's shift near zero, where the peak fit is unbiased.
//!
//! Measured: synthetic pairs (tests below) come out within 0.01 px (largest error at a frame
//! corner); an edited JPEG photo moved by random poses in range, with exposure changes and
//! blurs up to sigma 3 px added to the edit, within 0.2 px. A 640 x 480 pair takes about
//! 25 to 30 ms on one core of the development machine.

use super::filterbank::luminance;
use super::par;
use crate::{Error, Frame, Result};

/// Largest shift searched, as a fraction of the side (width for dx, height for dy).
const MAX_SHIFT: f64 = 0.10;
/// Rotations and scales tried at the coarsest level: 2.5° and 4% apart, so the estimate starts
/// within 1.25° and 2%, which the first tile round (radius 4) absorbs.
const COARSE_ANGLES: [f64; 5] = [-5.0, -2.5, 0.0, 2.5, 5.0];
const COARSE_SCALES: [f64; 5] = [0.92, 0.96, 1.0, 1.04, 1.08];
/// Accepted parameter ranges: the supported ones with a little slack for estimation error.
const ACCEPT_SHIFT: f64 = 0.115;
const ACCEPT_ANGLE_DEG: f64 = 5.75;
const ACCEPT_SCALE_DEV: f64 = 0.092;
/// Best whole-frame correlation below which the coarse search found no pose (unrelated shots).
const MIN_COARSE_ZNCC: f64 = 0.3;
/// A tile's correlation peak below this is not trusted (no texture, or content that changed).
const MIN_TILE_ZNCC: f64 = 0.4;
/// Tiles whose feature varies less than this (a standard deviation of 0.001 in luma units, a
/// quarter of an 8-bit step) carry no position.
const MIN_TILE_VAR: f64 = 1e-6;
/// Tiles disagreeing with the fit by more than this many pixels (of their level) are dropped.
const OUTLIER_PX: f64 = 2.0;
/// Registered needs this share of the measured tiles to agree.
const MIN_INLIER_SHARE: f64 = 0.6;
/// ... and their RMS disagreement with the fit at most this. Registered pairs measure 0.01 to
/// 0.04 px (0.16 px with a strong blur in the edit, 0.25 px on 64 px frames); a false pose that
/// 7 of 9 tiles agreed with (a scene with periodic texture moved out of range) measured 0.77.
const MAX_RESIDUAL_PX: f64 = 0.5;
/// ... and the whole overlap, warped, must correlate at least this well with A (registered
/// pairs: 0.95 to 1, down to 0.55 under a strong blur in the edit).
const MIN_OVERLAP_ZNCC: f64 = 0.4;
/// An estimate this close (px, anywhere in the frame) to an integer shift is snapped to it, so
/// that it warps as an exact copy, without the slight blur of interpolation. The measurement
/// is no finer than that on a real pair: models/samples/pair_*.jpg, an edited JPEG pair that
/// differs by a pure (5, -3) shift, comes out within 0.015 px of it.
const SNAP_PX: f64 = 0.05;

/// How A' sits on A: the pixel of `after` at M(p) shows what `before` shows at p, where
/// M(p) = c + scale * R(angle) * (p - c) + (dx, dy), c = the frame centre ((w-1)/2, (h-1)/2),
/// p = (x, y) in pixels.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Similarity {
    pub dx: f64,
    pub dy: f64,
    pub angle_deg: f64,
    pub scale: f64,
}

impl Similarity {
    /// M as a 2x3 matrix on pixel coordinates of a w x h frame: M(x, y) =
    /// (m[0] x + m[1] y + m[2], m[3] x + m[4] y + m[5]).
    pub fn matrix(&self, w: usize, h: usize) -> [f64; 6] {
        Affine::at_level(self, (w, h), 1).0
    }

    /// M^-1 of M(p) = c + s R(a) (p - c) + t: c + R(-a) (p - c) / s - R(-a) t / s.
    pub fn inverse(&self) -> Similarity {
        let (sin, cos) = self.angle_deg.to_radians().sin_cos();
        let (tx, ty) = (self.dx, self.dy);
        Similarity {
            dx: -(cos * tx + sin * ty) / self.scale,
            dy: -(-sin * tx + cos * ty) / self.scale,
            angle_deg: -self.angle_deg,
            scale: 1.0 / self.scale,
        }
    }

    pub const IDENTITY: Similarity = Similarity {
        dx: 0.0,
        dy: 0.0,
        angle_deg: 0.0,
        scale: 1.0,
    };

    /// The linear part as [[a, -b], [b, a]].
    fn ab(&self) -> (f64, f64) {
        let t = self.angle_deg.to_radians();
        (self.scale * t.cos(), self.scale * t.sin())
    }

    /// M(x, y) for a w x h frame.
    pub(crate) fn map(&self, w: usize, h: usize, x: f64, y: f64) -> (f64, f64) {
        let (cx, cy) = centre(w, h);
        let (a, b) = self.ab();
        let (px, py) = (x - cx, y - cy);
        (
            cx + a * px - b * py + self.dx,
            cy + b * px + a * py + self.dy,
        )
    }

    /// True when M moves no pixel of a w x h frame by more than 0.02 px from
    /// p + (round(dx), round(dy)) AND dx, dy are within 0.02 of integers: then `warp` is an
    /// exact integer copy, no interpolation.
    pub fn is_integer_shift(&self, w: usize, h: usize) -> bool {
        const TOL: f64 = 0.02;
        let (rx, ry) = (self.dx.round(), self.dy.round());
        (self.dx - rx).abs() <= TOL
            && (self.dy - ry).abs() <= TOL
            && self.deviation_from_shift(w, h, rx, ry) <= TOL
    }

    /// Whether warping by M interpolates: some pixel of a w x h frame lands a quarter pixel or
    /// more from where a whole-pixel shift would put it (below that the interpolation weights
    /// are nearly one tap, and registration noise of an aligned pair stays under it).
    pub fn resamples(&self, w: usize, h: usize) -> bool {
        let (rx, ry) = (self.dx.round(), self.dy.round());
        let d = self.deviation_from_shift(w, h, rx, ry);
        d.is_nan() || d >= 0.25
    }

    /// Largest displacement, in pixels, of any corner of a w x h frame under M relative to
    /// identity (for reports).
    pub fn max_motion_px(&self, w: usize, h: usize) -> f64 {
        self.deviation_from_shift(w, h, 0.0, 0.0)
    }

    /// Largest distance between M(p) and p + (sx, sy) over the frame: M is affine, so the
    /// largest is at a corner. NaN parameters give NaN.
    fn deviation_from_shift(&self, w: usize, h: usize, sx: f64, sy: f64) -> f64 {
        corners(w, h)
            .iter()
            .map(|&(x, y)| {
                let (mx, my) = self.map(w, h, x, y);
                (mx - x - sx).hypot(my - y - sy)
            })
            .fold(0.0, |m: f64, d| if d.is_nan() { d } else { m.max(d) })
    }

    /// Largest distance between this M and `other` over a w x h frame.
    fn distance(&self, other: &Similarity, w: usize, h: usize) -> f64 {
        corners(w, h)
            .iter()
            .map(|&(x, y)| {
                let (ax, ay) = self.map(w, h, x, y);
                let (bx, by) = other.map(w, h, x, y);
                (ax - bx).hypot(ay - by)
            })
            .fold(0.0, f64::max)
    }

    fn in_range(&self, w: usize, h: usize) -> bool {
        self.dx.abs() <= ACCEPT_SHIFT * w as f64
            && self.dy.abs() <= ACCEPT_SHIFT * h as f64
            && self.angle_deg.abs() <= ACCEPT_ANGLE_DEG
            && (self.scale - 1.0).abs() <= ACCEPT_SCALE_DEV
    }
}

fn centre(w: usize, h: usize) -> (f64, f64) {
    ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0)
}

fn corners(w: usize, h: usize) -> [(f64, f64); 4] {
    let (x1, y1) = ((w as f64 - 1.0).max(0.0), (h as f64 - 1.0).max(0.0));
    [(0.0, 0.0), (x1, 0.0), (0.0, y1), (x1, y1)]
}

#[derive(Clone, Copy, Debug)]
pub struct Registration {
    pub sim: Similarity,
    /// false when the pair does not register (unrelated images, motion beyond the ranges above,
    /// too little texture): the caller then must not fit pixel-wise.
    pub registered: bool,
    /// RMS disagreement, in pixels, between the tiles' own measured shifts and the fitted
    /// similarity (after refinement), over the tiles kept by the fit.
    pub residual_px: f64,
}

/// Registers `after` onto `before` (same size, planar RGB f32 in [0,1]). `threads` >= 1: the
/// coarse search, the warps and the tiles run on up to that many scoped threads.
///
/// Frames under 64 x 64, or of different sizes, are not registered (IDENTITY, registered false).
/// When the pair does not register, `sim` is the best estimate found, for reports only.
///
/// An error only when one of its worker threads crashed: then there is no answer at all, which
/// must not pass for a pair that does not register.
pub fn register(before: &Frame, after: &Frame, threads: usize) -> Result<Registration> {
    let (w, h) = (before.width, before.height);
    let fail = Registration {
        sim: Similarity::IDENTITY,
        registered: false,
        residual_px: f64::INFINITY,
    };
    let sized = |f: &Frame| f.data.len() == 3 * f.width * f.height;
    if w < 64 || h < 64 || (after.width, after.height) != (w, h) || !sized(before) || !sized(after)
    {
        return Ok(fail);
    }
    // more threads than tiles or poses would only wait
    let threads = threads.clamp(1, 64);
    let (levels, coarse) = pyramid(before, after);
    let (mut sim, zncc) = coarse_search(&coarse, (w, h), threads)?;
    if zncc < MIN_COARSE_ZNCC {
        return Ok(Registration { sim, ..fail });
    }
    let tiles = tile_grid(w, h);
    let mut last: Option<Round> = None;
    let mut full_rounds = 0;
    for (k, search) in schedule(levels.len() - 1) {
        let Some(round) = refine(&levels[k], &sim, (w, h), &tiles, search, threads)? else {
            return Ok(Registration { sim, ..fail });
        };
        let change = round.sim.distance(&sim, w, h);
        sim = round.sim;
        last = Some(round);
        if k == 0 {
            full_rounds += 1;
            // two rounds at full resolution at least, so the residual is measured after warping
            if full_rounds >= 2 && change < 0.01 {
                break;
            }
        }
    }
    let Some(round) = last else { return Ok(fail) };
    Ok(verdict(round, w, h))
}

/// The result of the last refinement round: snapped to an integer shift when that close, and
/// registered when enough tiles agree closely with a pose inside the supported ranges.
fn verdict(round: Round, w: usize, h: usize) -> Registration {
    let mut sim = round.sim;
    let (rx, ry) = (sim.dx.round(), sim.dy.round());
    if sim.deviation_from_shift(w, h, rx, ry) <= SNAP_PX {
        sim = Similarity {
            dx: rx,
            dy: ry,
            ..Similarity::IDENTITY
        };
    }
    let enough_texture = round.measured >= 4.max(round.tiles / 4);
    let agree = round.inliers as f64 >= MIN_INLIER_SHARE * round.measured as f64;
    Registration {
        sim,
        registered: enough_texture
            && agree
            && round.rms <= MAX_RESIDUAL_PX
            && round.overlap_zncc >= MIN_OVERLAP_ZNCC
            && sim.in_range(w, h),
        residual_px: round.rms,
    }
}

/// `after` resampled onto `before`'s grid: out[p] = after[M(p)], Lanczos-3 (it blurs less than
/// bicubic, and the fit downstream would learn interpolation blur as part of the edit), clamped
/// to [0, 1]. mask[y*w+x] is true where all 36 taps around M(p) are real pixels of `after`
/// (2 px before and 3 px after the sample point); elsewhere out is 0 and mask false.
///
/// When `sim.is_integer_shift` the pixels are copied exactly and the mask is the whole overlap
/// of the shifted frames (no taps, so no margin).
pub fn warp(after: &Frame, sim: &Similarity) -> (Frame, Vec<bool>) {
    let (w, h) = (after.width, after.height);
    if after.data.len() != 3 * w * h {
        return (Frame::zeros(w, h), vec![false; w * h]);
    }
    if sim.is_integer_shift(w, h) {
        return shift_copy(after, sim.dx.round() as i64, sim.dy.round() as i64);
    }
    let mut out = Frame::zeros(w, h);
    let mut ok = vec![0.0f32; w * h];
    let warper = Warper {
        src: [after.plane(0), after.plane(1), after.plane(2)],
        sw: w,
        sh: h,
        m: Affine::at_level(sim, (w, h), 1),
        cubic: true,
    };
    let [r, g, b] = out.planes_mut();
    // the one full-resolution warp of a pair: worth the cores there are
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    par::planes([r, g, b, &mut ok], w, threads, |y0, band| {
        warper.band(y0, w, band.into())
    });
    for v in &mut out.data {
        *v = v.clamp(0.0, 1.0);
    }
    (out, ok.into_iter().map(|v| v > 0.5).collect())
}

/// Phases of [`match_resampling`]'s kernel table: a sample's fraction is rounded to 1/PHASES.
const PHASES: usize = 32;

/// `before` low-passed as [`warp`] low-passes `after` onto its grid, pixel by pixel; None when
/// the warp copies pixels. Interpolating A' at a fraction between its pixels attenuates the
/// finest detail (fully at half a pixel), and the fraction drifts across a turned frame. Fitted
/// against a sharp A, the lost detail dilutes every gain the fit finds (least squares shrinks
/// toward the mean what the target lacks), and a moved exposure pair lost 4 dB on B to it
/// (eval_cli.py's moved set). Filtered alike, both sides hold the same detail: a colour map or
/// a convolution of A fits the same whatever low-pass both went through.
pub fn match_resampling(before: &Frame, sim: &Similarity, threads: usize) -> Option<Frame> {
    let (w, h) = (before.width, before.height);
    if w == 0 || h == 0 || before.data.len() != 3 * w * h || sim.is_integer_shift(w, h) {
        return None;
    }
    let table: Vec<[f32; 6]> = (0..=PHASES)
        .map(|i| matched_kernel(i as f32 / PHASES as f32))
        .collect();
    let m = Affine::at_level(sim, (w, h), 1);
    // the kernel of pixel (x, y) along x (axis 0) or y: that of the fraction A' is sampled at
    let kernel = |x: usize, y: usize, axis: usize| {
        let p = m.apply(x as f64, y as f64);
        let v = if axis == 0 { p.0 } else { p.1 };
        &table[((v - v.floor()) * PHASES as f64).round() as usize]
    };
    let pass = |src: &Frame, axis: usize| {
        let mut out = Frame::zeros(w, h);
        par::planes(out.planes_mut(), w, threads, |y0, mut band| {
            for i in 0..band[0].len() {
                let (x, y) = (i % w, y0 + i / w);
                // one kernel per pixel, for all three planes
                let g = kernel(x, y, axis);
                for (c, band) in band.iter_mut().enumerate() {
                    let p = src.plane(c);
                    band[i] = symmetric_taps(g, |d| match axis {
                        0 => p[y * w + x.saturating_add_signed(d).min(w - 1)],
                        _ => p[y.saturating_add_signed(d).min(h - 1) * w + x],
                    });
                }
            }
        });
        out
    };
    Some(pass(&pass(before, 0), 1))
}

/// The zero-phase kernel (taps 0..=5 of a symmetric 11) whose response is the magnitude |W| of
/// the Lanczos-3 sample at fraction t: |W|'s cosine series (the least-squares fit over the band),
/// from 64 frequencies, normalised to pass flat areas unchanged. Within 0.04 of |W| up to 0.4
/// cycles per pixel at half a pixel, where |W| falls to 0 at Nyquist; exact at a whole pixel.
fn matched_kernel(t: f32) -> [f32; 6] {
    const N: usize = 64;
    let w = lanczos3(t);
    let tau = std::f64::consts::TAU;
    let mut g = [0.0f64; 6];
    for j in 0..N {
        let f = (j as f64 + 0.5) / (2 * N) as f64;
        let (re, im) = w.iter().enumerate().fold((0.0, 0.0), |(re, im), (k, &v)| {
            let (s, c) = (tau * f * k as f64).sin_cos();
            (re + v as f64 * c, im - v as f64 * s)
        });
        let mag = re.hypot(im);
        for (d, g) in g.iter_mut().enumerate() {
            *g += mag * (tau * f * d as f64).cos() / N as f64;
        }
    }
    let dc = g[0] + 2.0 * g[1..].iter().sum::<f64>();
    g.map(|v| (v / dc) as f32)
}

/// sum over d in -5..=5 of g[|d|] * at(d).
#[inline]
fn symmetric_taps(g: &[f32; 6], at: impl Fn(isize) -> f32) -> f32 {
    (1..6isize).fold(g[0] * at(0), |s, d| s + g[d as usize] * (at(d) + at(-d)))
}

/// Within 0.5 / 255 of black or white: an 8-bit file or a sensor stops there, so the true value
/// is only known to lie beyond it.
const CLIP_MARGIN: f32 = 0.5 / 255.0;

/// Clears `mask` (`warp`'s, on `before`'s grid) where the warped target comes from clipped pixels
/// of `after` (any channel at black or white). A clipped pixel says only that the edit went at
/// least that far; fitted as the value, it bends every part toward it (a channel mix that clips
/// 2.5 % of the pair lost 15 dB on B: model card). Unless the warp copies pixels, the clipped
/// region grows by the resampling's reach (3 px), since its taps blend clipped values into
/// their neighbours.
pub fn mask_clipped(after: &Frame, sim: &Similarity, mask: &mut [bool]) {
    let (w, h) = (after.width, after.height);
    let n = w * h;
    if after.data.len() != 3 * n || mask.len() != n {
        return;
    }
    let clipped: Vec<bool> = (0..n)
        .map(|i| (0..3).any(|c| is_clipped(after.data[c * n + i])))
        .collect();
    // a copied pixel is its own source (the matrix's nearest pixel is exactly the shift's)
    let near = if sim.is_integer_shift(w, h) {
        clipped
    } else {
        dilate(&clipped, w, h, 3)
    };
    let m = sim.matrix(w, h);
    for (i, keep) in mask.iter_mut().enumerate().filter(|(_, k)| **k) {
        let (x, y) = ((i % w) as f64, (i / w) as f64);
        let (sx, sy) = (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
        let (ix, iy) = (
            sx.round().clamp(0.0, (w - 1) as f64),
            sy.round().clamp(0.0, (h - 1) as f64),
        );
        *keep = !near[iy as usize * w + ix as usize];
    }
}

/// Clears `mask` (`warp`'s, on `before`'s grid) within `reach` px of a frame edge of either
/// shot, unless the two shots' edges run together there. A spatial edit (a blur, a sharpen)
/// made each shot's pixels near its own edge from padding: where the part moved, A' near its
/// edge shows padding that A's features there do not see, and A near its edge has padded
/// features where A' saw the scene. Fitted, those bands teach the template an edit that is
/// neither (a moved sigma 2.6 blur lost 10 dB on B to them, eval_cli.py's moved set, even
/// with a whole-pixel shift). Where an edge of A' lies on the same edge of A (an aligned pair,
/// or the sides a shift runs along), both shots padded alike, as B and its result will be.
pub fn mask_frame_edges(sim: &Similarity, (w, h): (usize, usize), reach: f64, mask: &mut [bool]) {
    if mask.len() != w * h || w == 0 {
        return;
    }
    let m = sim.matrix(w, h);
    let (xmax, ymax) = ((w - 1) as f64, (h - 1) as f64);
    // distances to the left, top, right and bottom edges
    let dist = |x: f64, y: f64| [x, y, xmax - x, ymax - y];
    for (i, keep) in mask.iter_mut().enumerate().filter(|(_, k)| **k) {
        let (x, y) = ((i % w) as f64, (i / w) as f64);
        let (sx, sy) = (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
        let (da, db) = (dist(x, y), dist(sx, sy));
        *keep = da
            .iter()
            .zip(db)
            .all(|(&a, b)| (a >= reach && b >= reach) || (a - b).abs() < 0.5);
    }
}

fn is_clipped(v: f32) -> bool {
    !(CLIP_MARGIN..=1.0 - CLIP_MARGIN).contains(&v)
}

/// `set` grown by `r` px (a square), rows then columns; hand-written: two loops against a
/// morphology crate.
fn dilate(set: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let mut rows = vec![false; w * h];
    for y in 0..h {
        let row = &set[y * w..(y + 1) * w];
        for x in 0..w {
            rows[y * w + x] = row[x.saturating_sub(r)..(x + r + 1).min(w)]
                .iter()
                .any(|&v| v);
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (y.saturating_sub(r)..(y + r + 1).min(h)).any(|yy| rows[yy * w + x]);
        }
    }
    out
}

/// out[y][x] = after[y + dy][x + dx] where that is inside `after`, else 0 (mask false).
fn shift_copy(after: &Frame, dx: i64, dy: i64) -> (Frame, Vec<bool>) {
    let (w, h) = (after.width, after.height);
    let mut out = Frame::zeros(w, h);
    let mut mask = vec![false; w * h];
    let (wi, hi) = (w as i64, h as i64);
    let (x0, x1) = ((-dx).clamp(0, wi), (wi - dx).clamp(0, wi));
    let (y0, y1) = ((-dy).clamp(0, hi), (hi - dy).clamp(0, hi));
    if x1 <= x0 || y1 <= y0 {
        return (out, mask);
    }
    let (x0, x1) = (x0 as usize, x1 as usize);
    let sx0 = (x0 as i64 + dx) as usize;
    for y in y0 as usize..y1 as usize {
        let sy = (y as i64 + dy) as usize;
        for c in 0..3 {
            let src = &after.plane(c)[sy * w + sx0..][..x1 - x0];
            out.plane_mut(c)[y * w + x0..y * w + x1].copy_from_slice(src);
        }
        mask[y * w + x0..y * w + x1].fill(true);
    }
    (out, mask)
}

/// M in the pixel grid of a pyramid level whose pixel x covers full-resolution pixels
/// s*x .. s*x+s-1: q = (m[0] x + m[1] y + m[2], m[3] x + m[4] y + m[5]).
#[derive(Clone, Copy, Debug)]
struct Affine([f64; 6]);

impl Affine {
    /// A level pixel p_l is the full-resolution point s*p_l + o, o = (s-1)/2, so
    /// M_l(p_l) = (M(s*p_l + o) - o) / s = A p_l + (c - o + A (o - c) + d) / s.
    fn at_level(sim: &Similarity, (w, h): (usize, usize), s: usize) -> Affine {
        let (a, b) = sim.ab();
        let s = s as f64;
        let o = (s - 1.0) / 2.0;
        let (cx, cy) = centre(w, h);
        let (ux, uy) = (o - cx, o - cy);
        let tx = (cx - o + a * ux - b * uy + sim.dx) / s;
        let ty = (cy - o + b * ux + a * uy + sim.dy) / s;
        Affine([a, -b, tx, b, a, ty])
    }

    fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        let m = &self.0;
        (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5])
    }
}

/// Lanczos-3 weights of the taps at -2..=3 for a sample at fraction t, normalised to sum 1.
/// Sharper than bicubic: the fit downstream learns whatever blur the warp adds to A' as part of
/// the edit, and then applies it to every capture.
#[inline]
fn lanczos3(t: f32) -> [f32; 6] {
    // three sines per axis instead of twelve (they were a third of a moved pair's learn): tap k
    // sits at x = t + m, m = 2 - k, and sin(pi x) = (-1)^m sin(pi t), sin(pi x / 3) by angle
    // addition from sin and cos of pi t / 3
    const PI: f32 = std::f32::consts::PI;
    const H: f32 = 0.866_025_4; // sin(pi / 3)
    const COS_SIN: [(f32, f32); 6] = [
        (-0.5, H),
        (0.5, H),
        (1.0, 0.0),
        (0.5, -H),
        (-0.5, -H),
        (-1.0, 0.0),
    ];
    let s1 = (PI * t).sin();
    let (s3, c3) = (PI * t / 3.0).sin_cos();
    let w: [f32; 6] = std::array::from_fn(|k| {
        let x = t + 2.0 - k as f32;
        if x.abs() < 1e-6 {
            return 1.0;
        }
        let sin_x = if k % 2 == 0 { s1 } else { -s1 };
        let (cm, sm) = COS_SIN[k];
        let sin_x3 = s3 * cm + c3 * sm;
        3.0 * sin_x * sin_x3 / (PI * PI * x * x)
    });
    let s: f32 = w.iter().sum();
    w.map(|v| v / s)
}

/// Resampling of N same-sized source planes through an affine map: bicubic, or bilinear for
/// the registration's own warps of smoothed gradients (where it costs a quarter and blurs
/// nothing that matters: the peak of a correlation does not move under a blur centred on the
/// sample point).
struct Warper<'a, const N: usize> {
    src: [&'a [f32]; N],
    sw: usize,
    sh: usize,
    m: Affine,
    cubic: bool,
}

impl<const N: usize> Warper<'_, N> {
    /// Rows y0.. of the warp: `band` holds one plane per source, then the validity plane (1
    /// where every tap of the sample lies inside the source, else 0 with values 0).
    fn band(&self, y0: usize, w: usize, band: Vec<&mut [f32]>) {
        // two monomorphised loops: the registration's bilinear warps stay as tight as before
        if self.cubic {
            let sw = self.sw;
            self.band_with(
                y0,
                w,
                band,
                2,
                4,
                move |srcs: &[&[f32]; N], ix, iy, fx, fy| {
                    // the weights once per point, for every plane
                    let (wx, wy) = (lanczos3(fx), lanczos3(fy));
                    let base = (iy - 2) * sw + ix - 2;
                    srcs.map(|src| taps(&src[base..base + 5 * sw + 6], sw, &wx, &wy))
                },
            )
        } else {
            let sw = self.sw;
            self.band_with(
                y0,
                w,
                band,
                0,
                3,
                move |srcs: &[&[f32]; N], ix, iy, fx, fy| {
                    let base = iy * sw + ix;
                    srcs.map(|src| bilinear(&src[base..base + sw + 2], sw, fx, fy))
                },
            )
        }
    }

    /// `band` with one sampler; a sample point is used when it lies `before` px after the first
    /// and `after` px before the last row and column (and at least 2 px inside, as always).
    fn band_with(
        &self,
        y0: usize,
        w: usize,
        mut band: Vec<&mut [f32]>,
        before: usize,
        after: usize,
        sample: impl Fn(&[&[f32]; N], usize, usize, f32, f32) -> [f32; N],
    ) {
        // `par::planes` hands over a frame with no rows once, as one empty band
        let Some(ok) = band.pop().filter(|_| w > 0) else {
            return;
        };
        let Ok(mut vals) = <[&mut [f32]; N]>::try_from(band) else {
            return;
        };
        let lo = before.max(2) as f64;
        let (xmax, ymax) = (self.sw as f64 - after as f64, self.sh as f64 - after as f64);
        for (r, ok) in ok.chunks_exact_mut(w).enumerate() {
            let mut rows = vals.each_mut().map(|p| &mut p[r * w..][..w]);
            let (mut sx, mut sy) = self.m.apply(0.0, (y0 + r) as f64);
            for (x, valid) in ok.iter_mut().enumerate() {
                let inside = (lo..=xmax).contains(&sx) && (lo..=ymax).contains(&sy);
                *valid = if inside { 1.0 } else { 0.0 };
                if inside {
                    let (ix, iy) = (sx as usize, sy as usize);
                    let (fx, fy) = ((sx - ix as f64) as f32, (sy - iy as f64) as f32);
                    let v = sample(&self.src, ix, iy, fx, fy);
                    for (row, v) in rows.iter_mut().zip(v) {
                        row[x] = v;
                    }
                } else {
                    rows.iter_mut().for_each(|row| row[x] = 0.0);
                }
                sx += self.m.0[0];
                sy += self.m.0[3];
            }
        }
    }
}

/// Bilinear interpolation at (fx, fy) in the 2 x 2 `block` (rows `sw` apart).
#[inline]
fn bilinear(block: &[f32], sw: usize, fx: f32, fy: f32) -> f32 {
    let top = block[0] + fx * (block[1] - block[0]);
    let bottom = block[sw] + fx * (block[sw + 1] - block[sw]);
    top + fy * (bottom - top)
}

/// The 6 x 6 Lanczos sum over `block`, which starts at the top-left tap (rows `sw` apart).
#[inline]
fn taps(block: &[f32], sw: usize, wx: &[f32; 6], wy: &[f32; 6]) -> f32 {
    let row = |j: usize| {
        let t = &block[j * sw..j * sw + 6];
        t.iter().zip(wx).map(|(a, b)| a * b).sum::<f32>()
    };
    wy.iter().enumerate().map(|(j, w)| w * row(j)).sum()
}

/// `f` over `items` on up to `threads` scoped threads, results in order; an error when a
/// thread crashed (its share of the results is missing).
fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return Ok(items.iter().map(f).collect());
    }
    let per = items.len().div_ceil(threads);
    // every thread joined before any result is read, so none is left for the scope to re-raise
    let (first, rest) = items.split_at(per);
    let joined: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .chunks(per)
            .map(|c| {
                let f = &f;
                s.spawn(move || c.iter().map(f).collect::<Vec<R>>())
            })
            .collect();
        // the calling thread maps the first chunk rather than wait: one thread fewer to start;
        // a panic there is caught as a worker's would be, so every case gives the same error
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            first.iter().map(&f).collect::<Vec<R>>()
        }));
        std::iter::once(mine)
            .chain(handles.into_iter().map(|h| h.join()))
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for part in joined {
        let part = part.map_err(|_| {
            Error::Invalid(
                "registration: a worker thread crashed; the pair was not registered".into(),
            )
        })?;
        out.extend(part);
    }
    Ok(out)
}

/// One channel of w x h values.
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f32>,
}

fn luma(f: &Frame) -> Plane {
    let (r, g, b) = (f.plane(0), f.plane(1), f.plane(2));
    let v = r
        .iter()
        .zip(g)
        .zip(b)
        .map(|((&r, &g), &b)| luminance(r, g, b))
        .collect();
    Plane {
        w: f.width,
        h: f.height,
        v,
    }
}

/// 2 x 2 box average (an odd last row or column is dropped).
fn halve(p: &Plane) -> Plane {
    let (w, h) = (p.w / 2, p.h / 2);
    let mut v = vec![0.0f32; w * h];
    for (y, out) in v.chunks_exact_mut(w.max(1)).enumerate().take(h) {
        let r0 = &p.v[2 * y * p.w..][..2 * w];
        let r1 = &p.v[(2 * y + 1) * p.w..][..2 * w];
        for (x, o) in out.iter_mut().enumerate() {
            *o = 0.25 * (r0[2 * x] + r0[2 * x + 1] + r1[2 * x] + r1[2 * x + 1]);
        }
    }
    Plane { w, h, v }
}

/// Sobel gradient magnitude (luma per pixel); the 1 px border repeats its inner neighbour so
/// that warping near the edge sees no artificial step.
fn gradient(p: &Plane) -> Plane {
    let (w, h) = (p.w, p.h);
    let mut v = vec![0.0f32; w * h];
    for y in 1..h - 1 {
        let (up, mid, down) = (
            &p.v[(y - 1) * w..][..w],
            &p.v[y * w..][..w],
            &p.v[(y + 1) * w..][..w],
        );
        let out = &mut v[y * w..][..w];
        for x in 1..w - 1 {
            let gx = (up[x + 1] + 2.0 * mid[x + 1] + down[x + 1])
                - (up[x - 1] + 2.0 * mid[x - 1] + down[x - 1]);
            let gy =
                (down[x - 1] + 2.0 * down[x] + down[x + 1]) - (up[x - 1] + 2.0 * up[x] + up[x + 1]);
            out[x] = (gx * gx + gy * gy).sqrt() * 0.125;
        }
        out[0] = out[1];
        out[w - 1] = out[w - 2];
    }
    v.copy_within(w..2 * w, 0);
    v.copy_within((h - 2) * w..(h - 1) * w, (h - 1) * w);
    Plane { w, h, v }
}

/// Binomial [1 4 6 4 1] / 16 blur in both directions (sigma 1 px), borders repeated. Fine
/// texture gives correlation peaks about a pixel wide, and the quadratic through such a peak
/// pulls the estimate towards the nearest whole pixel (so the rounds converge slowly); the blur
/// widens the peak.
fn smooth(p: &Plane) -> Plane {
    const K: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
    let (w, h) = (p.w, p.h);
    let mut tmp = vec![0.0f32; w * h];
    let mut padded = vec![0.0f32; w + 4];
    for (src, out) in p.v.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        padded[..2].fill(src[0]);
        padded[2..w + 2].copy_from_slice(src);
        padded[w + 2..].fill(src[w - 1]);
        for (x, o) in out.iter_mut().enumerate() {
            let t = &padded[x..x + 5];
            *o = K[0] * (t[0] + t[4]) + K[1] * (t[1] + t[3]) + K[2] * t[2];
        }
    }
    let mut v = vec![0.0f32; w * h];
    for (y, out) in v.chunks_exact_mut(w).enumerate() {
        for (d, k) in K.iter().enumerate() {
            let sy = (y + d).saturating_sub(2).min(h - 1);
            let src = &tmp[sy * w..][..w];
            out.iter_mut().zip(src).for_each(|(o, s)| *o += k * s);
        }
    }
    Plane { w, h, v }
}

/// Difference of gaussians (sigma 1 and 2 px) of luma: a band-pass that keeps edges and
/// texture and drops shading. It is linear, so a blur or sharpen in the edit (a symmetric
/// filter) leaves its correlation peak in place, and per-tile ZNCC absorbs the local gain and
/// offset of a tone curve. (Gradient magnitudes are not linear: under a blur of sigma 2 px in
/// the edit, their tiles moved the pose by up to 2 px on an edited photo; this, by 0.2 px.)
fn band_pass(l: &Plane) -> Plane {
    let fine = smooth(l);
    let coarse = smooth(&smooth(&smooth(&fine)));
    let v = fine.v.iter().zip(&coarse.v).map(|(f, c)| f - c).collect();
    Plane { w: l.w, h: l.h, v }
}

/// One pyramid level of one feature: A's (with its square, for the correlation sums) and A''s.
struct Level {
    s: usize,
    a: Plane,
    a2: Vec<f32>,
    b: Plane,
}

impl Level {
    fn new(s: usize, a: Plane, b: Plane) -> Level {
        let a2 = a.v.iter().map(|v| v * v).collect();
        Level { s, a, a2, b }
    }
}

/// Band-pass levels 1, 2, 4, ... down to the one whose short side is 48 to 95 px (or full
/// resolution for frames under 96 px), and smoothed gradient magnitudes at that coarsest level
/// for the pose search: they stay alike through any change of tone or colour, even a contrast
/// reversal, which matters when one correlation must find the pose for the whole frame.
fn pyramid(before: &Frame, after: &Frame) -> (Vec<Level>, Level) {
    let (mut la, mut lb) = (luma(before), luma(after));
    let mut levels = Vec::new();
    let mut s = 1;
    loop {
        levels.push(Level::new(s, band_pass(&la), band_pass(&lb)));
        if la.w.min(la.h) / 2 < 48 {
            let coarse = Level::new(s, smooth(&gradient(&la)), smooth(&gradient(&lb)));
            return (levels, coarse);
        }
        (la, lb, s) = (halve(&la), halve(&lb), 2 * s);
    }
}

/// How a refinement round looks for each tile's shift: within ±radius level px, scoring every
/// shift, or climbing from no shift (~9 scores instead of (2r+1)²) once the estimate is
/// within about a pixel.
#[derive(Clone, Copy, Debug)]
struct Search {
    radius: usize,
    climb: bool,
}

/// Level indices and searches of the refinement rounds, coarse to fine. The first round takes
/// up what the coarse grid leaves (up to ~3 px at its level) by scoring every shift; each finer
/// level halves what remains; full resolution runs up to three rounds.
fn schedule(top: usize) -> Vec<(usize, Search)> {
    let climb = |radius| Search {
        radius,
        climb: true,
    };
    let mut rounds: Vec<(usize, Search)> = (1..top).rev().map(|k| (k, climb(3))).collect();
    rounds.extend([(0, climb(2)), (0, climb(2)), (0, climb(2))]);
    rounds[0].1 = Search {
        radius: 4,
        climb: false,
    };
    rounds
}

/// A rectangle of pixels.
#[derive(Clone, Copy, Debug)]
struct Rect {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

/// A''s feature warped onto a level's grid: values, and 1 where they are valid.
struct Moving {
    v: Vec<f32>,
    ok: Vec<f32>,
}

fn warp_level(lv: &Level, m: Affine, threads: usize) -> Moving {
    let (w, h) = (lv.a.w, lv.a.h);
    let (mut v, mut ok) = (vec![0.0f32; w * h], vec![0.0f32; w * h]);
    let warper = Warper {
        src: [&lv.b.v],
        sw: lv.b.w,
        sh: lv.b.h,
        m,
        cubic: false,
    };
    par::planes([&mut v, &mut ok], w, threads, |y0, band| {
        warper.band(y0, w, band.into())
    });
    Moving { v, ok }
}

/// A's side of a correlation over `r`, for shifts of up to `grow` px. Where the moving side is
/// valid under the whole shifted window (the usual case away from the frame's edge), A's sums
/// are fixed and each shift needs only the moving side's; elsewhere it takes the masked sums.
struct Template {
    r: Rect,
    grow: (usize, usize),
    /// [n, Σa, Σa²] of A over `r`.
    sums: [f64; 3],
    valid: Validity,
}

/// Where the moving side is valid, over the rectangle of a template grown by its shifts.
enum Validity {
    All,
    /// Counts of invalid pixels summed from the top-left corner (a summed-area table one
    /// wider and taller), to tell each shifted window apart.
    Counts(Vec<u32>),
    /// Not all, for a template with only the one shift.
    Partial,
}

impl Template {
    fn new(lv: &Level, mv: &Moving, r: Rect, grow: (usize, usize)) -> Template {
        let w = lv.a.w;
        let mut sums = [(r.w * r.h) as f64, 0.0, 0.0];
        for y in r.y..r.y + r.h {
            let (s, s2) = sum_and_squares(&lv.a.v[y * w + r.x..][..r.w]);
            sums[1] += s;
            sums[2] += s2;
        }
        let (gw, gh) = (r.w + 2 * grow.0, r.h + 2 * grow.1);
        let rows = || (0..gh).map(|y| &mv.ok[(r.y - grow.1 + y) * w + r.x - grow.0..][..gw]);
        let invalid = |row: &[f32]| row.iter().fold(0u32, |n, &v| n + u32::from(v < 0.5));
        let valid = if rows().all(|row| invalid(row) == 0) {
            Validity::All
        } else if grow == (0, 0) {
            Validity::Partial
        } else {
            let mut counts = vec![0u32; (gw + 1) * (gh + 1)];
            for (y, row) in rows().enumerate() {
                let mut run = 0;
                for (x, &v) in row.iter().enumerate() {
                    run += u32::from(v < 0.5);
                    counts[(y + 1) * (gw + 1) + x + 1] = counts[y * (gw + 1) + x + 1] + run;
                }
            }
            Validity::Counts(counts)
        };
        Template {
            r,
            grow,
            sums,
            valid,
        }
    }

    /// Whether the moving side is valid under the whole window shifted by (sx, sy).
    fn valid_at(&self, sx: isize, sy: isize) -> bool {
        let counts = match &self.valid {
            Validity::All => return true,
            Validity::Partial => return false,
            Validity::Counts(c) => c,
        };
        let stride = self.r.w + 2 * self.grow.0 + 1;
        let x0 = (sx + self.grow.0 as isize) as usize;
        let y0 = (sy + self.grow.1 as isize) as usize;
        let (x1, y1) = (x0 + self.r.w, y0 + self.r.h);
        let at = |x: usize, y: usize| counts[y * stride + x];
        at(x1, y1) + at(x0, y0) == at(x0, y1) + at(x1, y0)
    }
}

/// Σv and Σv² of a row.
fn sum_and_squares(row: &[f32]) -> (f64, f64) {
    let mut s = [[0.0f32; LANES]; 2];
    let body = row.len() - row.len() % LANES;
    for c in row[..body].chunks_exact(LANES) {
        for l in 0..LANES {
            s[0][l] += c[l];
            s[1][l] += c[l] * c[l];
        }
    }
    for &v in &row[body..] {
        s[0][0] += v;
        s[1][0] += v * v;
    }
    let total = |lanes: &[f32; LANES]| lanes.iter().sum::<f32>() as f64;
    (total(&s[0]), total(&s[1]))
}

/// ZNCC of A's feature over the template against the moving one shifted by (sx, sy), counting
/// only pixels where the moving one is valid. None when under half of them are, or either side
/// is flat. The shift stays within the template's `grow`, and the grown rectangle inside the
/// frame.
fn zncc(lv: &Level, mv: &Moving, t: &Template, sx: isize, sy: isize) -> Option<f64> {
    let (w, r) = (lv.a.w, t.r);
    let fixed = t.valid_at(sx, sy);
    let mut acc = [0.0f64; 6];
    for y in r.y..r.y + r.h {
        let ia = y * w + r.x;
        let ib = ((y as isize + sy) * w as isize + r.x as isize + sx) as usize;
        let (a, b) = (&lv.a.v[ia..][..r.w], &mv.v[ib..][..r.w]);
        if fixed {
            moving_sums(a, b, &mut acc);
        } else {
            masked_sums([a, &lv.a2[ia..][..r.w]], [b, &mv.ok[ib..][..r.w]], &mut acc);
        }
    }
    if fixed {
        acc[..3].copy_from_slice(&t.sums);
    }
    let [n, sa, saa, sb, sbb, sab] = acc;
    if n < 0.5 * (r.w * r.h) as f64 {
        return None;
    }
    let va = saa - sa * sa / n;
    let vb = sbb - sb * sb / n;
    if va <= MIN_TILE_VAR * n || vb <= MIN_TILE_VAR * n {
        return None;
    }
    // NaN or infinite pixels give no score rather than a NaN one
    Some((sab - sa * sb / n) / (va * vb).sqrt()).filter(|z| z.is_finite())
}

/// Eight f32 lanes let the sums vectorise; a row's sums are short enough for f32, and go on in
/// f64.
const LANES: usize = 8;
const MASKED_LANES: usize = 4;

/// Adds one row's [Σb, Σb², Σab] to acc[3..6].
#[inline]
fn moving_sums(a: &[f32], b: &[f32], acc: &mut [f64; 6]) {
    let mut s = [[0.0f32; LANES]; 3];
    let body = a.len() - a.len() % LANES;
    let chunks = a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES));
    for (ca, cb) in chunks {
        for l in 0..LANES {
            s[0][l] += cb[l];
            s[1][l] += cb[l] * cb[l];
            s[2][l] += ca[l] * cb[l];
        }
    }
    for (&a, &b) in a[body..].iter().zip(&b[body..]) {
        s[0][0] += b;
        s[1][0] += b * b;
        s[2][0] += a * b;
    }
    for (t, lanes) in acc[3..].iter_mut().zip(&s) {
        *t += lanes.iter().sum::<f32>() as f64;
    }
}

/// Adds one row's [valid count, Σa, Σa², Σb, Σb², Σab] to `acc`, where b (0 where invalid) and
/// its validity come in `[b, ok]`.
#[inline]
fn masked_sums([a, a2]: [&[f32]; 2], [b, ok]: [&[f32]; 2], acc: &mut [f64; 6]) {
    let mut s = [[0.0f32; MASKED_LANES]; 6];
    let body = a.len() - a.len() % MASKED_LANES;
    let chunks = a[..body]
        .chunks_exact(MASKED_LANES)
        .zip(a2[..body].chunks_exact(MASKED_LANES))
        .zip(
            b[..body]
                .chunks_exact(MASKED_LANES)
                .zip(ok[..body].chunks_exact(MASKED_LANES)),
        );
    for ((ca, ca2), (cb, co)) in chunks {
        for l in 0..MASKED_LANES {
            s[0][l] += co[l];
            s[1][l] += co[l] * ca[l];
            s[2][l] += co[l] * ca2[l];
            s[3][l] += cb[l];
            s[4][l] += cb[l] * cb[l];
            s[5][l] += ca[l] * cb[l];
        }
    }
    for i in body..a.len() {
        s[0][0] += ok[i];
        s[1][0] += ok[i] * a[i];
        s[2][0] += ok[i] * a2[i];
        s[3][0] += b[i];
        s[4][0] += b[i] * b[i];
        s[5][0] += a[i] * b[i];
    }
    for (t, lanes) in acc.iter_mut().zip(&s) {
        *t += lanes.iter().sum::<f32>() as f64;
    }
}

/// The best pose over the grid of rotations and scales, each with its best shift in range (see
/// `best_shift`), at the coarsest level; with its whole-frame ZNCC.
fn coarse_search(lv: &Level, size: (usize, usize), threads: usize) -> Result<(Similarity, f64)> {
    let (lw, lh) = (lv.a.w, lv.a.h);
    // a coarse pixel of slack beyond the supported shift
    let rx = (MAX_SHIFT * lw as f64).ceil() as usize + 1;
    let ry = (MAX_SHIFT * lh as f64).ceil() as usize + 1;
    let frame = Rect {
        x: rx,
        y: ry,
        w: lw - 2 * rx,
        h: lh - 2 * ry,
    };
    let poses: Vec<Similarity> = COARSE_ANGLES
        .iter()
        .flat_map(|&angle_deg| {
            COARSE_SCALES.iter().map(move |&scale| Similarity {
                angle_deg,
                scale,
                ..Similarity::IDENTITY
            })
        })
        .collect();
    let found = par_map(&poses, threads, |pose| {
        let mv = warp_level(lv, Affine::at_level(pose, size, lv.s), 1);
        let t = Template::new(lv, &mv, frame, (rx, ry));
        let best = best_shift(|tx, ty| zncc(lv, &mv, &t, tx, ty), rx as isize, ry as isize);
        // A(p) matches the rotated copy at p + t, i.e. A' at c + A (p + t - c): the shift of M
        // is A t, in level pixels
        let (a, b) = pose.ab();
        let (tx, ty, s) = (best.1 as f64, best.2 as f64, lv.s as f64);
        let sim = Similarity {
            dx: s * (a * tx - b * ty),
            dy: s * (b * tx + a * ty),
            ..*pose
        };
        (sim, best.0)
    })?;
    Ok(found
        .into_iter()
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .unwrap_or((Similarity::IDENTITY, f64::NEG_INFINITY)))
}

/// The shift within ±rx, ±ry where `score` peaks, as (score, tx, ty): every other shift first
/// (the smoothed coarse gradients make peaks several pixels wide), then around the best of those.
fn best_shift(
    score: impl Fn(isize, isize) -> Option<f64>,
    rx: isize,
    ry: isize,
) -> (f64, isize, isize) {
    let consider = |best: &mut (f64, isize, isize), tx: isize, ty: isize| {
        if let Some(z) = score(tx, ty)
            && z > best.0
        {
            *best = (z, tx, ty);
        }
    };
    let mut best = (f64::NEG_INFINITY, 0, 0);
    for ty in (-ry..=ry).step_by(2) {
        for tx in (-rx..=rx).step_by(2) {
            consider(&mut best, tx, ty);
        }
    }
    let (_, cx, cy) = best;
    for ty in (cy - 1).max(-ry)..=(cy + 1).min(ry) {
        for tx in (cx - 1).max(-rx)..=(cx + 1).min(rx) {
            if (tx - cx) % 2 != 0 || (ty - cy) % 2 != 0 {
                consider(&mut best, tx, ty);
            }
        }
    }
    best
}

/// About 128 px tiles over the full frame, 3 to 8 a side.
fn tile_grid(w: usize, h: usize) -> Vec<Rect> {
    let count = |side: usize| ((side as f64 / 128.0).round() as usize).clamp(3, 8);
    let (nx, ny) = (count(w), count(h));
    let mut tiles = Vec::with_capacity(nx * ny);
    for j in 0..ny {
        for i in 0..nx {
            let (x, y) = (i * w / nx, j * h / ny);
            tiles.push(Rect {
                x,
                y,
                w: (i + 1) * w / nx - x,
                h: (j + 1) * h / ny - y,
            });
        }
    }
    tiles
}

/// A full-resolution tile on a level of factor `s` and size lw x lh, kept `r` px from the
/// border so that every shifted copy stays inside; None when under 8 x 8 px are left.
fn tile_at_level(t: Rect, s: usize, (lw, lh): (usize, usize), r: usize) -> Option<Rect> {
    let (x0, x1) = (
        (t.x / s).max(r),
        ((t.x + t.w) / s).min(lw.saturating_sub(r)),
    );
    let (y0, y1) = (
        (t.y / s).max(r),
        ((t.y + t.h) / s).min(lh.saturating_sub(r)),
    );
    (x1 >= x0 + 8 && y1 >= y0 + 8).then_some(Rect {
        x: x0,
        y: y0,
        w: x1 - x0,
        h: y1 - y0,
    })
}

/// Shift (level px) that best aligns the moving feature with A's over `r`, to sub-pixel
/// precision; None when the peak is weak, on the edge of the search, or not a clear maximum.
fn measure(lv: &Level, mv: &Moving, r: Rect, search: Search) -> Option<(f64, f64)> {
    let radius = search.radius;
    let t = Template::new(lv, mv, r, (radius, radius));
    let grid = ScoreGrid::search(|tx, ty| zncc(lv, mv, &t, tx, ty), radius, search.climb);
    let (bx, by) = grid.best;
    let rad = radius as isize;
    if grid.at(bx, by) < MIN_TILE_ZNCC || bx.abs() == rad || by.abs() == rad {
        return None;
    }
    let near = [-1, 0, 1].map(|dy| [-1, 0, 1].map(|dx| grid.at(bx + dx, by + dy)));
    let (ox, oy) = quadratic_peak(near)?;
    Some((bx as f64 + ox, by as f64 + oy))
}

/// Correlation scores of the shifts within ±radius (NaN where not scored, -inf where there is
/// no score), and the best one scored.
struct ScoreGrid {
    radius: isize,
    scores: Vec<f64>,
    best: (isize, isize),
}

impl ScoreGrid {
    fn search(score: impl Fn(isize, isize) -> Option<f64>, radius: usize, climb: bool) -> Self {
        let n = 2 * radius + 1;
        let rad = radius as isize;
        let mut grid = ScoreGrid {
            radius: rad,
            scores: vec![f64::NAN; n * n],
            best: (0, 0),
        };
        let visit = |g: &mut ScoreGrid, x: isize, y: isize| {
            let k = g.index(x, y);
            if g.scores[k].is_nan() {
                g.scores[k] = score(x, y).unwrap_or(f64::NEG_INFINITY);
            }
            if g.scores[k] > g.at(g.best.0, g.best.1) || g.at(g.best.0, g.best.1).is_nan() {
                g.best = (x, y);
            }
        };
        if !climb {
            for y in -rad..=rad {
                for x in -rad..=rad {
                    visit(&mut grid, x, y);
                }
            }
            return grid;
        }
        // scores rise along the climb, so it ends
        loop {
            let (cx, cy) = grid.best;
            for y in (cy - 1).max(-rad)..=(cy + 1).min(rad) {
                for x in (cx - 1).max(-rad)..=(cx + 1).min(rad) {
                    visit(&mut grid, x, y);
                }
            }
            if grid.best == (cx, cy) {
                return grid;
            }
        }
    }

    fn index(&self, x: isize, y: isize) -> usize {
        let n = 2 * self.radius + 1;
        ((y + self.radius) * n + x + self.radius) as usize
    }

    fn at(&self, x: isize, y: isize) -> f64 {
        self.scores[self.index(x, y)]
    }
}

/// Offset of the maximum of the quadratic through a 3 x 3 neighbourhood g[dy][dx] of the
/// largest score; None unless it is a clear maximum (a ridge is an edge without corners, whose
/// position along the edge is unknown).
fn quadratic_peak(g: [[f64; 3]; 3]) -> Option<(f64, f64)> {
    if g.iter().flatten().any(|v| !v.is_finite()) {
        return None;
    }
    let (gx, gy) = ((g[1][2] - g[1][0]) / 2.0, (g[2][1] - g[0][1]) / 2.0);
    let hxx = g[1][2] - 2.0 * g[1][1] + g[1][0];
    let hyy = g[2][1] - 2.0 * g[1][1] + g[0][1];
    let hxy = (g[2][2] - g[0][2] - g[2][0] + g[0][0]) / 4.0;
    let det = hxx * hyy - hxy * hxy;
    // det / trace² is about the ratio of the two curvatures: under 1:50, a ridge
    if hxx >= 0.0 || det <= 0.02 * (hxx + hyy).powi(2) {
        return None;
    }
    let ox = -(hyy * gx - hxy * gy) / det;
    let oy = -(hxx * gy - hxy * gx) / det;
    (ox.abs() <= 1.0 && oy.abs() <= 1.0).then_some((ox, oy))
}

/// A point of A and where it shows in A', in full-resolution pixels.
type Pair = ((f64, f64), (f64, f64));

/// One refinement round's outcome.
struct Round {
    sim: Similarity,
    tiles: usize,
    measured: usize,
    inliers: usize,
    rms: f64,
    /// ZNCC of the whole overlap as warped by the round's starting estimate (full resolution
    /// only, else NaN).
    overlap_zncc: f64,
}

/// One refinement round on a level: warp A' by `sim`, measure each tile's remaining shift, and
/// refit the similarity to where the tile centres really are.
fn refine(
    lv: &Level,
    sim: &Similarity,
    size: (usize, usize),
    tiles: &[Rect],
    search: Search,
    threads: usize,
) -> Result<Option<Round>> {
    let m = Affine::at_level(sim, size, lv.s);
    let mv = warp_level(lv, m, threads);
    let rects: Vec<Rect> = tiles
        .iter()
        .filter_map(|&t| tile_at_level(t, lv.s, (lv.a.w, lv.a.h), search.radius))
        .collect();
    let shifts = par_map(&rects, threads, |&r| measure(lv, &mv, r, search))?;
    let (s, o) = (lv.s as f64, (lv.s as f64 - 1.0) / 2.0);
    let pairs: Vec<Pair> = rects
        .iter()
        .zip(shifts)
        .filter_map(|(r, d)| {
            let (dx, dy) = d?;
            let (px, py) = (
                r.x as f64 + (r.w - 1) as f64 / 2.0,
                r.y as f64 + (r.h - 1) as f64 / 2.0,
            );
            let (qx, qy) = m.apply(px + dx, py + dy);
            Some(((s * px + o, s * py + o), (s * qx + o, s * qy + o)))
        })
        .collect();
    let Some((sim, inliers, rms)) = robust_fit(&pairs, size, OUTLIER_PX * s) else {
        return Ok(None);
    };
    Ok(Some(Round {
        sim,
        tiles: tiles.len(),
        measured: pairs.len(),
        inliers,
        rms,
        overlap_zncc: if lv.s == 1 {
            overlap_zncc(lv, &mv)
        } else {
            f64::NAN
        },
    }))
}

/// ZNCC of the whole overlap of A and the warped A'.
fn overlap_zncc(lv: &Level, mv: &Moving) -> f64 {
    let whole = Rect {
        x: 0,
        y: 0,
        w: lv.a.w,
        h: lv.a.h,
    };
    let t = Template::new(lv, mv, whole, (0, 0));
    zncc(lv, mv, &t, 0, 0).unwrap_or(f64::NEG_INFINITY)
}

/// Least-squares similarity through `pairs`, dropping the worst pair while it is over `thr` px
/// off (down to 3 pairs). Returns the fit, how many pairs are within `thr` and their RMS.
fn robust_fit(
    pairs: &[Pair],
    (w, h): (usize, usize),
    thr: f64,
) -> Option<(Similarity, usize, f64)> {
    let mut keep = vec![true; pairs.len()];
    loop {
        let sim = fit_similarity(pairs, &keep, (w, h))?;
        let res: Vec<f64> = pairs
            .iter()
            .map(|&(p, q)| {
                let (mx, my) = sim.map(w, h, p.0, p.1);
                (mx - q.0).hypot(my - q.1)
            })
            .collect();
        let kept: Vec<usize> = (0..pairs.len()).filter(|&i| keep[i]).collect();
        let worst = *kept.iter().max_by(|&&i, &&j| res[i].total_cmp(&res[j]))?;
        if res[worst] > thr && kept.len() > 3 {
            keep[worst] = false;
            continue;
        }
        let good: Vec<f64> = kept.iter().map(|&i| res[i]).filter(|&r| r <= thr).collect();
        let rms = if good.is_empty() {
            f64::INFINITY
        } else {
            (good.iter().map(|r| r * r).sum::<f64>() / good.len() as f64).sqrt()
        };
        return Some((sim, good.len(), rms));
    }
}

/// Least-squares similarity about the frame centre through the kept pairs: with P, Q the
/// centred points less their means, a = Σ P·Q / Σ|P|², b = Σ P×Q / Σ|P|².
fn fit_similarity(pairs: &[Pair], keep: &[bool], (w, h): (usize, usize)) -> Option<Similarity> {
    let (cx, cy) = centre(w, h);
    let kept: Vec<Pair> = pairs
        .iter()
        .zip(keep)
        .filter(|&(_, &k)| k)
        .map(|(&(p, q), _)| ((p.0 - cx, p.1 - cy), (q.0 - cx, q.1 - cy)))
        .collect();
    if kept.len() < 2 {
        return None;
    }
    let n = kept.len() as f64;
    let mean = |f: fn(&Pair) -> f64| kept.iter().map(f).sum::<f64>() / n;
    let (pmx, pmy, qmx, qmy) = (
        mean(|k| k.0.0),
        mean(|k| k.0.1),
        mean(|k| k.1.0),
        mean(|k| k.1.1),
    );
    let (mut spp, mut dot, mut cross) = (0.0, 0.0, 0.0);
    for &((px, py), (qx, qy)) in &kept {
        let (px, py, qx, qy) = (px - pmx, py - pmy, qx - qmx, qy - qmy);
        spp += px * px + py * py;
        dot += px * qx + py * qy;
        cross += px * qy - py * qx;
    }
    if spp < 1e-9 {
        return None;
    }
    let (a, b) = (dot / spp, cross / spp);
    Some(Similarity {
        dx: qmx - (a * pmx - b * pmy),
        dy: qmy - (b * pmx + a * pmy),
        angle_deg: b.atan2(a).to_degrees(),
        scale: a.hypot(b),
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::TAU;

    #[test]
    fn a_moved_pair_leaves_out_the_bands_its_edges_padded() {
        let (w, h, reach) = (40, 30, 4.0);
        let masked = |sim: Similarity| {
            let mut mask = vec![true; w * h];
            mask_frame_edges(&sim, (w, h), reach, &mut mask);
            mask
        };
        // aligned: both shots padded alike at every edge, so nothing is left out
        assert!(masked(Similarity::IDENTITY).iter().all(|&k| k));
        // a shift along x: the top and bottom edges run together, the left and right do not
        let shifted = masked(Similarity {
            dx: 6.0,
            ..Similarity::IDENTITY
        });
        let at = |m: &[bool], x: usize, y: usize| m[y * w + x];
        assert!(at(&shifted, 20, 0) && at(&shifted, 20, h - 1));
        assert!(!at(&shifted, 3, 15) && at(&shifted, 4, 15));
        // A' ends 6 px before A's right edge: its last 4 px are within reach of A''s edge
        assert!(!at(&shifted, w - 7, 15) && at(&shifted, w - 11, 15));
        // a turn about the centre: the edges part away from where they cross A's (the middle of
        // each side, where they run within half a pixel), and the middle of the frame is kept
        let turned = masked(Similarity {
            angle_deg: 3.0,
            ..Similarity::IDENTITY
        });
        assert!(at(&turned, 20, 15));
        assert!(
            [(36, 0), (3, h - 1), (0, 3), (w - 1, 26), (36, 2)]
                .iter()
                .all(|&(x, y)| !at(&turned, x, y))
        );
        // a mask already cleared stays cleared
        let mut mask = vec![false; w * h];
        mask_frame_edges(&Similarity::IDENTITY, (w, h), reach, &mut mask);
        assert!(mask.iter().all(|&k| !k));
    }

    /// The Lanczos weights from three sines match the textbook form, sinc(x) sinc(x / 3).
    #[test]
    fn lanczos_weights_match_their_definition() {
        let sinc = |x: f64| {
            if x.abs() < 1e-9 {
                1.0
            } else {
                (std::f64::consts::PI * x).sin() / (std::f64::consts::PI * x)
            }
        };
        for i in 0..=64 {
            let t = i as f32 / 64.0;
            let w: [f64; 6] = std::array::from_fn(|k| {
                let x = t as f64 - (k as f64 - 2.0);
                sinc(x) * sinc(x / 3.0)
            });
            let sum: f64 = w.iter().sum();
            for (got, want) in lanczos3(t).iter().zip(w.map(|v| v / sum)) {
                assert!(
                    (*got as f64 - want).abs() < 1e-6,
                    "t {t}: {got} against {want}"
                );
            }
        }
    }

    /// Where A' is resampled between its pixels, A low-passed alike matches the warped A'
    /// better than the sharp A does; a whole-pixel shift resamples nothing and needs no match.
    #[test]
    fn the_before_shot_is_low_passed_as_the_warp_low_passes_the_after_shot() {
        let (w, h) = (160, 120);
        // detail near the sampling limit: waves 2.3 to 3.5 px long, in every direction
        let mut r = Lcg(7);
        let waves = (0..8)
            .map(|_| {
                let (dir, k) = (r.next() * TAU, TAU / (2.3 + 1.2 * r.next()));
                [k * dir.cos(), k * dir.sin(), r.next() * TAU, 0.04]
            })
            .collect();
        let scene = Scene {
            waves,
            rects: Vec::new(),
        };
        let a = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
        for truth in [sim(3.5, -2.5, 0.0, 1.0), sim(4.0, -3.0, 3.0, 1.04)] {
            let a2 = render(&scene, w, h, &truth, 1.0);
            let (warped, mask) = warp(&a2, &truth);
            let matched = match_resampling(&a, &truth, 2).unwrap();
            let sharp = masked_psnr(&a, &warped, &mask);
            let alike = masked_psnr(&matched, &warped, &mask);
            eprintln!("{truth:?}: sharp A {sharp:.2} dB, matched A {alike:.2} dB");
            assert!(
                alike > sharp + 1.0,
                "{truth:?}: {alike:.2} against {sharp:.2} dB"
            );
        }
        assert!(match_resampling(&a, &sim(3.0, -2.0, 0.0, 1.0), 2).is_none());
    }

    #[test]
    fn an_empty_frame_warps_to_an_empty_frame() {
        // a turn is no integer shift, so each of these goes through the banded warp
        let sim = Similarity {
            angle_deg: 3.0,
            ..Similarity::IDENTITY
        };
        for (w, h) in [(0, 4), (4, 0), (0, 0)] {
            let (out, ok) = warp(&Frame::zeros(w, h), &sim);
            assert_eq!(
                (out.width, out.height, out.data.len(), ok.len()),
                (w, h, 0, 0)
            );
        }
    }

    /// A fixed-seed LCG, for reproducible scenes.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A textured analytic scene on the whole plane, rendered at any pose without
    /// interpolation: a few waves plus many soft-edged rectangles, squashed smoothly into
    /// (0.1, 0.9). Edges are soft (about 3 px) so that a bicubic warp can reproduce them.
    struct Scene {
        waves: Vec<[f64; 4]>,
        rects: Vec<[f64; 5]>,
    }

    impl Scene {
        fn new(seed: u64, w: usize, h: usize) -> Scene {
            let mut r = Lcg(seed);
            let waves = (0..6)
                .map(|_| {
                    let (dir, k) = (r.next() * TAU, TAU / (12.0 + 60.0 * r.next()));
                    [
                        k * dir.cos(),
                        k * dir.sin(),
                        r.next() * TAU,
                        0.05 + 0.05 * r.next(),
                    ]
                })
                .collect();
            // rectangles also beyond the frame: the moved shot sees past its edges
            let (ew, eh) = (1.5 * w as f64, 1.5 * h as f64);
            let rects = (0..w * h / 1200)
                .map(|_| {
                    let (x, y) = (
                        r.next() * ew - 0.25 * w as f64,
                        r.next() * eh - 0.25 * h as f64,
                    );
                    let (rw, rh) = (4.0 + 40.0 * r.next(), 4.0 + 40.0 * r.next());
                    [x, y, x + rw, y + rh, (r.next() - 0.5) * 0.6]
                })
                .collect();
            Scene { waves, rects }
        }

        fn at(&self, x: f64, y: f64) -> f64 {
            let soft = |d: f64| 1.0 / (1.0 + (-d / 0.7).exp());
            let mut v = 0.0;
            for w in &self.waves {
                v += w[3] * (w[0] * x + w[1] * y + w[2]).sin();
            }
            for r in &self.rects {
                if x < r[0] - 8.0 || x > r[2] + 8.0 || y < r[1] - 8.0 || y > r[3] + 8.0 {
                    continue;
                }
                v += r[4] * soft(x - r[0]) * soft(r[2] - x) * soft(y - r[1]) * soft(r[3] - y);
            }
            0.5 + 0.4 * (v / 0.4).tanh()
        }
    }

    /// The scene as shot at pose `sim` from the before shot (after pixel q shows what before
    /// shows at M^-1(q)), times `gain` (exposure), clamped to [0, 1].
    fn render(scene: &Scene, w: usize, h: usize, sim: &Similarity, gain: f64) -> Frame {
        let (cx, cy) = centre(w, h);
        let (a, b) = sim.ab();
        let d = a * a + b * b;
        let mut f = Frame::zeros(w, h);
        let n = w * h;
        for y in 0..h {
            for x in 0..w {
                let (qx, qy) = (x as f64 - cx - sim.dx, y as f64 - cy - sim.dy);
                // M^-1: the inverse of [[a, -b], [b, a]] is [[a, b], [-b, a]] / (a² + b²)
                let (px, py) = (cx + (a * qx + b * qy) / d, cy + (-b * qx + a * qy) / d);
                let v = scene.at(px, py);
                let i = y * w + x;
                for (c, (k, o)) in [(1.0, 0.0), (0.85, 0.08), (0.7, 0.15)].iter().enumerate() {
                    f.data[c * n + i] = ((k * v + o) * gain).clamp(0.0, 1.0) as f32;
                }
            }
        }
        f
    }

    fn sim(dx: f64, dy: f64, angle_deg: f64, scale: f64) -> Similarity {
        Similarity {
            dx,
            dy,
            angle_deg,
            scale,
        }
    }

    /// PSNR of `a` against `b` over the mask.
    fn masked_psnr(a: &Frame, b: &Frame, mask: &[bool]) -> f64 {
        let n = a.width * a.height;
        let (mut se, mut count) = (0.0, 0usize);
        for c in 0..3 {
            for i in (0..n).filter(|&i| mask[i]) {
                se += ((a.data[c * n + i] - b.data[c * n + i]) as f64).powi(2);
                count += 1;
            }
        }
        10.0 * (count as f64 / se.max(1e-12)).log10()
    }

    /// Registers the scene against itself moved by `truth` (and exposed by `gain`); returns
    /// the registration and its largest corner error.
    fn check(w: usize, h: usize, truth: Similarity, gain: f64) -> (Registration, f64, Scene) {
        let scene = Scene::new(7, w, h);
        let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
        let after = render(&scene, w, h, &truth, gain);
        let reg = register(&before, &after, 2).unwrap();
        let err = reg.sim.distance(&truth, w, h);
        eprintln!("{w}x{h} truth {truth:?}: {reg:?}, corner error {err:.3} px");
        (reg, err, scene)
    }

    #[test]
    fn identity_pair_is_exact() {
        for (w, h) in [(320, 240), (640, 480)] {
            let (reg, err, scene) = check(w, h, Similarity::IDENTITY, 1.0);
            assert!(reg.registered && err <= 0.05, "{reg:?}");
            assert!(reg.sim.is_integer_shift(w, h));
            let after = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
            let (out, mask) = warp(&after, &reg.sim);
            assert_eq!(out, after);
            assert!(mask.iter().all(|&m| m));
        }
    }

    #[test]
    fn integer_shift_is_exact() {
        for (w, h) in [(320, 240), (640, 480)] {
            let truth = sim(17.0, -9.0, 0.0, 1.0);
            let (reg, err, scene) = check(w, h, truth, 1.0);
            assert!(reg.registered && err == 0.0, "{reg:?}");
            let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
            let (out, mask) = warp(&render(&scene, w, h, &truth, 1.0), &reg.sim);
            assert_eq!(mask.iter().filter(|&&m| m).count(), (w - 17) * (h - 9));
            let n = w * h;
            for c in 0..3 {
                for i in (0..n).filter(|&i| mask[i]) {
                    assert_eq!(out.data[c * n + i], before.data[c * n + i]);
                }
            }
        }
    }

    #[test]
    fn rotation_scale_shift_and_exposure() {
        for (w, h) in [(320, 240), (640, 480)] {
            let truth = sim(20.0, -12.0, 4.0, 1.05);
            let (reg, err, scene) = check(w, h, truth, 1.2);
            assert!(reg.registered && err <= 0.3, "{reg:?} error {err}");
            // the warp of the unexposed after shot reproduces the before shot
            let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
            let (out, mask) = warp(&render(&scene, w, h, &truth, 1.0), &reg.sim);
            let psnr = masked_psnr(&out, &before, &mask);
            let share = mask.iter().filter(|&&m| m).count() as f64 / (w * h) as f64;
            eprintln!(
                "  warp PSNR {psnr:.1} dB over {:.0}% of the frame",
                100.0 * share
            );
            assert!(psnr > 30.0 && share > 0.6);
        }
    }

    #[test]
    fn largest_supported_motion() {
        for (w, h, dy) in [(320, 240, 0.0), (640, 480, -0.1)] {
            let truth = sim(0.1 * w as f64, dy * h as f64, -5.0, 0.92);
            let (reg, err, _) = check(w, h, truth, 1.0);
            assert!(reg.registered && err <= 0.5, "{reg:?} error {err}");
        }
    }

    #[test]
    fn unrelated_images_do_not_register() {
        for (w, h) in [(320, 240), (640, 480)] {
            let a = render(&Scene::new(1, w, h), w, h, &Similarity::IDENTITY, 1.0);
            let b = render(&Scene::new(2, w, h), w, h, &Similarity::IDENTITY, 1.0);
            let reg = register(&a, &b, 2).unwrap();
            eprintln!("{w}x{h} unrelated: {reg:?}");
            assert!(!reg.registered);
        }
    }

    #[test]
    fn motion_beyond_the_ranges_does_not_register() {
        let (w, h) = (320, 240);
        for truth in [
            sim(10.0, 5.0, 12.0, 1.0),
            sim(0.3 * w as f64, 0.0, 0.0, 1.0),
            sim(0.0, 0.0, 0.0, 1.3),
        ] {
            let (reg, _, _) = check(w, h, truth, 1.0);
            assert!(!reg.registered, "{reg:?}");
        }
    }

    #[test]
    fn non_finite_pixels_do_not_panic() {
        let (w, h) = (160, 120);
        let scene = Scene::new(4, w, h);
        let mut a = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
        let b = render(&scene, w, h, &sim(4.0, 2.0, 1.0, 1.0), 1.0);
        a.data.iter_mut().step_by(7).for_each(|v| *v = f32::NAN);
        a.data[5] = f32::INFINITY;
        let _ = register(&a, &b, 2).unwrap();
        let _ = warp(&a, &sim(1.5, 0.5, 1.0, 1.0));
        let _ = warp(&a, &sim(f64::NAN, 0.0, 0.0, 1.0));
    }

    #[test]
    fn flat_and_small_frames_do_not_register() {
        let mut grey = Frame::zeros(320, 240);
        grey.data.fill(0.5);
        assert!(!register(&grey, &grey, 2).unwrap().registered);
        for (w, h) in [(10, 10), (63, 200), (0, 0)] {
            let f = Frame::zeros(w, h);
            let reg = register(&f, &f, 1).unwrap();
            assert!(!reg.registered && reg.sim == Similarity::IDENTITY);
        }
        // different sizes
        assert!(
            !register(&Frame::zeros(64, 64), &Frame::zeros(65, 64), 1)
                .unwrap()
                .registered
        );
    }

    #[test]
    fn odd_sizes_do_not_panic() {
        for (w, h) in [
            (64, 64),
            (65, 97),
            (97, 65),
            (64, 400),
            (401, 64),
            (129, 131),
        ] {
            let scene = Scene::new(3, w, h);
            let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
            let truth = sim(3.0, -2.0, 2.0, 1.02);
            let reg = register(&before, &render(&scene, w, h, &truth, 1.0), 3).unwrap();
            eprintln!(
                "{w}x{h}: {reg:?} error {:.3}",
                reg.sim.distance(&truth, w, h)
            );
            let (out, mask) = warp(&before, &reg.sim);
            assert_eq!((out.width, out.height, mask.len()), (w, h, w * h));
        }
    }

    /// The frame blurred `passes` times by [1 2 1] / 4 in x and y (each pass adds 0.5 px² of
    /// variance), then through a tone curve and a colour change.
    fn edit(f: &Frame, passes: usize) -> Frame {
        let (w, h) = (f.width, f.height);
        let mut out = f.clone();
        for _ in 0..passes {
            for (step, len) in [(1, w), (w, h)] {
                let src = out.clone();
                for (i, v) in out.data.iter_mut().enumerate() {
                    let at = (i % (w * h)) / step % len;
                    if at > 0 && at + 1 < len {
                        *v = 0.5 * src.data[i] + 0.25 * (src.data[i - step] + src.data[i + step]);
                    }
                }
            }
        }
        let n = w * h;
        for (i, v) in out.data.iter_mut().enumerate() {
            *v = (v.powf(0.7) * [1.0, 0.95, 0.8][i / n]).clamp(0.0, 1.0);
        }
        out
    }

    #[test]
    fn edited_pair_registers() {
        // motion and exposure, then an edit: a tone curve, a colour change and a blur of
        // sigma 0.7 or 2 px (a blur moves the peaks of gradient magnitudes, not of band-pass)
        let (w, h) = (640, 480);
        let scene = Scene::new(11, w, h);
        let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
        let truth = sim(-30.0, 25.0, -3.0, 1.06);
        for passes in [1, 8] {
            let after = edit(&render(&scene, w, h, &truth, 1.1), passes);
            let reg = register(&before, &after, 2).unwrap();
            let err = reg.sim.distance(&truth, w, h);
            eprintln!("edited, {passes} blur passes: {reg:?} error {err:.3}");
            assert!(reg.registered && err <= 0.3);
        }
    }

    fn sample_pair() -> (Frame, Frame) {
        use crate::capture::file::{ImageLimits, load_image};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/samples");
        let lim = ImageLimits::default();
        let a = load_image(&dir.join("pair_before.jpg"), &lim).expect("sample");
        let b = load_image(&dir.join("pair_after.jpg"), &lim).expect("sample");
        (a, b)
    }

    #[test]
    fn sample_pair_is_the_known_shift() {
        // models/samples: an edited JPEG pair (tone curve, warm balance, sharpen) whose after
        // shot is the before shot moved by exactly (5, -3)
        let (a, b) = sample_pair();
        let reg = register(&a, &b, 2).unwrap();
        eprintln!("sample pair: {reg:?}");
        assert!(reg.registered);
        assert_eq!(reg.sim, sim(5.0, -3.0, 0.0, 1.0));
    }

    #[test]
    fn moved_sample_pair_registers() {
        // the after photo turned, scaled and shifted by `s` (a bicubic warp, then 8 bits), both
        // cropped to their middle so that no empty border shows: then after(s(p) - (5, -3))
        // shows before(p) in full-frame coordinates
        let (a, b) = sample_pair();
        let s = sim(-12.0, 9.0, 3.0, 1.04);
        let (moved, _) = warp(&b, &s);
        let (x0, y0, w, h) = (72, 52, 400, 280);
        let (a, moved) = (a.crop(x0, y0, w, h), moved.quantised().crop(x0, y0, w, h));
        let reg = register(&a, &moved, 2).unwrap();
        let (full_w, full_h) = (w + 2 * x0, h + 2 * y0);
        let err = corners(w, h)
            .iter()
            .map(|&(x, y)| {
                let (mx, my) = reg.sim.map(w, h, x, y);
                let (qx, qy) = s.map(full_w, full_h, mx + x0 as f64, my + y0 as f64);
                (qx - 5.0 - x - x0 as f64).hypot(qy + 3.0 - y - y0 as f64)
            })
            .fold(0.0, f64::max);
        eprintln!("moved sample pair: {reg:?}, corner error {err:.3} px");
        assert!(reg.registered && err <= 0.3);
    }

    /// A 64 x 48 grey frame with one white pixel at (20, 30) and one black in the blue channel
    /// only at (40, 10).
    fn two_clipped() -> Frame {
        let (w, h) = (64, 48);
        let mut f = Frame::zeros(w, h);
        f.data.fill(0.5);
        (0..3).for_each(|c| f.data[c * w * h + 30 * w + 20] = 1.0);
        f.data[2 * w * h + 10 * w + 40] = 0.0;
        f
    }

    #[test]
    fn clipped_targets_are_unknown() {
        let after = two_clipped();
        let (w, h) = (after.width, after.height);
        let cleared = |s: &Similarity| {
            let mut mask = vec![true; w * h];
            mask_clipped(&after, s, &mut mask);
            (0..w * h)
                .filter(|&i| !mask[i])
                .map(|i| (i % w, i / w))
                .collect::<Vec<_>>()
        };
        // copied pixels: exactly the two clipped ones, where the shift puts them
        assert_eq!(cleared(&Similarity::IDENTITY), vec![(40, 10), (20, 30)]);
        assert_eq!(cleared(&sim(2.0, -1.0, 0.0, 1.0)), vec![(38, 11), (18, 31)]);
        // resampled: every target pixel whose taps reach a clipped pixel (3 px), and no other
        let turned = sim(0.0, 0.0, 2.0, 1.0);
        let got = cleared(&turned);
        assert!(!got.is_empty());
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = turned.map(w, h, x as f64, y as f64);
                let near = |(cx, cy): (f64, f64)| (sx - cx).abs() <= 3.5 && (sy - cy).abs() <= 3.5;
                let far = |(cx, cy): (f64, f64)| (sx - cx).abs() > 2.5 || (sy - cy).abs() > 2.5;
                let is_cleared = got.contains(&(x, y));
                if is_cleared {
                    assert!(
                        near((20.0, 30.0)) || near((40.0, 10.0)),
                        "({x}, {y}) cleared"
                    );
                } else {
                    assert!(far((20.0, 30.0)) && far((40.0, 10.0)), "({x}, {y}) kept");
                }
            }
        }
    }

    #[test]
    fn similarity_helpers() {
        let (w, h) = (640, 480);
        assert!(Similarity::IDENTITY.is_integer_shift(w, h));
        assert!(sim(3.0, -4.0, 0.0, 1.0).is_integer_shift(w, h));
        assert!(!sim(3.5, -4.0, 0.0, 1.0).is_integer_shift(w, h));
        assert!(!sim(3.0, -4.0, 0.01, 1.0).is_integer_shift(w, h));
        assert!(!sim(3.0, -4.0, 0.0, 1.001).is_integer_shift(w, h));
        assert!((sim(3.0, -4.0, 0.0, 1.0).max_motion_px(w, h) - 5.0).abs() < 1e-9);
        // a 90° turn moves the corner (0, 0) by the length of the diagonal... times sqrt 2 / 2 * 2
        let m = sim(0.0, 0.0, 0.0, 1.1).max_motion_px(w, h);
        assert!((m - 0.1 * (319.5f64).hypot(239.5)).abs() < 1e-9);
        assert!(!sim(f64::NAN, 0.0, 0.0, 1.0).is_integer_shift(w, h));
    }

    #[test]
    fn only_a_quarter_pixel_or_more_off_the_grid_resamples() {
        let sim = |dx, angle_deg, scale| Similarity {
            dx,
            dy: 0.0,
            angle_deg,
            scale,
        };
        // an aligned pair's registration noise, and whole-pixel shifts, stay on the grid
        assert!(!sim(0.0, 0.01, 1.0).resamples(320, 240));
        assert!(!sim(3.0, 0.0, 1.0).resamples(320, 240));
        assert!(!sim(2.8, 0.0, 1.0).resamples(320, 240));
        // a third of a pixel, a turn of 1 degree, 1 % of scale: every pixel is interpolated
        assert!(sim(2.7, 0.0, 1.0).resamples(320, 240));
        assert!(sim(0.0, 1.0, 1.0).resamples(320, 240));
        assert!(sim(0.0, 0.0, 1.01).resamples(320, 240));
        assert!(sim(f64::NAN, 0.0, 1.0).resamples(320, 240));
    }

    #[test]
    fn warp_follows_the_similarity() {
        // a smooth ramp warps to the ramp at M(p), up to how closely Lanczos-3 reproduces
        // linear functions
        let (w, h) = (96, 80);
        let mut f = Frame::zeros(w, h);
        let n = w * h;
        for y in 0..h {
            for x in 0..w {
                f.data[y * w + x] = (0.004 * x as f32 + 0.005 * y as f32).min(1.0);
                f.data[n + y * w + x] = 0.5;
            }
        }
        let s = sim(2.3, -1.7, 3.0, 1.04);
        let (out, mask) = warp(&f, &s);
        let mut worst = 0.0f64;
        for y in 0..h {
            for x in 0..w {
                let (mx, my) = s.map(w, h, x as f64, y as f64);
                let inside =
                    (2.0..=(w - 4) as f64).contains(&mx) && (2.0..=(h - 4) as f64).contains(&my);
                assert_eq!(mask[y * w + x], inside);
                let want = if inside { 0.004 * mx + 0.005 * my } else { 0.0 };
                worst = worst.max((out.data[y * w + x] as f64 - want).abs());
            }
        }
        // Lanczos-3 is not exact on ramps: 1.8e-4 here, under 0.05 px of this ramp's slope
        assert!(worst < 5e-4, "{worst}");
    }

    #[test]
    #[ignore = "timing: cargo test --release --lib engine::align -- --ignored --nocapture"]
    fn timing_640x480() {
        let (w, h) = (640, 480);
        let scene = Scene::new(5, w, h);
        let before = render(&scene, w, h, &Similarity::IDENTITY, 1.0);
        let after = render(&scene, w, h, &sim(20.0, -12.0, 4.0, 1.05), 1.2);
        let mut times = Vec::new();
        for _ in 0..15 {
            let t = std::time::Instant::now();
            let reg = register(&before, &after, 2).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(reg.registered);
        }
        times.sort_by(f64::total_cmp);
        let t = std::time::Instant::now();
        let _ = warp(&after, &sim(20.0, -12.0, 4.0, 1.05));
        eprintln!(
            "register 640x480, 2 threads: min {:.1} ms, median {:.1} ms; warp {:.1} ms",
            times[0],
            times[times.len() / 2],
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
