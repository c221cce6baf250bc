//! Learn and apply edit templates: H(A, A') -> template, G(template, B) -> B'.

pub mod align;
pub mod bank;
pub mod card;
pub mod filterbank;
pub mod fit;
pub mod kernels;
mod learn;
pub mod model;
pub mod par;
pub mod quality;
pub mod slice;

use std::path::Path;

pub use fit::Prior;
pub use learn::LearnOptions;
pub use model::{Models, Precision};

use crate::{Error, Frame, Result};
use card::Card;

// every frame that passes the image limits fits the model's patch
const _: () = assert!(model::PATCH <= crate::frame::MIN_SIDE);

pub struct Engine {
    pub models: Models,
    pub threads: usize,
    /// MB that `learn` and `apply` may take (0: no budget); see [`Engine::peak_mb`].
    pub memory_mb: u32,
}

/// Peak memory of the engine's work on w x h frames, as measured with `/usr/bin/time -v` on the
/// release binary (learn of one pair: 289 MB at 1920x1080, 1,049 MB at 3840x2160; apply: 170
/// and 553 MB): a base of models and code, plus bytes per pixel for the frames, blurs, planes
/// and warps; each further pair of a learn holds two more f32 frames. A turned pair, whose
/// before shot is also low-passed to match the warp (session 20), peaked at 393 MB at 2.9 MP
/// (1976x1480) against 399 estimated, an aligned one at 383.
const BASE_MB: f64 = 42.0;
const LEARN_BYTES_PER_PX: f64 = 122.0;
const PAIR_BYTES_PER_PX: f64 = 24.0;
const APPLY_BYTES_PER_PX: f64 = 62.0;

/// The MB a learn is sized to (see [`Engine::learn_max_px`]): the boards' `[engine] memory_mb`
/// is 480 under `MemoryMax=512M`; this leaves room under it for the estimate's error, and for
/// the decoder's buffer while the inputs are read.
pub const LEARN_MB: u64 = 400;

/// A template as `learn` makes it, before it is named and stored.
pub struct Learned {
    pub delta: Vec<f32>,
    pub reverse_delta: Vec<f32>,
    pub residual: Vec<f32>,
    pub reverse_residual: Vec<f32>,
    pub card: Card,
    pub source_hist: Vec<f32>,
    /// The quality histogram of the after image(s): what the undo's input looks like.
    pub target_hist: Vec<f32>,
}

impl Learned {
    /// The direction `apply` runs: the edit, or its undo.
    pub fn edit(&self, reverse: bool) -> Edit<'_> {
        if reverse {
            Edit {
                delta: &self.reverse_delta,
                residual: &self.reverse_residual,
            }
        } else {
            Edit {
                delta: &self.delta,
                residual: &self.residual,
            }
        }
    }
}

