//! The station's local display: draws the station state and the latest approved result.
//!
//! [`render`] lays the screen out on any embedded-graphics [`DrawTarget`] of Rgb888, so the
//! same code drives the host PNG target ([`PngDisplay`]) and the Linux framebuffer
//! ([`FbDisplay`]). Rendering reads no clock and no environment: the same state and size give
//! the same pixels.
//!
//! [`DrawTarget`]: embedded_graphics::draw_target::DrawTarget

mod fb;
mod png;
mod render;

use std::fmt;
use std::path::PathBuf;

use crate::frame::{Frame, level};

pub use fb::FbDisplay;
pub use png::{Canvas, PngDisplay};
pub use render::{Layout, PLACEHOLDER, layout, palette, render};

/// Largest width or height a display target may have; bounds the memory a misconfigured
/// size can ask for.
pub const MAX_SIDE: u32 = 8192;

/// An interleaved 8-bit RGB image (`rgb.len()` should be `width * height * 3`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RgbImage8 {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl RgbImage8 {
    /// True when the image is non-empty and `rgb` holds all `width * height` pixels.
    pub fn is_valid(&self) -> bool {
        self.pixel_bytes().is_some()
    }

    /// The `width * height * 3` bytes of pixel data, or `None` when the image is invalid.
    pub(crate) fn pixel_bytes(&self) -> Option<&[u8]> {
        if self.width == 0 || self.height == 0 {
            return None;
        }
        let len = u64::from(self.width)
            .checked_mul(u64::from(self.height))?
            .checked_mul(3)?;
        self.rgb.get(..usize::try_from(len).ok()?)
    }
}

impl RgbImage8 {
    /// A copy of `f` at most `max_width` px wide, shrunk by a whole factor and sampled as the
    /// display draws ([`nearest`]): what a result keeps for the approval screen.
    pub fn downscaled(f: &Frame, max_width: usize) -> RgbImage8 {
        let s = f.width.div_ceil(max_width.max(1)).max(1);
        let (w, h) = (f.width / s, f.height / s);
        let n = f.width * f.height;
        let cols: Vec<usize> = (0..w)
            .map(|x| nearest(x as u64, w as u64, f.width as u64) as usize)
            .collect();
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            let row = nearest(y as u64, h as u64, f.height as u64) as usize * f.width;
            for &x in &cols {
                rgb.extend([0, n, 2 * n].map(|c| level::<u8>(f.data[c + row + x])));
            }
        }
        RgbImage8 {
            width: w as u32,
            height: h as u32,
            rgb,
        }
    }
}

/// The source pixel that destination pixel `d` of `dst_len` shows, out of `src_len`: the one
/// under its centre, so that up- and down-scaling stay symmetric. The one nearest-neighbour
/// scaler, for drawing and for the kept copies.
pub(crate) fn nearest(d: u64, dst_len: u64, src_len: u64) -> u64 {
    (2 * d + 1) * src_len / (2 * dst_len)
}

// Hand-written so that logging a state does not dump megabytes of pixels.
impl fmt::Debug for RgbImage8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RgbImage8")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("rgb_len", &self.rgb.len())
            .finish()
    }
}

/// Everything the display shows. `time` is preformatted by the caller (e.g.
/// "2026-11-26 15:04:05") so that rendering stays deterministic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DisplayState {
    pub template: String,
    pub score: f32,
    pub needs_review: bool,
    pub time: String,
    pub connected: bool,
    pub armed: bool,
    pub queue_depth: usize,
    pub before: Option<RgbImage8>,
    pub after: Option<RgbImage8>,
}

/// A screen that can show a [`DisplayState`].
pub trait Display {
    fn show(&mut self, state: &DisplayState) -> Result<(), DisplayError>;
}

/// Display errors; each message is one line that names the path. The io errors are `cause`, not
/// `source`: the message holds them, and the CLI prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: display size {width}x{height} is out of range (1..={max} per side)", max = MAX_SIDE)]
    Size {
        path: PathBuf,
        width: u32,
        height: u32,
    },
    #[error("{path}: cannot write PNG ({reason})")]
    Png { path: PathBuf, reason: String },
    #[error("{path}: cannot open framebuffer device ({cause})")]
    FbOpen {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a framebuffer device ({cause})")]
    NotFramebuffer {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: unsupported framebuffer format ({reason})")]
    FbFormat { path: PathBuf, reason: String },
    #[error("{path}: cannot map framebuffer memory ({cause})")]
    FbMap {
        path: PathBuf,
        cause: std::io::Error,
    },
}
