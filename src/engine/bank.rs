//! The residual stage: a closed-form linear map, stored in the template, that runs after G on
//! features G's grid cannot express: more blur scales (detail layers are their differences
//! with the colour) and smooth position terms for vignette and lens shading.
//! out_c = G(delta, x)_c + sum_j w[j][c] * phi_j(x).
//!
//! Feature order (`NF` = 39): colour (3), blurs at sigma 1, 1.5, 2.5, 6, 12 (3 each), a bias,
//! then position: u, v, r2, r2^2, r2^3, and each of u, v, r2, r2^2, r2^3 times the colour
//! (u, v in [-1, 1] across the frame; r2 = (u^2 + v^2) / 2, 1 in the corners).
//!
//! How it runs: the weights of the features slicing computes anyway (colour, G's two blurs, the
//! bias) are added to G's grid before slicing ([`fold`]), which costs nothing per pixel. Its own
//! sigma 1 and 2.5 blurs (either alone where the template keeps one) are added to the output
//! tile by tile as they are made
//! (`filterbank::blur_add`), never kept as planes; the sigma-12 blur stays at quarter resolution
//! until one vectorised pass over the output rows interpolates it, with the position terms.

use pulp::{Simd, WithSimd};

use super::filterbank::{Blurs, TileAdd, blur_add, blur_into, gauss_kernel, load_n, store_n};
use super::model::{GRID, K, LBINS};
use super::{kernels, par};
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
/// The residual's features that slicing's features hold too, as (residual j, slicing k):
/// colour, G's two blurs and the bias. Their weights fold into G's grid (see [`fold`]).
const IN_SLICING: [(usize, usize); 10] = [
    (0, 0),
    (1, 1),
    (2, 2),
    (6, 3),
    (7, 4),
    (8, 5),
    (12, 6),
    (13, 7),
    (14, 8),
    (BIAS, 9),
];
/// The residual's own blurs: sigma 1 (`FINE + c`), 2.5 and 12.
const FINE: usize = 3;
const MID: usize = 9;
const WIDE: usize = 15;

/// A set of the blur scales (bit i: sigma 1, 1.5, 2.5, 6, 12, the planes `BLURS.start + 3i..`),
/// named by what `apply` pays for them.
pub type Scales = u8;
/// G's sigma 1.5 and 6: their weights fold into G's grid, free per pixel.
pub const SCALES_FOLDED: Scales = 0b01010;
/// The sigma-12 blur: one pass at quarter resolution, interpolated into the output.
pub const SCALES_WIDE: Scales = 1 << 4;
/// The residual's own sigma 1 and 2.5 blurs: one full-resolution blur per channel each (sigma
/// 2.5 has the longer kernel).
pub const SCALES_FINE: Scales = 1 << 0;
pub const SCALES_MID: Scales = 1 << 2;
pub const SCALES_ALL: Scales = 0b11111;
const _: () = assert!(scale(FINE) == 0 && scale(MID) == 2 && scale(WIDE) == 4);
const _: () = assert!(IN_SLICING[3].0 == BLURS.start + 3 && IN_SLICING[6].0 == BLURS.start + 9);

/// The scale (bit of [`Scales`]) of blur feature `j`, one of `BLURS`.
pub const fn scale(j: usize) -> usize {
    (j - BLURS.start) / 3
}

/// The scale (bit of [`Scales`]) of slicing's feature `k` where it is one of G's blurs (sigma
/// 1.5 or 6), from the features the two share ([`IN_SLICING`]).
pub fn slicing_blur_scale(k: usize) -> Option<usize> {
    IN_SLICING
        .iter()
        .find(|&&(_, ks)| ks == k)
        .map(|&(j, _)| j)
        .filter(|j| BLURS.contains(j))
        .map(scale)
}

/// The residual stage's own blurred planes of one frame, as learn's fit reads them per pixel
/// ([`features`]); apply keeps only the quarter-resolution sigma-12 ones.
pub struct Planes {
    /// Sigma 1 and 2.5 at full resolution, `[fine r, g, b, mid r, g, b]`.
    full: [Vec<f32>; 6],
    /// Sigma 12 at quarter resolution (`small_w x small_h`), `[channel]`; upsampled bilinearly.
    wide: [Vec<f32>; 3],
    small_w: usize,
    small_h: usize,
}

