//! Learn and apply edit templates: H(A, A') -> template, G(template, B) -> B'.

pub mod align;
pub mod card;
pub mod filterbank;
pub mod fit;
pub mod model;
pub mod par;
pub mod quality;
pub mod slice;

use std::path::Path;

pub use model::{Models, Precision};

use crate::store::Card;
use crate::{Error, Frame, Result};

pub struct Engine {
    pub models: Models,
    pub threads: usize,
}

/// A template as `learn` makes it, before it is named and stored.
pub struct Learned {
    pub delta: Vec<f32>,
    pub card: Card,
    pub source_hist: Vec<f32>,
}

impl Engine {
    pub fn load(models_dir: &Path, precision: Precision, threads: usize) -> Result<Self> {
        let threads = threads.max(1);
        if threads > 1 {
            tract_linalg::multithread::set_default_executor(
                tract_linalg::multithread::Executor::multithread(threads),
            );
        }
        Ok(Engine {
            models: Models::load(models_dir, precision)?,
            threads,
        })
    }

    fn check(&self, f: &Frame) -> Result<()> {
        if f.width < model::PATCH
            || f.height < model::PATCH
            || f.data.len() != 3 * f.width * f.height
        {
            return Err(Error::Invalid(format!(
                "frame {}x{} is smaller than {} px or malformed",
                f.width,
                f.height,
                model::PATCH
            )));
        }
        Ok(())
    }

    fn grid(&self, delta: &[f32], thumb: &[f32]) -> Result<Vec<f32>> {
        if delta.len() != self.models.template_len {
            return Err(Error::Invalid(format!(
                "template has {} values, the model expects {}",
                delta.len(),
                self.models.template_len
            )));
        }
        self.models.backbone(thumb, delta)
    }

    fn apply_with(&self, delta: &[f32], frame: &Frame, blurs: &filterbank::Blurs) -> Result<Frame> {
        let grid = self.grid(delta, &filterbank::thumbnail(frame))?;
        Ok(slice::apply(frame, blurs, &grid, self.threads))
    }

    /// B' = G(delta, B), or G(-delta, B) to undo the edit.
    pub fn apply(&self, delta: &[f32], frame: &Frame, reverse: bool) -> Result<Frame> {
        self.check(frame)?;
        let blurs = filterbank::blurs(frame, self.threads);
        if reverse {
            let neg: Vec<f32> = delta.iter().map(|v| -v).collect();
            self.apply_with(&neg, frame, &blurs)
        } else {
            self.apply_with(delta, frame, &blurs)
        }
    }

    /// Quality-gate score of a capture against a template's source histogram (see quality.rs).
    pub fn score(&self, source_hist: &[f32], frame: &Frame) -> f32 {
        quality::distance(
            source_hist,
            &quality::histogram(&filterbank::thumbnail(frame)),
        )
    }

    /// Template from one or more (before, after) pairs of the same edit.
    pub fn learn(&self, pairs: &[(Frame, Frame)]) -> Result<Learned> {
        if pairs.is_empty() {
            return Err(Error::Invalid(
                "learn needs at least one before/after pair".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let lap = |what: &str| {
            tracing::debug!(
                "learn: {what} at {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3
            )
        };
        let mut delta = vec![0.0f32; self.models.template_len];
        let mut thumbs = Vec::with_capacity(pairs.len());
        for (a, a2) in pairs {
            self.check(a)?;
            self.check(a2)?;
            if (a.width, a.height) != (a2.width, a2.height) {
                return Err(Error::Invalid("before and after differ in size".into()));
            }
            let (ta, ta2) = (filterbank::thumbnail(a), filterbank::thumbnail(a2));
            let t = self.models.hypernet([
                &ta,
                &ta2,
                &filterbank::centre_patch(a),
                &filterbank::centre_patch(a2),
            ])?;
            for (d, v) in delta.iter_mut().zip(&t) {
                *d += v / pairs.len() as f32;
            }
            thumbs.push(ta);
        }
        lap("hypernetwork");
        // closed-form refinement on the aligned pairs
        let mut acc = fit::FitAcc::default();
        for ((a, a2), ta) in pairs.iter().zip(&thumbs) {
            let shift = align::align(a, a2);
            let moved = align::misregistered(a, a2, shift);
            lap("align");
            if moved {
                continue;
            }
            let blurs = filterbank::blurs(a, self.threads);
            lap("blurs");
            let grid = self.grid(&delta, ta)?;
            let pred = slice::apply(a, &blurs, &grid, self.threads);
            lap("G(template, A)");
            acc.add(a, &blurs, a2, &pred, shift);
            lap("fit accumulate");
        }
        let offset = acc.solve();
        // 0 = not measured: a misregistered pair has no pixel-wise reproduction error
        let self_psnr = if acc.samples() == 0 {
            0.0
        } else {
            (10.0 * (1.0 / acc.mse_with(offset.as_deref()).max(1e-12)).log10()) as f32
        };
        lap("fit solve");
        if let Some(off) = &offset {
            let at = self.models.offset_at;
            for (d, o) in delta[at..at + off.len()].iter_mut().zip(off) {
                *d += o;
            }
        }
        // the card, averaged over the pairs
        let mut ch = card::Change::default();
        let mut hist = vec![0.0f32; quality::HIST];
        let np = pairs.len() as f32;
        for ((a, a2), ta) in pairs.iter().zip(&thumbs) {
            let c = card::change(
                &card::stats(a, self.threads),
                &card::stats(a2, self.threads),
            );
            ch.exposure_ev += c.exposure_ev / np;
            ch.wb_shift[0] += c.wb_shift[0] / np;
            ch.wb_shift[1] += c.wb_shift[1] / np;
            ch.contrast += c.contrast / np;
            ch.saturation += c.saturation / np;
            ch.sharpness += c.sharpness / np;
            for (hv, v) in hist.iter_mut().zip(quality::histogram(ta)) {
                *hv += v / np;
            }
        }
        lap("card");
        Ok(Learned {
            delta,
            card: Card {
                exposure_ev: ch.exposure_ev,
                wb_shift: ch.wb_shift,
                contrast: ch.contrast,
                saturation: ch.saturation,
                sharpness: ch.sharpness,
                self_psnr_db: self_psnr.min(99.0),
                pairs: pairs.len() as u32,
                fit_used: offset.is_some(),
            },
            source_hist: hist,
        })
    }
}
