//! The template's card: what the change does, in units a plant engineer knows, measured on the
//! source pair(s).

use serde::{Deserialize, Serialize};

use super::filterbank::{blur_plane, gauss_kernel, luminance};
use crate::Frame;

/// Explains the change; computed by the engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Card {
    pub exposure_ev: f32,
    pub wb_shift: [f32; 2],
    /// After-to-before ratios; [`NOT_MEASURED`] (0) where the before shot has none of it.
    pub contrast: f32,
    pub saturation: f32,
    pub sharpness: f32,
    pub self_psnr_db: f32,
    pub pairs: u32,
    pub fit_used: bool,
    /// Validated gain of the forward template over doing nothing, in dB (held-out regions
    /// and pairs); None when no pair registered, so nothing could be validated.
    #[serde(default)]
    pub validated_gain_db: Option<f32>,
    /// The same for the undo (`apply --reverse`).
    #[serde(default)]
    pub reverse_gain_db: Option<f32>,
    /// What each kept part adds to the forward gain; 0 for a part left out.
    #[serde(default)]
    pub part_gains_db: PartGains,
    /// With several pairs: mean PSNR on each pair of a fit made on the others.
    #[serde(default)]
    pub heldout_pair_psnr_db: Option<f32>,
    /// How each pair registered, in order.
    #[serde(default)]
    pub registration: Vec<PairRegistration>,
    /// Learned with `--prior zero`: nothing of the hypernetwork is in the template.
    #[serde(default)]
    pub zero_prior: bool,
    /// With no pair registered: how much closer H's template brings the before's colour
    /// distribution to the after's, in dB; under `MIN_DISTRIBUTION_GAIN_DB` the template is
    /// the identity (a pair that does not register keeps H only if H moves the colours the way
    /// the pair does).
    #[serde(default)]
    pub distribution_gain_db: Option<f32>,
    /// With grey before shots (saturation not measured): how much closer the undo brings an
    /// edited probe of every hue back to itself than doing nothing, in dB; under 0 the undo is
    /// the identity (`learn`'s round trip). None with colour in some before shot.
    #[serde(default)]
    pub round_trip_db: Option<f32>,
}

/// Validated gain of each part of a template, in dB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartGains {
    pub hypernet: f32,
    pub tone: f32,
    pub bank: f32,
    pub position: f32,
    /// What the bank part's blur features add to the fit (within `bank`); 0 without them.
    #[serde(default)]
    pub blurs: f32,
}

/// The similarity that maps a pair's before onto its after (see engine::align).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairRegistration {
    pub registered: bool,
    pub dx: f32,
    pub dy: f32,
    pub angle_deg: f32,
    pub scale: f32,
    pub residual_px: f32,
}

/// See `Card::distribution_gain_db`.
pub const MIN_DISTRIBUTION_GAIN_DB: f32 = 1.0;

impl Card {
    /// Whether `learn`'s round trip found the undo worse than doing nothing, which made it the
    /// identity ([`Card::round_trip_db`] under 0).
    pub fn round_trip_failed(&self) -> bool {
        self.round_trip_db.is_some_and(|g| g < 0.0)
    }

    /// One line: what validated, or why nothing could be.
    pub fn validation_summary(&self) -> String {
        match self.validated_gain_db {
            None if self.zero_prior => {
                "not validated (no pair registered): identity, since the prior is zero".into()
            }
            None if self.registration.iter().any(|r| r.registered) => {
                "not validated (no closed-form fit): the hypernetwork's template alone".into()
            }
            None => match self.distribution_gain_db {
                Some(g) if g < MIN_DISTRIBUTION_GAIN_DB => format!(
                    "not validated (no pair registered): identity, the hypernetwork's template \
                     brings the colours only {g:+.2} dB closer"
                ),
                Some(g) => format!(
                    "not validated pixel-wise (no pair registered): the hypernetwork's template, \
                     which brings the colours {g:+.2} dB closer"
                ),
                None => {
                    "not validated (no pair registered): the hypernetwork's template alone".into()
                }
            },
            Some(g) if !self.fit_used && self.part_gains_db.hypernet == 0.0 => format!(
                "identity: nothing validated better than leaving captures alone ({g:+.2} dB)"
            ),
            Some(g) => {
                let held = self
                    .heldout_pair_psnr_db
                    .map(|p| format!(", held-out pair {p:.2} dB"))
                    .unwrap_or_default();
                format!(
                    "validated gain {g:+.2} dB over doing nothing (fit {:.2} dB{held})",
                    self.self_psnr_db
                )
            }
        }
    }
}