/// Whether weights `w` (`NF x 3`, feature-major) use any feature of `range`.
pub fn uses(w: &[f32], range: std::ops::Range<usize>) -> bool {
    w.len() == NF * 3
        && range
            .clone()
            .any(|j| w[3 * j..3 * j + 3].iter().any(|&v| v != 0.0))
}

/// The residual stage's own blurs of `f` at every scale, as learn's fit reads them.
pub fn planes(f: &Frame, threads: usize) -> Planes {
    planes_scaled(f, threads, 1.0)
}

/// [`planes`] with every sigma times `k` (as `filterbank::blurs_scaled`); the sigma-12 blur
/// scales its quarter-resolution gaussian, not the 4x4 block means before it.
pub fn planes_scaled(f: &Frame, threads: usize, k: f32) -> Planes {
    let mut p = Planes::none();
    let (w, h) = (f.width, f.height);
    let (k1, k2) = (gauss_kernel(SIGMA_FINE * k), gauss_kernel(SIGMA_MID * k));
    // fresh pages: only learn's fit reads these, once per pair, so they do not join G's pool
    p.full = std::array::from_fn(|_| vec![0.0f32; w * h]);
    let srcs = [f.plane(0), f.plane(1), f.plane(2)];
    blur_into(
        &srcs,
        w,
        h,
        &k1,
        &k2,
        p.full.each_mut().map(|v| v.as_mut_slice()),
        threads,
    );
    p.add_wide(f, threads, k);
    p
}

impl Planes {
    fn none() -> Self {
        Planes {
            full: Default::default(),
            wide: Default::default(),
            small_w: 0,
            small_h: 0,
        }
    }

    /// The sigma-12 blurs alone: all `apply` keeps of these planes.
    fn wide_only(f: &Frame, threads: usize) -> Self {
        let mut p = Planes::none();
        p.add_wide(f, threads, 1.0);
        p
    }

    /// The sigma-12 blurs of `f`'s channels, at quarter resolution: the three channels in one
    /// pass of the engine's threads each, not one per channel (the passes on these small planes
    /// cost more to start than to run at 640x480).
    fn add_wide(&mut self, f: &Frame, threads: usize, k: f32) {
        let (w, h) = (f.width, f.height);
        let (ws, hs) = (w.div_ceil(WIDE_STEP), h.div_ceil(WIDE_STEP));
        let mut small: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; ws * hs]);
        par::planes(
            small.each_mut().map(|v| v.as_mut_slice()),
            ws,
            threads,
            |ys0, bands| {
                for (c, band) in bands.into_iter().enumerate() {
                    box_rows(f.plane(c), w, h, ys0, band);
                }
            },
        );
        let k = gauss_kernel(SIGMA_WIDE * k / WIDE_STEP as f32);
        self.wide = std::array::from_fn(|_| vec![0.0f32; ws * hs]);
        let srcs = small.each_ref().map(|v| v.as_slice());
        let outs = self.wide.each_mut().map(|v| v.as_mut_slice());
        blur_into(&srcs, ws, hs, &[], &k, outs, threads.min(2));
        (self.small_w, self.small_h) = (ws, hs);
    }
}

/// The 4x4 block means of plane `p` (w x h) for the quarter-resolution rows from `ys0` that
/// `band` holds: with the sigma-3 blur at that size, a sigma-12 gaussian in 16x fewer taps than
/// at full resolution, upsampled bilinearly where it is read (the result is smooth either way).
fn box_rows(p: &[f32], w: usize, h: usize, ys0: usize, band: &mut [f32]) {
    let ws = w.div_ceil(WIDE_STEP);
    // the block's rows summed first: whole rows vectorise, and each pixel is read once
    let mut sum = vec![0.0f32; w];
    for (dy, out) in band.chunks_mut(ws).enumerate() {
        let y0 = (ys0 + dy) * WIDE_STEP;
        let y1 = (y0 + WIDE_STEP).min(h);
        sum.copy_from_slice(&p[y0 * w..(y0 + 1) * w]);
        for y in y0 + 1..y1 {
            sum.iter_mut()
                .zip(&p[y * w..(y + 1) * w])
                .for_each(|(s, v)| *s += v);
        }
        for (o, block) in out.iter_mut().zip(sum.chunks(WIDE_STEP)) {
            *o = block.iter().sum::<f32>() / (block.len() * (y1 - y0)) as f32;
        }
    }
}

