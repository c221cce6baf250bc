//! Camera buffers to frames: YUYV 4:2:2 and MJPEG. The buffer, its length and the sizes all come
//! from a driver or a file, so each is checked before it is indexed or decoded.

use std::io::Cursor;
use std::path::PathBuf;

use image::{ImageFormat, ImageReader, Limits};

use crate::frame::Frame;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("truncated frame: {got} bytes, at least {expected} needed")]
    Truncated { expected: usize, got: usize },
    #[error("frame is {}x{}, expected {}x{}", .got.0, .got.1, .expected.0, .expected.1)]
    WrongSize {
        expected: (usize, usize),
        got: (usize, usize),
    },
    #[error("{0}")]
    Format(String),
    // not `source`: the message holds the cause, and the CLI prints the chain
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Device(String),
    #[error("no more frames")]
    Exhausted,
}

// BT.601 limited range: luma 16..235 and chroma 16..240 stretched to full-range RGB, with the
// 1/255 that takes RGB to 0..1 folded in.
const Y_SCALE: f32 = 255.0 / 219.0 / 255.0;
const C_SCALE: f32 = 255.0 / 224.0 / 255.0;
const KR: f32 = 0.299;
const KB: f32 = 0.114;
const KG: f32 = 1.0 - KR - KB;
const R_V: f32 = 2.0 * (1.0 - KR) * C_SCALE;
const B_U: f32 = 2.0 * (1.0 - KB) * C_SCALE;
const G_U: f32 = 2.0 * (1.0 - KB) * KB / KG * C_SCALE;
const G_V: f32 = 2.0 * (1.0 - KR) * KR / KG * C_SCALE;

/// Converts a YUYV (Y0 U Y1 V) buffer of `width` x `height` pixels with `stride` bytes per line.
/// Only the first `bytesused` bytes (clamped to `buf.len()`) count as filled; the padding at each
/// line's end and after the last line is never read.
pub fn yuyv_to_frame(
    buf: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    bytesused: usize,
) -> Result<Frame, CaptureError> {
    if width == 0 || height == 0 {
        return Err(CaptureError::Format(format!(
            "YUYV frame size {width}x{height} is empty"
        )));
    }
    if !width.is_multiple_of(2) {
        return Err(CaptureError::Format(format!(
            "YUYV needs an even width (two pixels share their chroma), got {width}"
        )));
    }
    let too_big = || CaptureError::Format(format!("YUYV frame size {width}x{height} overflows"));
    let line = width.checked_mul(2).ok_or_else(too_big)?;
    if stride < line {
        return Err(CaptureError::Format(format!(
            "YUYV line stride {stride} is shorter than a {width}-pixel line ({line} bytes)"
        )));
    }
    let expected = stride
        .checked_mul(height - 1)
        .and_then(|n| n.checked_add(line))
        .ok_or_else(too_big)?;
    let got = bytesused.min(buf.len());
    if got < expected {
        return Err(CaptureError::Truncated { expected, got });
    }

    // cannot overflow: width * height <= expected / 2 <= buf.len()
    let n = width * height;
    let mut data = vec![0.0f32; 3 * n];
    let (r, gb) = data.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    let rows = r
        .chunks_exact_mut(width)
        .zip(g.chunks_exact_mut(width))
        .zip(b.chunks_exact_mut(width));
    for (y, ((r, g), b)) in rows.enumerate() {
        let src = &buf[y * stride..y * stride + line];
        let px = src
            .chunks_exact(4)
            .zip(r.chunks_exact_mut(2))
            .zip(g.chunks_exact_mut(2))
            .zip(b.chunks_exact_mut(2));
        for (((yuyv, r), g), b) in px {
            let u = yuyv[1] as f32 - 128.0;
            let v = yuyv[3] as f32 - 128.0;
            let (dr, dg, db) = (R_V * v, -G_U * u - G_V * v, B_U * u);
            for (k, luma) in [yuyv[0], yuyv[2]].into_iter().enumerate() {
                let c = (luma as f32 - 16.0) * Y_SCALE;
                r[k] = (c + dr).clamp(0.0, 1.0);
                g[k] = (c + dg).clamp(0.0, 1.0);
                b[k] = (c + db).clamp(0.0, 1.0);
            }
        }
    }
    Ok(Frame {
        width,
        height,
        data,
    })
}