fn lin(v: f32) -> f32 {
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

/// sRGB decoding of the 256 8-bit levels: captures are 8-bit, and powf per pixel cost more than
/// the rest of `learn`.
fn lin_lut() -> &'static [f32; 256] {
    static LUT: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|i| lin(i as f32 / 255.0)))
}

/// Per-image statistics the card compares between before and after.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    lin_mean: [f64; 3],
    lum_std: f64,
    chroma: f64,
    detail: f64,
}

pub fn stats(f: &Frame, threads: usize) -> Stats {
    let n = f.width * f.height;
    let mut lin_mean = [0.0f64; 3];
    let (mut ls, mut ls2, mut ch) = (0.0f64, 0.0f64, 0.0f64);
    let lut = lin_lut();
    for i in 0..n {
        let rgb = [f.data[i], f.data[n + i], f.data[2 * n + i]];
        for c in 0..3 {
            lin_mean[c] += lut[(rgb[c].clamp(0.0, 1.0) * 255.0).round() as usize] as f64;
        }
        let y = luminance(rgb[0], rgb[1], rgb[2]) as f64;
        ls += y;
        ls2 += y * y;
        let mx = rgb.iter().fold(f32::MIN, |a, &b| a.max(b));
        let mn = rgb.iter().fold(f32::MAX, |a, &b| a.min(b));
        ch += (mx - mn) as f64;
    }
    let nf = n as f64;
    for m in &mut lin_mean {
        *m /= nf;
    }
    // detail energy on a centre crop: sharpness is a full-resolution property
    let side = 256.min(f.width).min(f.height);
    let c = f.crop((f.width - side) / 2, (f.height - side) / 2, side, side);
    let cn = side * side;
    let lum: Vec<f32> = (0..cn)
        .map(|i| luminance(c.data[i], c.data[cn + i], c.data[2 * cn + i]))
        .collect();
    let bl = blur_plane(&lum, side, side, &gauss_kernel(1.5), threads);
    let detail = lum
        .iter()
        .zip(&bl)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / cn as f64;
    Stats {
        lin_mean,
        lum_std: (ls2 / nf - (ls / nf).powi(2)).max(0.0).sqrt(),
        chroma: ch / nf,
        detail,
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Change {
    pub exposure_ev: f32,
    pub wb_shift: [f32; 2],
    pub contrast: f32,
    pub saturation: f32,
    pub sharpness: f32,
}

fn ratio(a: f64, b: f64) -> f64 {
    (a.max(1e-6) / b.max(1e-6)).clamp(1e-3, 1e3)
}

/// Less than one 8-bit level on average: a before shot with less contrast or colour than this
/// says nothing of how the edit scales it (a grey before shot printed "saturation x1000").
const MEASURABLE: f64 = 1.0 / 255.0;

/// `after / before` as [`ratio`], or [`NOT_MEASURED`] where the before shot has less than
/// `floor` of the quantity.
fn ratio_of(after: f64, before: f64, floor: f64) -> f32 {
    if before < floor {
        NOT_MEASURED
    } else {
        ratio(after, before) as f32
    }
}

/// A card ratio (contrast, saturation, sharpness) the pair cannot measure; real ratios are
/// clamped to at least 1e-3. 0 like `self_psnr_db`'s "not measured", so stored cards keep
/// their format.
pub const NOT_MEASURED: f32 = 0.0;

/// How the CLI prints a card ratio: in full (`templates show`) or short (`learn`'s one line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RatioStyle {
    Full,
    Short,
}

/// A card ratio as the CLI prints it: `x1.234`, or why it is missing; short, `x1.23` or `n/a`.
pub fn ratio_text(v: f32, style: RatioStyle) -> String {
    match (v == NOT_MEASURED, style) {
        (true, RatioStyle::Full) => "not measured (the before shot has none to scale)".into(),
        (true, RatioStyle::Short) => "n/a".into(),
        (false, RatioStyle::Full) => format!("x{v:.3}"),
        (false, RatioStyle::Short) => format!("x{v:.2}"),
    }
}

/// The mean of the measured ratios `v` (one per pair), or [`NOT_MEASURED`] with none.
pub fn mean_measured(v: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = v
        .filter(|&r| r != NOT_MEASURED)
        .fold((0.0f32, 0usize), |(s, n), r| (s + r, n + 1));
    if n == 0 { NOT_MEASURED } else { sum / n as f32 }
}

pub fn change(before: &Stats, after: &Stats) -> Change {
    let lum = |m: &[f64; 3]| 0.2126 * m[0] + 0.7152 * m[1] + 0.0722 * m[2];
    let wb = |m: &[f64; 3], c: usize| ratio(m[c], m[1]).log2();
    Change {
        exposure_ev: ratio(lum(&after.lin_mean), lum(&before.lin_mean)).log2() as f32,
        wb_shift: [
            (wb(&after.lin_mean, 0) - wb(&before.lin_mean, 0)) as f32,
            (wb(&after.lin_mean, 2) - wb(&before.lin_mean, 2)) as f32,
        ],
        contrast: ratio_of(after.lum_std, before.lum_std, MEASURABLE),
        saturation: ratio_of(after.chroma, before.chroma, MEASURABLE),
        // detail is a mean difference from a blur: only a flat frame has under 1/16 of a level
        sharpness: ratio_of(after.detail, before.detail, MEASURABLE / 16.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A textured frame: grey where `tint` is [1, 1, 1], else each channel scaled by it.
    fn textured(tint: [f32; 3]) -> Frame {
        let (w, h) = (64, 48);
        let mut f = Frame::zeros(w, h);
        for (c, t) in tint.into_iter().enumerate() {
            for (i, v) in f.plane_mut(c).iter_mut().enumerate() {
                let (x, y) = (i % w, i / w);
                *v = (0.2 + 0.6 * (((x * 7 + y * 13) % 17) as f32 / 16.0)) * t;
            }
        }
        f
    }

    #[test]
    fn a_grey_before_shot_leaves_saturation_unmeasured_not_x1000() {
        let grey = stats(&textured([1.0; 3]), 1);
        let tinted = stats(&textured([1.0, 0.9, 0.6]), 1);
        let c = change(&grey, &tinted);
        assert_eq!(c.saturation, NOT_MEASURED);
        assert_eq!(
            ratio_text(c.saturation, RatioStyle::Full),
            "not measured (the before shot has none to scale)"
        );
        assert_eq!(ratio_text(c.saturation, RatioStyle::Short), "n/a");
        // the texture has contrast and detail, so those are measured as before
        assert!((c.contrast - 0.9).abs() < 0.1, "contrast {}", c.contrast);
        assert!(
            c.sharpness > 0.5 && c.sharpness < 1.5,
            "sharpness {}",
            c.sharpness
        );
        // the other way round, the tint's saturation is measured: it drops to grey
        let back = change(&tinted, &grey);
        assert!(
            back.saturation > 0.0 && back.saturation < 0.01,
            "{}",
            back.saturation
        );
        assert_eq!(ratio_text(1.25, RatioStyle::Full), "x1.250");
        assert_eq!(ratio_text(1.25, RatioStyle::Short), "x1.25");
    }

    #[test]
    fn a_ratio_averages_over_the_pairs_that_measure_it() {
        assert_eq!(mean_measured([2.0, NOT_MEASURED, 4.0].into_iter()), 3.0);
        assert_eq!(mean_measured([NOT_MEASURED].into_iter()), NOT_MEASURED);
    }
}