/// Where full-resolution column (or row) d reads the quarter-resolution plane of n: the two
/// samples and the weight of the second.
#[inline]
fn wide_src(d: usize, n: usize) -> (usize, usize, f32) {
    let s = ((d as f32 + 0.5) / WIDE_STEP as f32 - 0.5).clamp(0.0, (n - 1) as f32);
    let i0 = s as usize;
    (i0, (i0 + 1).min(n - 1), s - i0 as f32)
}

impl Planes {
    /// The sigma-12 blur of `plane` (`ws x hs`, as [`Planes::add_wide`] makes it) at (x, y) of w x h.
    fn wide_at(&self, plane: &[f32], x: usize, y: usize, w: usize, h: usize) -> f32 {
        let ws = self.small_w;
        let ((a, b, fy), (i0, i1, fx)) = (wide_src(y, self.small_h), wide_src(x, ws));
        let (ra, rb) = (&plane[a * ws..(a + 1) * ws], &plane[b * ws..(b + 1) * ws]);
        debug_assert!(ws == w.div_ceil(WIDE_STEP) && self.small_h == h.div_ceil(WIDE_STEP));
        let top = ra[i0] + fx * (ra[i1] - ra[i0]);
        let bot = rb[i0] + fx * (rb[i1] - rb[i0]);
        top + fy * (bot - top)
    }
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
    let rgb = colour_features(f, g, planes, x, y, out);
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

/// The bank group's features of pixel (x, y) (colour, blurs, bias); returns the colour.
#[inline]
fn colour_features(
    f: &Frame,
    g: &Blurs,
    planes: &Planes,
    x: usize,
    y: usize,
    out: &mut [f32; NF],
) -> [f32; 3] {
    let (n, i) = (f.width * f.height, y * f.width + x);
    let rgb = [f.data[i], f.data[n + i], f.data[2 * n + i]];
    out[BANK].fill(0.0);
    out[..3].copy_from_slice(&rgb);
    for c in 0..3 {
        out[6 + c] = g.planes[0][c][i];
        out[12 + c] = g.planes[1][c][i];
    }
    if planes.full[0].len() == n {
        for c in 0..3 {
            out[FINE + c] = planes.full[c][i];
            out[MID + c] = planes.full[3 + c][i];
            out[WIDE + c] = planes.wide_at(&planes.wide[c], x, y, f.width, f.height);
        }
    }
    out[BIAS] = 1.0;
    rgb
}

/// Features of the position group.
pub const POSITION_LEN: usize = NF - POSITION.start;
/// The position terms that are offsets (u, v, r2, r2^2, r2^3), first in the group; each is
/// then repeated as a gain on each colour channel ([`position_gain`]).
pub const POSITION_OFFSETS: usize = 5;
const _: () = assert!(POSITION_LEN == POSITION_OFFSETS * 4);

/// Where, within the position group, offset k's gain on colour channel c sits.
pub const fn position_gain(k: usize, c: usize) -> usize {
    POSITION_OFFSETS + 3 * k + c
}

/// The position terms at normalised coordinates (u, v) for colour `rgb`.
#[inline]
pub fn position(u: f32, v: f32, rgb: [f32; 3], out: &mut [f32; POSITION_LEN]) {
    let r2 = 0.5 * (u * u + v * v);
    let pos: [f32; POSITION_OFFSETS] = [u, v, r2, r2 * r2, r2 * r2 * r2];
    out[..POSITION_OFFSETS].copy_from_slice(&pos);
    for (k, p) in pos.iter().enumerate() {
        for c in 0..3 {
            out[position_gain(k, c)] = p * rgb[c];
        }
    }
}

/// Adds the weights of the residual's features that slicing computes anyway (colour, G's blurs,
/// the bias) to every cell and luminance bin of G's `grid` (`[GRID_CH][GRID][GRID]`). Slicing's
/// interpolation weights sum to one at every pixel, so this adds exactly `w_j * phi_j`, at no
/// cost per pixel. `w` is `NF x 3`, or empty.
pub fn fold(grid: &mut [f32], w: &[f32]) {
    if w.len() != NF * 3 || grid.len() != GRID * GRID * LBINS * 3 * K {
        return;
    }
    for (l, c) in (0..LBINS).flat_map(|l| (0..3).map(move |c| (l, c))) {
        for (j, k) in IN_SLICING {
            let ch = (l * 3 + c) * K + k;
            grid[ch * GRID * GRID..][..GRID * GRID]
                .iter_mut()
                .for_each(|v| *v += w[3 * j + c]);
        }
    }
}

/// Adds the residual's features that slicing does not hold (its own blurs and the position
/// terms) to `out`, G's result on `src` with the other features folded into G's grid ([`fold`]).
/// Features with zero weight cost nothing. `w` is `NF x 3`.
pub fn apply(out: &mut Frame, src: &Frame, w: &[f32], threads: usize) {
    if w.len() != NF * 3 {
        return;
    }
    let (width, height) = (src.width, src.height);
    let outs = out.planes_mut();
    let planes = if uses(w, WIDE..WIDE + 3) {
        Planes::wide_only(src, threads)
    } else {
        Planes::none()
    };
    let wide = mixed_wide(&planes, w);
    let terms = RowTerms {
        src,
        small: (planes.small_w, planes.small_h),
        wide: &wide,
        w,
        with_position: uses(w, POSITION),
        us: (0..width).map(|x| coord(x, width)).collect(),
    };
    if uses_own_blurs(w) {
        // the row terms join the blurs' pass, tile by tile
        let (k1, k2) = (gauss_kernel(SIGMA_FINE), gauss_kernel(SIGMA_MID));
        // a template that keeps one of the two scales pays for that blur alone: blur_add's
        // short kernel is then empty, and its weights (the unused scale's) are zero
        let (short, long, order): (&[f32], &[f32], _) =
            match (uses(w, FINE..FINE + 3), uses(w, MID..MID + 3)) {
                (true, true) => (&k1, &k2, [FINE, MID]),
                (true, false) => (&[], &k1, [MID, FINE]),
                _ => (&[], &k2, [FINE, MID]),
            };
        let own = [0, 1, 2].map(|c| [0, 1, 2].map(|ch| order.map(|j| w[3 * (j + ch) + c])));
        let srcs = [src.plane(0), src.plane(1), src.plane(2)];
        blur_add(
            srcs,
            (width, height),
            short,
            long,
            own,
            outs,
            &terms,
            threads,
        );
    } else if !terms.is_empty() {
        par::planes(outs, width, threads, |y0, out| {
            kernels::simd(
                width,
                ResidualBand {
                    terms: &terms,
                    y0,
                    out,
                },
            )
        });
    }
}

/// Whether weights `w` use the residual's own full-resolution blurs (sigma 1 or 2.5).
fn uses_own_blurs(w: &[f32]) -> bool {
    uses(w, FINE..FINE + 3) || uses(w, MID..MID + 3)
}

/// The passes that `apply` runs after G for weights `w`, named for a template's card; none
/// when everything the residual uses folds into G's grid (then it costs what G alone does).
pub fn stages(w: &[f32]) -> Vec<&'static str> {
    [
        (uses(w, FINE..FINE + 3), "sigma 1 blur"),
        (uses(w, MID..MID + 3), "sigma 2.5 blur"),
        (uses(w, WIDE..WIDE + 3), "sigma 12 blur"),
        (uses(w, POSITION), "position terms"),
    ]
    .into_iter()
    .filter_map(|(used, name)| used.then_some(name))
    .collect()
}

