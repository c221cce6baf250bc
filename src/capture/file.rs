//! Image files as frames: the size limits, the extension filter and the decoder every image
//! takumi reads goes through. The header is read and checked before any pixel buffer is allocated,
//! so a file that declares 60,000 x 60,000 is refused without allocating it.
//!
//! Every image is turned upright as its EXIF orientation says (a phone stores a portrait photo
//! sideways and tags it), so takumi works on, and writes, what a viewer shows. [`read_image`]
//! also keeps what the engine's [`Frame`] does not carry, alpha and 16-bit depth, for the PNG
//! that `apply` writes back.

use std::io::Cursor;
use std::path::Path;

use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
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
        // either way round: a portrait 4K photo costs what a landscape one does
        let (long, short) = (w.max(h), w.min(h));
        let (max_w, max_h) = (u64::from(self.max_width), u64::from(self.max_height));
        if long > max_w.max(max_h) || short > max_w.min(max_h) {
            return Err(format!(
                "the largest accepted image is {}x{} (either way round)",
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

/// Bits per channel of an image file: JPEGs are 8-bit, PNGs 8- or 16-bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    Eight,
    Sixteen,
}

/// A decoded image: the engine's frame, and what a frame does not carry but a written PNG
/// should give back.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub frame: Frame,
    /// The alpha plane, row-major, at the image's depth (0..=255 or 0..=65535); None when the
    /// file has no alpha channel. The edit leaves it as it is.
    pub alpha: Option<Vec<u16>>,
    pub depth: Depth,
}

impl Image {
    /// Splits a decoded image into RGB (the frame) and alpha, 16-bit samples staying 16-bit.
    /// Grey images become RGB, since an edit may add colour.
    fn from_dynamic(img: DynamicImage) -> Image {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let color = img.color();
        let deep = color.bytes_per_pixel() > color.channel_count();
        match (deep, color.has_alpha()) {
            (false, false) => Image {
                frame: Frame::from_rgb8(w, h, img.into_rgb8().as_raw()),
                alpha: None,
                depth: Depth::Eight,
            },
            (false, true) => {
                let px = img.into_rgba8().into_raw();
                Image {
                    frame: Frame::from_interleaved(w, h, &px, 4),
                    alpha: Some(px.chunks_exact(4).map(|p| u16::from(p[3])).collect()),
                    depth: Depth::Eight,
                }
            }
            (true, false) => Image {
                frame: Frame::from_rgb16(w, h, img.into_rgb16().as_raw()),
                alpha: None,
                depth: Depth::Sixteen,
            },
            (true, true) => {
                let px = img.into_rgba16().into_raw();
                Image {
                    frame: Frame::from_interleaved(w, h, &px, 4),
                    alpha: Some(px.chunks_exact(4).map(|p| p[3]).collect()),
                    depth: Depth::Sixteen,
                }
            }
        }
    }
}

/// An image read for `learn`: its frame, downscaled where it was larger than learn works at,
/// and the (upright) size of the file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaled {
    pub frame: Frame,
    pub original: (u32, u32),
}

/// The most bytes of decoded pixels `learn` reads one image into, before downscaling it: an
/// 8-bit 8000x6000 phone photo takes 144 MB. With the file's bytes and the pair read before
/// it, reading stays well under the boards' `MemoryMax=512M`, and under what learn itself takes
/// after.
pub const LEARN_READ_BYTES: u64 = 200 << 20;

