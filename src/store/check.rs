//! What every template must satisfy, checked in full both when it is saved and when it is read:
//! tensor lengths, finite values inside bounds, well-formed text. Running the same checks on
//! both sides means that whatever `learn` writes reads back, and that a crafted file whose
//! checksum was recomputed is refused with a reason instead of reaching the engine (where an
//! empty histogram would silence the quality gate and huge weights would write NaN pixels).
//!
//! The bounds come from what `learn` produces, with a wide margin. Measured on 62 templates
//! learned from the sample pair and 4 photos under 15 extreme edits each (black, white,
//! invert, grey, channel swap, 1-bit posterise, 3x saturation, contrast x0 and x4, gamma 3,
//! 10x darkening, vignette, 400% unsharp mask, blur, noise), in both directions: LoRA vectors
//! stayed within |3.6| and residual-stage weights within |5.1| (the undo of the 10x darkening).

use super::THUMB_BYTES;
use super::template::{Card, Template};
use crate::engine::{bank, quality};

/// Largest magnitude of a LoRA vector entry (`delta`, `reverse_delta`). The hypernetwork's
/// output plus the fitted grid offset stayed under 3.6; 1000 is ~300x that. Entries near the
/// bound can still drive the backbone beyond what slicing can use, which the engine refuses
/// at apply time (engine::model).
pub const MAX_DELTA_ABS: f32 = 1e3;

/// Largest magnitude of a residual-stage weight. Its features (colour, blurs, bias, position)
/// lie in [-1, 1] for any image, so a weight is a gain: `learn` needed at most 5.1, and at
/// 1000 the stage's output stays finite (39 features x 1000), to be clamped like any pixel.
pub const MAX_RESIDUAL_ABS: f32 = 1e3;

/// Largest magnitude of a card field. The card is shown, never applied, but a field is still
/// checked: exposure and white balance are log2 ratios of clamped means (|v| <= 20), contrast,
/// saturation and sharpness ratios clamped to [1e-3, 1e3], gains and PSNRs in dB (<= 140),
/// shifts in pixels of an accepted frame (<= 65535).
pub const MAX_CARD_ABS: f32 = 1e6;

/// How far a histogram's sum may stray from 1: each is normalised, then averaged over pairs,
/// so rounding alone leaves it within ~1e-5.
const HIST_SUM_TOLERANCE: f32 = 1e-3;

/// Longest hash text: a hex BLAKE3 digest (model hashes are its first 16 digits).
pub const MAX_HASH_LEN: usize = 64;

/// Length of a residual stage's weights: features x output channels.
pub const RESIDUAL_LEN: usize = bank::NF * 3;

/// Every check, in file order; the reason names the field and the rule it breaks.
pub fn template(t: &Template) -> Result<(), String> {
    text(t)?;
    vectors(t)?;
    histograms(t)?;
    card(&t.card)?;
    sources(t)
}

/// The name needs no check here: a `TemplateName` is valid by construction.
fn text(t: &Template) -> Result<(), String> {
    hex_hash("model_hash", &t.model_hash)?;
    for (i, s) in t.sources.iter().enumerate() {
        hex_hash(&format!("source pair {i}: before_blake3"), &s.before_blake3)?;
        hex_hash(&format!("source pair {i}: after_blake3"), &s.after_blake3)?;
    }
    Ok(())
}

/// Hashes are printed and compared, so they must be short lowercase hex; anything else (a
/// long or multi-byte string) is not something takumi wrote.
fn hex_hash(field: &str, s: &str) -> Result<(), String> {
    let hex = s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if s.is_empty() || s.len() > MAX_HASH_LEN || !hex {
        return Err(format!(
            "{field} must be 1 to {MAX_HASH_LEN} lowercase hex digits, found {} bytes{}",
            s.len(),
            if hex { "" } else { " that are not all hex" }
        ));
    }
    Ok(())
}

fn vectors(t: &Template) -> Result<(), String> {
    if t.delta.is_empty() {
        return Err("the template vector (delta) is empty".into());
    }
    if t.reverse_delta.len() != t.delta.len() {
        return Err(format!(
            "delta has {} values but reverse_delta has {}; they must match",
            t.delta.len(),
            t.reverse_delta.len()
        ));
    }
    for (name, v) in [
        ("residual", &t.residual),
        ("reverse_residual", &t.reverse_residual),
    ] {
        if !v.is_empty() && v.len() != RESIDUAL_LEN {
            return Err(format!(
                "{name} has {} values; a residual stage has 0 or {RESIDUAL_LEN}",
                v.len()
            ));
        }
    }
    bounded("template vector (delta)", &t.delta, MAX_DELTA_ABS)?;
    bounded("reverse template vector", &t.reverse_delta, MAX_DELTA_ABS)?;
    bounded("residual stage", &t.residual, MAX_RESIDUAL_ABS)?;
    bounded(
        "reverse residual stage",
        &t.reverse_residual,
        MAX_RESIDUAL_ABS,
    )
}