/// Per output channel, the quarter-resolution sigma-12 planes mixed by their weights
/// (`small_w x small_h`); [`apply`]'s pass upsamples the two rows each output row reads.
/// Upsampling is linear, so mixing first upsamples one plane instead of three. Empty without
/// sigma-12 planes (`apply` makes them only where used).
fn mixed_wide(planes: &Planes, w: &[f32]) -> Vec<Vec<f32>> {
    if planes.wide[0].is_empty() {
        return Vec::new();
    }
    (0..3)
        .map(|c| {
            let mut m = vec![0.0f32; planes.wide[0].len()];
            for (ch, p) in planes.wide.iter().enumerate() {
                let wc = w[3 * (WIDE + ch) + c];
                m.iter_mut().zip(p).for_each(|(m, v)| *m += wc * v);
            }
            m
        })
        .collect()
}

/// Quarter-resolution row `small` upsampled along x into `out` (the full width), as
/// [`wide_src`] reads it, bit for bit. Inside the row each block of four pixels reads the same
/// three samples at the same four fractions, so the per-pixel lookups go (at 1080p they took
/// longer than the whole pass that adds the result).
fn upsample_row(small: &[f32], out: &mut [f32]) {
    // the four fractions below are those of a step of 4
    const { assert!(WIDE_STEP == 4) };
    let (n, width) = (small.len(), out.len());
    let lerp = |x: usize| {
        let (i0, i1, fx) = wide_src(x, n);
        small[i0] + fx * (small[i1] - small[i0])
    };
    // blocks 1..n-1 read samples i-1, i, i+1 at s = i - 0.375, - 0.125, + 0.125, + 0.375
    let lo = WIDE_STEP.min(width);
    let hi = (WIDE_STEP * n.saturating_sub(1).min(width / WIDE_STEP)).max(lo);
    for (x, o) in out.iter_mut().enumerate().take(lo) {
        *o = lerp(x);
    }
    for (o, s) in out[lo..hi]
        .chunks_exact_mut(WIDE_STEP)
        .zip(small.windows(3))
    {
        let [p, c, nx] = [s[0], s[1], s[2]];
        o[0] = p + 0.625 * (c - p);
        o[1] = p + 0.875 * (c - p);
        o[2] = c + 0.125 * (nx - c);
        o[3] = c + 0.375 * (nx - c);
    }
    for (x, o) in out.iter_mut().enumerate().skip(hi) {
        *o = lerp(x);
    }
}