/// One direction of a template: G's LoRA vector, then the residual stage (bank.rs; empty for
/// none).
#[derive(Clone, Copy)]
pub struct Edit<'a> {
    pub delta: &'a [f32],
    pub residual: &'a [f32],
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
            memory_mb: 0,
        })
    }

    /// The same engine under a memory budget in MB (0: none).
    pub fn with_memory_budget(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Estimated peak MB of `learn` (`pairs` > 0) or `apply` (`pairs` = 0) on w x h frames.
    pub fn peak_mb(w: usize, h: usize, pairs: usize) -> u64 {
        let px = (w * h) as f64;
        let per_px = match pairs {
            0 => APPLY_BYTES_PER_PX,
            n => LEARN_BYTES_PER_PX + PAIR_BYTES_PER_PX * (n - 1) as f64,
        };
        (BASE_MB + px * per_px / 1e6).ceil() as u64
    }

    /// The most pixels a learn of `pairs` pairs works at, so that it needs at most [`LEARN_MB`]
    /// (one pair: 2.9 MP, 1977x1483 from a 4032x3024 photo; two: 2.5 MP). Larger inputs are
    /// downscaled to it. Fixed rather than taken from `[engine] memory_mb`, so that one pair
    /// learns the same template on a host and on a board. Colour and tone are global, so a few
    /// megapixels measure them as well as more: learned from a 3840x2160 pair at 2.9 MP and
    /// applied at 3840x2160, tone, colour and vignette edits scored within 0.6 dB of the
    /// full-size learn, sharpening 7 dB better; a blur, which is measured in pixels, 25 dB
    /// worse (still 14 dB over doing nothing).
    pub fn learn_max_px(pairs: usize) -> u64 {
        let per_px = LEARN_BYTES_PER_PX + PAIR_BYTES_PER_PX * pairs.saturating_sub(1) as f64;
        ((LEARN_MB as f64 - BASE_MB) * 1e6 / per_px) as u64
    }

    /// Refuses work the memory budget cannot hold, before any of it is allocated.
    fn check_memory(&self, f: &Frame, pairs: usize) -> Result<()> {
        let need_mb = Self::peak_mb(f.width, f.height, pairs);
        if self.memory_mb == 0 || need_mb <= self.memory_mb as u64 {
            return Ok(());
        }
        let what = match pairs {
            0 => format!("applying to a {}x{} frame", f.width, f.height),
            n => format!("learning from {n} pair(s) of {}x{}", f.width, f.height),
        };
        Err(Error::Memory {
            what,
            need_mb,
            budget_mb: self.memory_mb,
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

    fn check_template(&self, delta: &[f32]) -> Result<()> {
        if delta.len() != self.models.template_len {
            return Err(Error::Invalid(format!(
                "template has {} values, the model expects {}",
                delta.len(),
                self.models.template_len
            )));
        }
        Ok(())
    }

    /// G's backbone on the generic plan: for learn, whose templates are transient, so a plan
    /// specialised for one would be built and never used again.
    fn grid(&self, delta: &[f32], thumb: &[f32]) -> Result<Vec<f32>> {
        self.check_template(delta)?;
        self.models.backbone(thumb, delta)
    }

    /// B' = G(delta, B) + residual(B): one direction of a template.
    pub fn apply_edit(&self, edit: Edit, frame: &Frame) -> Result<Frame> {
        Ok(self.apply_thumbed(edit, frame, self.threads)?.0)
    }

    /// [`Engine::apply_edit`] on `threads` threads (frames applied side by side take one each),
    /// and the capture's quality-gate score against a template's source histogram (see
    /// quality.rs), from the thumbnail the apply makes anyway.
    pub fn apply_scored(
        &self,
        edit: Edit,
        frame: &Frame,
        source_hist: &[f32],
        threads: usize,
    ) -> Result<(Frame, f32)> {
        let (out, thumb) = self.apply_thumbed(edit, frame, threads.max(1))?;
        Ok((
            out,
            quality::distance(source_hist, &quality::histogram(&thumb)),
        ))
    }

    /// The edited frame and the thumbnail of `frame` that G ran on.
    fn apply_thumbed(
        &self,
        edit: Edit,
        frame: &Frame,
        threads: usize,
    ) -> Result<(Frame, Vec<f32>)> {
        self.check(frame)?;
        self.check_memory(frame, 0)?;
        if !edit.residual.is_empty() && edit.residual.len() != bank::NF * 3 {
            return Err(Error::Invalid(format!(
                "the residual stage has {} values, expected {}",
                edit.residual.len(),
                bank::NF * 3
            )));
        }
        let blurs = filterbank::blurs(frame, threads);
        self.check_template(edit.delta)?;
        // on the plan specialised for this template from its second apply on (model.rs)
        let thumb = filterbank::thumbnail_on(frame, threads);
        let mut grid = self.models.backbone_cached(&thumb, edit.delta)?;
        bank::fold(&mut grid, edit.residual);
        let mut out = slice::apply(frame, &blurs, &grid, threads);
        // G's planes go back to the pool, where the residual's own blurs take them
        drop(blurs);
        bank::apply(&mut out, frame, edit.residual, threads);
        Ok((out, thumb))
    }

    /// B' = G(delta, B), or G(-delta, B) to undo the edit: a LoRA vector alone.
    pub fn apply(&self, delta: &[f32], frame: &Frame, reverse: bool) -> Result<Frame> {
        let neg: Vec<f32>;
        let delta = if reverse {
            neg = delta.iter().map(|v| -v).collect();
            &neg
        } else {
            delta
        };
        self.apply_edit(
            Edit {
                delta,
                residual: &[],
            },
            frame,
        )
    }
}