fn bounded(what: &str, v: &[f32], max: f32) -> Result<(), String> {
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(format!(
            "value {i} of the {what} is not a finite number ({x})"
        ));
    }
    match v.iter().enumerate().find(|(_, x)| x.abs() > max) {
        Some((i, x)) => Err(format!(
            "value {i} of the {what} is {x:e}, beyond the bound of ±{max:e}"
        )),
        None => Ok(()),
    }
}

/// The quality gate's histograms are distributions over [`quality::HIST`] cells: the gate's
/// score (half the L1 distance) lies in [0, 1] only for those. An empty or short one would
/// score every capture as familiar, so nothing would ever be flagged for review.
fn histograms(t: &Template) -> Result<(), String> {
    distribution("source histogram (source_hist)", &t.source_hist)?;
    // empty only in a template read from a version 1 file: the undo's gate then uses
    // source_hist (Template::gate_hist)
    if !t.target_hist.is_empty() {
        distribution("target histogram (target_hist)", &t.target_hist)?;
    }
    Ok(())
}

fn distribution(what: &str, h: &[f32]) -> Result<(), String> {
    if h.len() != quality::HIST {
        return Err(format!(
            "the {what} has {} values, expected {}",
            h.len(),
            quality::HIST
        ));
    }
    bounded(what, h, 1.0)?;
    if let Some(i) = h.iter().position(|&x| x < 0.0) {
        return Err(format!("value {i} of the {what} is negative"));
    }
    let sum: f32 = h.iter().sum();
    if (sum - 1.0).abs() > HIST_SUM_TOLERANCE {
        return Err(format!("the {what} sums to {sum}, not 1"));
    }
    Ok(())
}

fn card(c: &Card) -> Result<(), String> {
    match card_fields(c).find(|(_, v)| !v.is_finite() || v.abs() > MAX_CARD_ABS) {
        Some((field, v)) => Err(format!(
            "card field {field} is {v}: not a finite number within ±{MAX_CARD_ABS:e}"
        )),
        None => Ok(()),
    }
}

/// Every float of the card, by name (an absent optional one as 0).
fn card_fields(c: &Card) -> impl Iterator<Item = (&'static str, f32)> + '_ {
    let g = &c.part_gains_db;
    let opt = |v: Option<f32>| v.unwrap_or(0.0);
    let regs = c.registration.iter().flat_map(|r| {
        [
            ("registration.dx", r.dx),
            ("registration.dy", r.dy),
            ("registration.angle_deg", r.angle_deg),
            ("registration.scale", r.scale),
            ("registration.residual_px", r.residual_px),
        ]
    });
    [
        ("validated_gain_db", opt(c.validated_gain_db)),
        ("reverse_gain_db", opt(c.reverse_gain_db)),
        ("round_trip_db", opt(c.round_trip_db)),
        ("heldout_pair_psnr_db", opt(c.heldout_pair_psnr_db)),
        ("part_gains_db.hypernet", g.hypernet),
        ("part_gains_db.tone", g.tone),
        ("part_gains_db.bank", g.bank),
        ("part_gains_db.position", g.position),
        ("part_gains_db.blurs", g.blurs),
        ("exposure_ev", c.exposure_ev),
        ("wb_shift[0]", c.wb_shift[0]),
        ("wb_shift[1]", c.wb_shift[1]),
        ("contrast", c.contrast),
        ("saturation", c.saturation),
        ("sharpness", c.sharpness),
        ("self_psnr_db", c.self_psnr_db),
    ]
    .into_iter()
    .chain(regs)
}

/// Per pair the card counts: one source pair with its thumbnails, and (from learn v2 on) one
/// registration. A template may come without its sources (one built in code), never with
/// other counts.
fn sources(t: &Template) -> Result<(), String> {
    let pairs = t.card.pairs as usize;
    let counts = [
        ("source pairs", t.sources.len()),
        ("registrations", t.card.registration.len()),
    ];
    for (what, n) in counts {
        if n != 0 && n != pairs {
            return Err(format!(
                "the template has {n} {what} for the {pairs} pairs its card counts"
            ));
        }
    }
    for (i, s) in t.sources.iter().enumerate() {
        for (which, thumb) in [("before", &s.thumb_before), ("after", &s.thumb_after)] {
            if thumb.len() != THUMB_BYTES {
                return Err(format!(
                    "source pair {i}: the {which} thumbnail has {} bytes, expected {THUMB_BYTES}",
                    thumb.len()
                ));
            }
        }
    }
    Ok(())
}
