//! Image files as frames. The header is read and checked before any pixel buffer is allocated,
//! so a file that declares 60,000 x 60,000 is refused without allocating it.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};

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
            min_side: 64,
            max_width: 3840,
            max_height: 2160,
            max_file_bytes: 64 << 20,
        }
    }
}

/// Reads and decodes an image file. Returns the frame and the blake3 hash of the file's bytes.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<(Frame, String)> {
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
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let frame = decode_image(&bytes, limits).map_err(|e| match e {
        Error::BadImage { reason, .. } => Error::BadImage {
            path: path.into(),
            reason,
        },
        Error::ImageSize {
            width,
            height,
            limit,
            ..
        } => Error::ImageSize {
            path: path.into(),
            width,
            height,
            limit,
        },
        other => other,
    })?;
    Ok((frame, hash))
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
    // the JPEG decoder pads a truncated scan with grey instead of failing: check the end marker
    if fmt == ImageFormat::Jpeg
        && !bytes.trim_ascii_end().ends_with(&[0xFF, 0xD9])
        && !bytes.ends_with(&[0xFF, 0xD9])
    {
        return Err(bad("truncated JPEG: no end-of-image marker".into()));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), fmt);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    check_size(w as u64, h as u64, limits)?;
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

pub fn check_size(w: u64, h: u64, limits: &ImageLimits) -> Result<()> {
    let size = |limit: String| Error::ImageSize {
        path: "<bytes>".into(),
        width: w,
        height: h,
        limit,
    };
    if w < limits.min_side as u64 || h < limits.min_side as u64 {
        return Err(size(format!(
            "the smallest accepted side is {} px",
            limits.min_side
        )));
    }
    if w > limits.max_width as u64 || h > limits.max_height as u64 {
        return Err(size(format!(
            "the largest accepted image is {}x{}",
            limits.max_width, limits.max_height
        )));
    }
    Ok(())
}