/// The two rows of one channel's mixed sigma-12 plane that an output row reads, upsampled along
/// x; kept while the next output rows read the same ones (four rows in a row do).
struct WideRows {
    at: Option<(usize, usize)>,
    above: Vec<f32>,
    below: Vec<f32>,
}

impl WideRows {
    fn new(width: usize) -> Self {
        WideRows {
            at: None,
            above: vec![0.0; width],
            below: vec![0.0; width],
        }
    }

    /// Rows a and b of `m` (rows of `ws`), upsampled.
    fn get(&mut self, m: &[f32], ws: usize, (a, b): (usize, usize)) -> (&[f32], &[f32]) {
        if self.at != Some((a, b)) {
            if self.at.is_some_and(|(_, last)| last == a) {
                std::mem::swap(&mut self.above, &mut self.below);
            } else {
                upsample_row(&m[a * ws..(a + 1) * ws], &mut self.above);
            }
            upsample_row(&m[b * ws..(b + 1) * ws], &mut self.below);
            self.at = Some((a, b));
        }
        (&self.above, &self.below)
    }
}

/// What the residual adds row by row, after its own blurs: the sigma-12 blur and the position
/// terms.
struct RowTerms<'a> {
    src: &'a Frame,
    /// Size of the quarter-resolution sigma-12 planes.
    small: (usize, usize),
    /// Per output channel, the mixed sigma-12 plane ([`mixed_wide`]); empty when unused.
    wide: &'a [Vec<f32>],
    w: &'a [f32],
    with_position: bool,
    /// Normalised position of each column.
    us: Vec<f32>,
}

impl RowTerms<'_> {
    fn is_empty(&self) -> bool {
        self.wide.is_empty() && !self.with_position
    }
}

impl TileAdd for RowTerms<'_> {
    /// The upsampled sigma-12 rows last read, per output channel.
    type State = Vec<WideRows>;

    fn state(&self) -> Vec<WideRows> {
        let width = self.src.width;
        self.wide.iter().map(|_| WideRows::new(width)).collect()
    }

    #[inline(always)]
    fn add<S: Simd>(&self, s: S, cached: &mut Vec<WideRows>, y0: usize, out: [&mut [f32]; 3]) {
        if self.is_empty() {
            return;
        }
        let (width, height) = (self.src.width, self.src.height);
        let (ws, hs) = self.small;
        let [o0, o1, o2] = out;
        let rows = o0
            .chunks_mut(width)
            .zip(o1.chunks_mut(width))
            .zip(o2.chunks_mut(width));
        for (dy, ((o0, o1), o2)) in rows.enumerate() {
            let y = y0 + dy;
            let i0 = y * width;
            let rgb = [0, 1, 2].map(|c| row_at(self.src.plane(c), i0, width));
            let v = coord(y, height);
            for (c, o) in [o0, o1, o2].into_iter().enumerate() {
                let wide = self.wide.get(c).zip(cached.get_mut(c)).map(|(m, rows)| {
                    let (a, b, fy) = wide_src(y, hs);
                    let (above, below) = rows.get(m, ws, (a, b));
                    (above, below, fy)
                });
                let weights = ChannelWeights::new(self.w, c, v, self.with_position);
                residual_row(s, o, &rgb, wide, &self.us, &weights);
            }
        }
    }
}