/// Decodes one MJPEG frame from `buf[..bytesused]` (clamped to `buf.len()`). The size its header
/// declares must be `width` x `height`, checked before any pixel is decoded.
pub fn mjpeg_to_frame(
    buf: &[u8],
    bytesused: usize,
    width: usize,
    height: usize,
) -> Result<Frame, CaptureError> {
    let data = &buf[..bytesused.min(buf.len())];
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err(CaptureError::Format(
            "not a JPEG frame: no start-of-image marker".into(),
        ));
    }
    let Some(jpeg) = complete_jpeg(data) else {
        return Err(CaptureError::Format(format!(
            "truncated JPEG frame: no end-of-image marker in {} bytes",
            data.len()
        )));
    };
    // many UVC cameras leave out the Huffman tables and expect the standard ones
    let patched;
    let jpeg = if lacks_huffman_tables(jpeg) {
        patched = [&jpeg[..2], &STANDARD_DHT[..], &jpeg[2..]].concat();
        &patched[..]
    } else {
        jpeg
    };
    let bad =
        |e: image::ImageError| CaptureError::Format(one_line(&format!("bad JPEG frame: {e}")));
    let (w, h) = ImageReader::with_format(Cursor::new(jpeg), ImageFormat::Jpeg)
        .into_dimensions()
        .map_err(bad)?;
    if (w as usize, h as usize) != (width, height) {
        return Err(CaptureError::WrongSize {
            expected: (width, height),
            got: (w as usize, h as usize),
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(jpeg), ImageFormat::Jpeg);
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(u64::from(w) * u64::from(h) * 8 + (16 << 20));
    reader.limits(limits);
    let rgb = reader.decode().map_err(bad)?.into_rgb8();
    if rgb.dimensions() != (w, h) {
        return Err(CaptureError::WrongSize {
            expected: (width, height),
            got: (rgb.width() as usize, rgb.height() as usize),
        });
    }
    Ok(Frame::from_rgb8(width, height, rgb.as_raw()))
}

/// The JPEG up to its end-of-image marker, or `None` when there is none: the decoder pads a
/// cut-off scan with grey instead of failing, so every JPEG is checked here first. Padding after
/// the marker is allowed: zeros (some UVC cameras fill their buffers) and white space (files).
pub(crate) fn complete_jpeg(bytes: &[u8]) -> Option<&[u8]> {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    let jpeg = &bytes[..end];
    jpeg.ends_with(&[0xFF, 0xD9]).then_some(jpeg)
}

/// Decoder messages may hold line breaks; a log line must not.
pub(crate) fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether the marker segments before the first scan define no Huffman table. A malformed
/// header answers false and is left for the decoder to report.
fn lacks_huffman_tables(jpeg: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return false;
        }
        match jpeg[i + 1] {
            0xC4 => return false,
            0xDA => return true,
            // fill byte, or a marker without a length
            0xFF => i += 1,
            0x01 | 0xD0..=0xD7 => i += 2,
            _ => i += 2 + u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize,
        }
    }
    false
}

/// The Huffman tables of JPEG Annex K.3 (luma DC, chroma DC, luma AC, chroma AC) as one DHT
/// segment: the tables an MJPEG frame without its own DHT is coded with (OpenDML AVI spec).
const STANDARD_DHT: [u8; 420] = [
    0xFF, 0xC4, 0x01, 0xA2, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A,
    0x0B, 0x01, 0x00, 0x03, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x10, 0x00,
    0x02, 0x01, 0x03, 0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7D, 0x01,
    0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22,
    0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0, 0x24,
    0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28, 0x29,
    0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4A,
    0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6A,
    0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A,
    0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8,
    0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6,
    0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2, 0xE3,
    0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9,
    0xFA, 0x11, 0x00, 0x02, 0x01, 0x02, 0x04, 0x04, 0x03, 0x04, 0x07, 0x05, 0x04, 0x04, 0x00, 0x01,
    0x02, 0x77, 0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07,
    0x61, 0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33,
    0x52, 0xF0, 0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19,
    0x1A, 0x26, 0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46,
    0x47, 0x48, 0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66,
    0x67, 0x68, 0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85,
    0x86, 0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3,
    0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA,
    0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8,
    0xD9, 0xDA, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6,
    0xF7, 0xF8, 0xF9, 0xFA,
];