/// Reads a file that passes the file-size limit; its pixels are not looked at.
fn read_file(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>> {
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
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads and decodes an image file into an upright frame, its size checked before any pixel is
/// decoded.
pub fn load_image(path: &Path, limits: &ImageLimits) -> Result<Frame> {
    read_image(path, limits).map(|img| img.frame)
}

/// [`load_image`], keeping the file's alpha and depth.
pub fn read_image(path: &Path, limits: &ImageLimits) -> Result<Image> {
    let bytes = read_file(path, limits)?;
    decode(&bytes, limits).map_err(|e| e.at(path))
}

/// Reads an image for `learn`: any size whose pixels fit [`LEARN_READ_BYTES`], downscaled to at
/// most `max_px` pixels. Only `limits`' smallest side and file size apply: a phone photo is
/// larger than any frame `apply` takes, and learning from it at that size is what its downscale
/// avoids.
pub fn load_for_learn(path: &Path, limits: &ImageLimits, max_px: u64) -> Result<Scaled> {
    let bytes = read_file(path, limits)?;
    decode_scaled(&bytes, limits, max_px).map_err(|e| e.at(path))
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

fn bad(reason: String) -> Error {
    Error::BadImage {
        path: "<bytes>".into(),
        reason,
    }
}

fn size_err((w, h): (u32, u32), limit: String) -> Error {
    Error::ImageSize {
        path: "<bytes>".into(),
        width: u64::from(w),
        height: u64::from(h),
        limit,
    }
}

/// The decoder for PNG or JPEG bytes, with the orientation the file asks a viewer to show it in.
/// Nothing but the header has been read.
fn open(bytes: &[u8]) -> Result<(impl ImageDecoder + '_, Orientation)> {
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
    let mut dec = ImageReader::with_format(Cursor::new(bytes), fmt)
        .into_decoder()
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    // a damaged Exif block costs the image its rotation, not its pixels
    let orientation = dec.orientation().unwrap_or(Orientation::NoTransforms);
    Ok((dec, orientation))
}

/// The size a viewer shows: a quarter turn swaps the sides.
fn upright((w, h): (u32, u32), o: Orientation) -> (u32, u32) {
    use Orientation::*;
    match o {
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (h, w),
        NoTransforms | Rotate180 | FlipHorizontal | FlipVertical => (w, h),
    }
}

/// Decodes the pixels, under the decoder's own limits as a second line of defence.
fn pixels(mut dec: impl ImageDecoder, max_side: u32, max_alloc: u64) -> Result<DynamicImage> {
    let mut l = Limits::default();
    l.max_image_width = Some(max_side);
    l.max_image_height = Some(max_side);
    l.max_alloc = Some(max_alloc);
    dec.set_limits(l)
        .map_err(|e| bad(format!("cannot decode: {e}")))?;
    DynamicImage::from_decoder(dec).map_err(|e| bad(format!("cannot decode: {e}")))
}

/// Decodes PNG or JPEG bytes (from a file or an MQTT payload) into an upright frame.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<Frame> {
    decode(bytes, limits).map(|img| img.frame)
}

/// [`decode_image`], keeping the alpha and depth. The limits apply to the upright size, which is
/// what the engine works on.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<Image> {
    let (dec, orientation) = open(bytes)?;
    let (w, h) = upright(dec.dimensions(), orientation);
    limits
        .check(u64::from(w), u64::from(h))
        .map_err(|limit| size_err((w, h), limit))?;
    let side = limits.max_width.max(limits.max_height);
    let alloc = u64::from(limits.max_width) * u64::from(limits.max_height) * 8 + (16 << 20);
    let mut img = pixels(dec, side, alloc)?;
    img.apply_orientation(orientation);
    Ok(Image::from_dynamic(img))
}

/// The largest size of `w` x `h`'s shape with at most `max_px` pixels (itself if it has no more).
pub fn fit_pixels((w, h): (u32, u32), max_px: u64) -> (u32, u32) {
    let px = u64::from(w) * u64::from(h);
    if px <= max_px {
        return (w, h);
    }
    let s = (max_px as f64 / px as f64).sqrt();
    let side = |v: u32| ((f64::from(v) * s).floor() as u32).max(1);
    (side(w), side(h))
}

/// A frame (a camera's capture) as learn works on it: area-averaged down to at most `max_px`
/// pixels, like an image file in [`decode_scaled`].
pub fn scale_for_learn(f: &Frame, max_px: u64) -> Scaled {
    let (w, h) = (f.width as u32, f.height as u32);
    let (tw, th) = fit_pixels((w, h), max_px);
    let frame = match image::RgbImage::from_raw(w, h, f.to_rgb8()) {
        Some(img) if (tw, th) != (w, h) => {
            Image::from_dynamic(DynamicImage::ImageRgb8(img).thumbnail_exact(tw, th)).frame
        }
        _ => f.clone(),
    };
    Scaled {
        frame,
        original: (w, h),
    }
}

/// [`load_for_learn`] on bytes. Downscaling comes before turning upright, so the full-size
/// image is never copied; the two commute.
pub fn decode_scaled(bytes: &[u8], limits: &ImageLimits, max_px: u64) -> Result<Scaled> {
    let (dec, orientation) = open(bytes)?;
    let raw = dec.dimensions();
    let (w, h) = upright(raw, orientation);
    let any_size = ImageLimits {
        max_width: u32::MAX,
        max_height: u32::MAX,
        ..*limits
    };
    any_size
        .check(u64::from(w), u64::from(h))
        .map_err(|limit| size_err((w, h), limit))?;
    let need = dec.total_bytes();
    if need > LEARN_READ_BYTES {
        return Err(size_err(
            (w, h),
            format!(
                "learn reads images of up to {} MB of pixels, and this {} one needs {} MB",
                LEARN_READ_BYTES >> 20,
                color_name(dec.color_type()),
                need.div_ceil(1 << 20)
            ),
        ));
    }
    let (tw, th) = fit_pixels(raw, max_px);
    if tw.min(th) < limits.min_side {
        return Err(size_err(
            (w, h),
            format!(
                "learn downscales it to {tw}x{th}, under the smallest accepted side of {} px",
                limits.min_side
            ),
        ));
    }
    let img = pixels(dec, u32::MAX, LEARN_READ_BYTES + (16 << 20))?;
    // area averaging: every pixel of the original counts, so fine detail does not alias
    let mut img = if (tw, th) == raw {
        img
    } else {
        img.thumbnail_exact(tw, th)
    };
    img.apply_orientation(orientation);
    Ok(Scaled {
        frame: Image::from_dynamic(img).frame,
        original: (w, h),
    })
}

fn color_name(c: ColorType) -> &'static str {
    let deep = c.bytes_per_pixel() > c.channel_count();
    match (deep, c.has_alpha(), c.has_color()) {
        (false, false, false) => "8-bit grey",
        (false, true, false) => "8-bit grey and alpha",
        (false, false, true) => "8-bit RGB",
        (false, true, true) => "8-bit RGBA",
        (true, false, false) => "16-bit grey",
        (true, true, false) => "16-bit grey and alpha",
        (true, false, true) => "16-bit RGB",
        (true, true, true) => "16-bit RGBA",
    }
}
