//! Image files as frames: the size limits, the extension filter and the decoder every image
//! takumi reads goes through. The header is read and checked before any pixel buffer is allocated,
//! so a file that declares 60,000 x 60,000 is refused without allocating it.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};

use super::convert::complete_jpeg;
use crate::frame::MIN_SIDE;
use crate::{Error, Frame, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageLimits {
    pub min_side: u32,
    pub max_width: u32,
    pub max_height: u32,
    pub max_file_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // 4K UHD at most: larger frames would push a 1-4 GB board past its memory budget
        ImageLimits {
            min_side: MIN_SIDE as u32,
            max_width: 3840,
            max_height: 2160,
            max_file_bytes: 64 << 20,
        }
    }
}

impl ImageLimits {
    /// The one size check for every frame, whether a file, an MQTT payload or a camera's: the
    /// error is the limit it breaks.
    pub fn check(&self, w: u64, h: u64) -> std::result::Result<(), String> {
        if w < u64::from(self.min_side) || h < u64::from(self.min_side) {
            return Err(format!(
                "the smallest accepted side is {} px",
                self.min_side
            ));
        }
        if w > u64::from(self.max_width) || h > u64::from(self.max_height) {
            return Err(format!(
                "the largest accepted image is {}x{}",
                self.max_width, self.max_height
            ));
        }
        Ok(())
    }

    /// Checks the `[limits]` section itself: the engine's filters need 64 px a side.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.min_side < 64 || self.max_width < self.min_side || self.max_height < self.min_side {
            return Err("need 64 <= min_side <= max_width, max_height".into());
        }
        Ok(())
    }
}

/// The kinds of image file takumi reads and writes, known by their extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Png,
    Jpeg,
}

impl ImageKind {
    /// The one extension filter: `.png`, `.jpg` or `.jpeg`, in any case.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "png" => Some(ImageKind::Png),
            "jpg" | "jpeg" => Some(ImageKind::Jpeg),
            _ => None,
        }
    }
}

/// Reads and decodes an image file, its size checked before any pixel is decoded.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<Frame> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::BadImage {
            path: path.into(),
            reason: "it is a folder".into(),
        });
    }
    if meta.len() > limits.max_file_bytes {
        return Err(Error::BadImage {
            path: path.into(),
            reason: format!(
                "file is {} bytes, over the {} byte limit",
                meta.len(),
                limits.max_file_bytes
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, limits).map_err(|e| e.at(path))
}

/// The length of a PNG's palette chunk when it is not a multiple of 3. png 0.18.1 (the latest
/// release) panics on such a palette (image-rs/image-png#694, fixed upstream but unreleased), so
/// it is refused before the decoder sees it. Found by `fuzz/` (target image_decode). Only the
/// chunks before the image data are walked, where PLTE must be; a malformed chunk list is left
/// for the decoder to report.
fn ragged_png_palette(png: &[u8]) -> Option<u32> {
    let mut rest = png.get(8..)?; // the signature
    while let (Some(len), Some(kind)) = (rest.get(..4), rest.get(4..8)) {
        let len = u32::from_be_bytes(len.try_into().ok()?);
        match kind {
            b"PLTE" => return (len % 3 != 0).then_some(len),
            b"IDAT" | b"IEND" => return None,
            // length, type, data, CRC
            _ => rest = rest.get(usize::try_from(len).ok()?.checked_add(12)?..)?,
        }
    }
    None
}

/// Decodes PNG or JPEG bytes (from a file or an MQTT payload) into a frame.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<Frame> {
    let bad = |reason: String| Error::BadImage {
        path: "<bytes>".into(),
        reason,
    };
    let fmt = image::guess_format(bytes)
        .map_err(|_| bad("unknown format, expected PNG or JPEG".into()))?;
    if !matches!(fmt, ImageFormat::Png | ImageFormat::Jpeg) {
        return Err(bad(format!(
            "{fmt:?} is not supported, expected PNG or JPEG"
        )));
    }
    if fmt == ImageFormat::Jpeg && complete_jpeg(bytes).is_none() {
        return Err(bad("truncated JPEG: no end-of-image marker".into()));
    }
    if fmt == ImageFormat::Png
        && let Some(len) = ragged_png_palette(bytes)
    {
        return Err(bad(format!(
            "PNG palette (PLTE) of {len} bytes is not a whole number of RGB entries"
        )));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), fmt);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    limits
        .check(u64::from(w), u64::from(h))
        .map_err(|limit| Error::ImageSize {
            path: "<bytes>".into(),
            width: u64::from(w),
            height: u64::from(h),
            limit,
        })?;
    reader = ImageReader::with_format(Cursor::new(bytes), fmt);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    l.max_alloc = Some((limits.max_width as u64) * (limits.max_height as u64) * 8 + (16 << 20));
    reader.limits(l);
    let img = reader
        .decode()
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    let rgb = img.into_rgb8();
    Ok(Frame::from_rgb8(w as usize, h as usize, rgb.as_raw()))
}