/// One thread's rows of [`RowTerms`], where no blur pass carries them.
struct ResidualBand<'a> {
    terms: &'a RowTerms<'a>,
    y0: usize,
    out: [&'a mut [f32]; 3],
}

impl WithSimd for ResidualBand<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let mut state = self.terms.state();
        self.terms.add(s, &mut state, self.y0, self.out);
    }
}

/// Row `i0 / width` of plane `p`; empty for a plane not computed.
#[inline]
fn row_at(p: &[f32], i0: usize, width: usize) -> &[f32] {
    p.get(i0..i0 + width).unwrap_or_default()
}

/// One output channel's position terms on one row, as four polynomials (the offset, then each
/// input channel's factor).
struct ChannelWeights {
    position: Option<[Poly; 4]>,
    /// v^2 of the row, for r2.
    v2: f32,
}

/// a*u + b + r2 * (c1 + r2 * (c2 + r2 * c3)): one polynomial of the position terms on a row,
/// with v's term folded into the constant b.
type Poly = [f32; 5];

impl ChannelWeights {
    fn new(w: &[f32], c: usize, v: f32, with_position: bool) -> Self {
        let wc = |j: usize| w[3 * j + c];
        // the offset's terms are u, v, r2, r2^2, r2^3; channel ch's are those times colour ch
        let poly = |at: &dyn Fn(usize) -> usize| -> Poly {
            let t = |k: usize| wc(POSITION.start + at(k));
            [t(0), t(1) * v, t(2), t(3), t(4)]
        };
        let gains = |ch: usize| poly(&|k| position_gain(k, ch));
        ChannelWeights {
            position: with_position.then(|| [poly(&|k| k), gains(0), gains(1), gains(2)]),
            v2: v * v,
        }
    }
}

