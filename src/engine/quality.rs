//! The quality gate: how far a new capture B lies from the template's source images, in the
//! terms that matter to the edit. The grid's coefficients are fitted and learned per luminance
//! bin and hue sector; where B has pixel mass in tone/colour regions the source never showed,
//! the template is extrapolating. The histogram has LBINS luminance bins x (HUES sectors +
//! neutral); the score is the total-variation distance of B's histogram from the source's,
//! 0 (same distribution) to 1 (disjoint). See docs/quality.md for the calibration.

use serde::{Deserialize, Serialize};

use super::card::Card;
use super::filterbank::{hue_features, lum_bins, luminance};
use super::model::{HUES, LBINS, THUMB};
use crate::{Error, Result};

/// The `[quality]` section: when a result needs an operator's look.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QualityConfig {
    /// Results whose quality-gate score exceeds this are flagged needs_review (docs/quality.md).
    pub review_threshold: f32,
    /// Results of a template whose validated gain over doing nothing (its card) is under this
    /// many dB are flagged needs_review too; so are templates with no validated gain.
    pub min_validated_gain_db: f32,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            review_threshold: 0.5,
            min_validated_gain_db: 0.5,
        }
    }
}

impl QualityConfig {
    /// Whether a result needs an operator's look: B is unlike the template's source, or the
    /// template (in the direction applied) did not validate well on its own pair.
    pub fn needs_review(&self, score: f32, card: &Card, reverse: bool) -> bool {
        let gain = if reverse {
            card.reverse_gain_db
        } else {
            card.validated_gain_db
        };
        score > self.review_threshold || gain.is_none_or(|g| g < self.min_validated_gain_db)
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.review_threshold) {
            return Err(Error::config(
                "quality.review_threshold",
                "must be between 0 and 1",
            ));
        }
        if !(0.0..=60.0).contains(&self.min_validated_gain_db) {
            return Err(Error::config(
                "quality.min_validated_gain_db",
                "must be between 0 and 60",
            ));
        }
        Ok(())
    }
}

pub const HIST: usize = LBINS * (HUES + 1);
/// Chroma (opponent magnitude) at which a pixel counts as fully coloured.
const CHROMA_FULL: f32 = 0.1;

/// Calls `add(cell, weight)` for the histogram cells a pixel falls in: its two nearest
/// luminance bins, shared between the hue sectors by chroma direction and the neutral cell.
#[inline]
fn cells(r: f32, g: f32, b: f32, mut add: impl FnMut(usize, f32)) {
    let mut hf = [0.0f32; HUES];
    hue_features(r, g, b, &mut hf);
    let oa = r - 0.5 * (g + b);
    let ob = 0.866_025_4 * (g - b);
    let colour = ((oa * oa + ob * ob).sqrt() / CHROMA_FULL).min(1.0);
    let total: f32 = hf.iter().sum::<f32>() + 1e-6;
    let (l0, w0, w1) = lum_bins(luminance(r, g, b));
    for (l, wl) in [(l0, w0), (l0 + 1, w1)] {
        if l >= LBINS {
            continue;
        }
        for (s, h) in hf.iter().enumerate() {
            add(l * (HUES + 1) + s, wl * colour * h / total);
        }
        add(l * (HUES + 1) + HUES, wl * (1.0 - colour));
    }
}

/// Histogram of a `[3][THUMB][THUMB]` thumbnail, normalised to sum 1.
pub fn histogram(thumb: &[f32]) -> Vec<f32> {
    let n = THUMB * THUMB;
    let mut h = vec![0.0f32; HIST];
    for i in 0..n {
        cells(thumb[i], thumb[n + i], thumb[2 * n + i], |c, w| h[c] += w);
    }
    let s: f32 = h.iter().sum::<f32>().max(1e-6);
    h.iter_mut().for_each(|v| *v /= s);
    h
}

/// Total-variation distance between two histograms, in [0, 1].
pub fn distance(a: &[f32], b: &[f32]) -> f32 {
    0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>()
}