/// out += the wide blur (its rows above and below y, and y's weight between them) and the
/// position terms, on SIMD lanes.
#[inline(always)]
fn residual_row<S: Simd>(
    s: S,
    out: &mut [f32],
    rgb: &[&[f32]; 3],
    wide: Option<(&[f32], &[f32], f32)>,
    us: &[f32],
    cw: &ChannelWeights,
) {
    let (width, step) = (out.len(), S::F32_LANES);
    let splat = |v: f32| s.splat_f32s(v);
    let poly = |p: &Poly, u: S::f32s, r2: S::f32s| {
        let tail = s.mul_add_e_f32s(r2, splat(p[4]), splat(p[3]));
        let tail = s.mul_add_e_f32s(r2, tail, splat(p[2]));
        let lin = s.mul_add_e_f32s(u, splat(p[0]), splat(p[1]));
        s.mul_add_e_f32s(r2, tail, lin)
    };
    for x in (0..width).step_by(step) {
        let n = step.min(width - x);
        let mut acc = load_n::<S>(&out[x..], n);
        if let Some((above, below, fy)) = wide {
            let a = load_n::<S>(&above[x..], n);
            let d = s.sub_f32s(load_n::<S>(&below[x..], n), a);
            acc = s.add_f32s(acc, s.mul_add_e_f32s(splat(fy), d, a));
        }
        if let Some([off, pr, pg, pb]) = &cw.position {
            let u = load_n::<S>(&us[x..], n);
            let r2 = s.mul_f32s(splat(0.5), s.mul_add_e_f32s(u, u, splat(cw.v2)));
            acc = s.add_f32s(acc, poly(off, u, r2));
            for (p, x_ch) in [pr, pg, pb].into_iter().zip(rgb) {
                let f = poly(p, u, r2);
                acc = s.mul_add_e_f32s(f, load_n::<S>(&x_ch[x..], n), acc);
            }
        }
        store_n::<S>(&mut out[x..], n, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::filterbank::blurs;

    /// Slicing with the weights folded into its grid, then the row-wise apply, add what the
    /// fit's per-pixel features and weights say they should.
    #[test]
    fn stages_name_the_passes_after_g_and_none_for_what_folds() {
        let with = |js: &[usize]| {
            let mut w = vec![0.0f32; NF * 3];
            for &j in js {
                w[3 * j + 1] = 0.5;
            }
            stages(&w)
        };
        // colour, G's sigma 1.5 and 6 blurs and the bias fold into G's grid
        assert!(with(&[0, 7, 13, BIAS]).is_empty());
        assert!(stages(&[]).is_empty());
        assert_eq!(with(&[FINE]), ["sigma 1 blur"]);
        assert_eq!(with(&[MID + 2, 1]), ["sigma 2.5 blur"]);
        assert_eq!(with(&[WIDE]), ["sigma 12 blur"]);
        assert_eq!(
            with(&[FINE, MID, WIDE + 1, POSITION.end - 1]),
            [
                "sigma 1 blur",
                "sigma 2.5 blur",
                "sigma 12 blur",
                "position terms"
            ]
        );
    }

    /// Slicing's features 3..6 are G's sigma-1.5 blur and 6..9 its sigma-6 blur, scales 1 and
    /// 3 of the bank's; colour, the bias and the hue terms are no blur.
    #[test]
    fn slicing_blur_scales_are_gs_two_blurs() {
        let scales: Vec<_> = (0..K).map(slicing_blur_scale).collect();
        let want: Vec<_> = (0..K)
            .map(|k| match k {
                3..6 => Some(1),
                6..9 => Some(3),
                _ => None,
            })
            .collect();
        assert_eq!(scales, want);
        assert!(
            scales
                .iter()
                .flatten()
                .all(|&s| SCALES_FOLDED >> s & 1 != 0)
        );
    }

    /// The unrolled upsampling reads what `wide_src` says, bit for bit, at every width (a
    /// whole number of blocks or not) down to a single quarter-resolution sample.
    #[test]
    fn upsample_row_is_the_lerp_wide_src_names() {
        for width in [1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 37, 640, 641, 643] {
            let n = width.div_ceil(WIDE_STEP);
            let small: Vec<f32> = (0..n).map(|i| ((i * 7919 % 97) as f32).sin()).collect();
            let mut out = vec![f32::NAN; width];
            upsample_row(&small, &mut out);
            for (x, got) in out.iter().enumerate() {
                let (i0, i1, fx) = wide_src(x, n);
                let want = small[i0] + fx * (small[i1] - small[i0]);
                assert_eq!(got.to_bits(), want.to_bits(), "width {width}, x {x}");
            }
        }
    }

    #[test]
    fn apply_matches_the_per_pixel_features() {
        let (w, h) = (37, 23);
        let mut src = Frame::zeros(w, h);
        let n = w * h;
        for (i, v) in src.data.iter_mut().enumerate() {
            *v = ((i * 7919 % 1000) as f32 / 1000.0 + (i / n) as f32 * 0.1).fract();
        }
        let all: Vec<f32> = (0..NF * 3)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 50.0)
            .collect();
        // every feature, then the two own blurs' one-kernel passes (one of the scales left out)
        for left_out in [None, Some(FINE), Some(MID)] {
            let mut weights = all.clone();
            if let Some(j) = left_out {
                weights[3 * j..3 * (j + 3)].fill(0.0);
            }
            matches_the_features(&src, &weights);
        }
    }

    fn matches_the_features(src: &Frame, weights: &[f32]) {
        let (w, h, n) = (src.width, src.height, src.width * src.height);
        let g = blurs(src, 1);
        let mut grid = vec![0.0f32; GRID * GRID * LBINS * 3 * K];
        fold(&mut grid, weights);
        let mut out = crate::engine::slice::apply(src, &g, &grid, 2);
        apply(&mut out, src, weights, 2);
        let p = planes(src, 1);
        let mut phi = [0.0f32; NF];
        for y in 0..h {
            for x in 0..w {
                features(src, &g, &p, x, y, &mut phi);
                for c in 0..3 {
                    let want: f32 =
                        (0..NF).map(|j| weights[3 * j + c] * phi[j]).sum::<f32>() + phi[c];
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
