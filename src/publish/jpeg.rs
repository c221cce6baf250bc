//! JPEG encoding of results, in horizontal strips on several threads.
//!
//! jpeg-encoder is single-threaded, and at 640x480 it costs about as much as the apply. A
//! baseline JPEG with a restart interval is made of independent pieces: at each restart marker
//! the DC prediction starts again and the bits are byte-aligned. So strips encoded on their own,
//! each exactly one restart interval long, joined by RSTn markers under the first strip's header
//! (its height patched), are one valid JPEG that decodes to the same pixels as a one-piece
//! encode. jpeg-encoder has no such mode, hence the splicing here.

use std::ops::Range;
use std::panic::AssertUnwindSafe;

use crate::{Error, Result};

/// Quality 92 with full-resolution chroma (4:4:4), as image's encoder wrote it; the
/// jpeg-encoder crate does the same in half the time.
const QUALITY: u8 = 92;
/// Pixels per side of an MCU at 4:4:4 sampling.
const MCU: usize = 8;

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("cannot encode image: {e}"))
}

/// A `w` x `h` JPEG of the interleaved 8-bit RGB rows that `rows(range)` gives, encoded in up
/// to about `threads` strips at once, each strip's rows made on its thread (converting to 8 bits
/// is split with the encoding); one thread gives the plain one-piece file.
pub fn encode<F>(w: usize, h: usize, threads: usize, rows: F) -> Result<Vec<u8>>
where
    F: Fn(Range<usize>) -> Vec<u8> + Sync,
{
    let side = |v: usize| {
        u16::try_from(v).map_err(|_| encode_err(format!("{w}x{h} is too large for JPEG")))
    };
    let (w16, h16) = (side(w)?, side(h)?);
    let (cols, mcu_rows) = (w.div_ceil(MCU), h.div_ceil(MCU));
    // a restart interval counts MCUs in a u16
    let most_rows = (usize::from(u16::MAX) / cols.max(1)).max(1);
    let strip_rows = mcu_rows.div_ceil(threads.max(1)).min(most_rows);
    if threads <= 1 || strip_rows >= mcu_rows {
        return one_piece(&rows(0..h), w16, h16, None);
    }
    let interval = u16::try_from(strip_rows * cols).map_err(encode_err)?;
    let strips: Vec<Range<usize>> = (0..h)
        .step_by(strip_rows * MCU)
        .map(|y| y..(y + strip_rows * MCU).min(h))
        .collect();
    let strip = |r: Range<usize>| one_piece(&rows(r.clone()), w16, side(r.len())?, Some(interval));
    let parts = std::thread::scope(|s| {
        let mut strips = strips.into_iter();
        let first = strips.next();
        let handles: Vec<_> = strips
            .map(|r| {
                let strip = &strip;
                s.spawn(move || strip(r))
            })
            .collect();
        // the calling thread encodes the first strip rather than wait: one thread fewer to start
        let first = first.map(|r| std::panic::catch_unwind(AssertUnwindSafe(|| strip(r))));
        first
            .into_iter()
            .chain(handles.into_iter().map(|t| t.join()))
            .map(|p| p.unwrap_or_else(|_| Err(encode_err("a strip's encoder panicked"))))
            .collect::<Result<Vec<_>>>()
    })?;
    join(&parts, h16).ok_or_else(|| encode_err("jpeg-encoder wrote an unexpected layout"))
}

fn one_piece(rgb: &[u8], w: u16, h: u16, restart: Option<u16>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, QUALITY);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
    enc.set_restart_interval(restart.unwrap_or(0));
    enc.encode(rgb, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(encode_err)?;
    Ok(out)
}

/// The strips' scans, in order and joined by restart markers, under the first strip's header
/// with the whole image's height.
fn join(parts: &[Vec<u8>], height: u16) -> Option<Vec<u8>> {
    let (first, _) = parts.split_first()?;
    let (sof, scan) = layout(first)?;
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    out.extend_from_slice(&first[..scan]);
    // SOF0: marker (2), length (2), precision (1), then the height
    out.get_mut(sof + 5..sof + 7)?
        .copy_from_slice(&height.to_be_bytes());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.extend([0xFF, 0xD0 + ((i - 1) % 8) as u8]);
        }
        let (_, start) = layout(p)?;
        out.extend_from_slice(p.get(start..p.len() - 2)?);
    }
    out.extend([0xFF, 0xD9]);
    Some(out)
}

/// Where a one-piece baseline JPEG's frame header (SOF0) starts and its entropy-coded data
/// does (just past the SOS segment), checking that it ends with EOI.
fn layout(jpeg: &[u8]) -> Option<(usize, usize)> {
    if !jpeg.starts_with(&[0xFF, 0xD8]) || !jpeg.ends_with(&[0xFF, 0xD9]) {
        return None;
    }
    let (mut at, mut sof) = (2, None);
    while let [0xFF, marker, hi, lo, ..] = *jpeg.get(at..)? {
        let end = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
        match marker {
            0xC0 => sof = Some(at),
            0xDA => return sof.filter(|_| end <= jpeg.len() - 2).map(|s| (s, end)),
            _ => {}
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth gradient with a hard edge and some texture, `w` x `h`.
    fn picture(w: usize, h: usize) -> Vec<u8> {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .flat_map(|(x, y)| {
                let edge = if x * 3 > w { 200 } else { 30 };
                [
                    (x * 255 / w.max(1)) as u8,
                    (y * 255 / h.max(1)) as u8,
                    (edge + (x * 7 + y * 13) % 40) as u8,
                ]
            })
            .collect()
    }

    /// The rows of `rgb`, a `w`-pixel-wide interleaved image, as [`encode`] asks for them.
    fn rows_of(rgb: &[u8], w: usize) -> impl Fn(Range<usize>) -> Vec<u8> + Sync + '_ {
        move |r| rgb[r.start * w * 3..r.end * w * 3].to_vec()
    }

    fn decoded(jpeg: &[u8]) -> (u32, u32, Vec<u8>) {
        let img = image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
            .expect("a valid JPEG")
            .to_rgb8();
        (img.width(), img.height(), img.into_raw())
    }

    #[test]
    fn strips_decode_to_the_pixels_of_the_one_piece_file() {
        for (w, h) in [(640, 480), (61, 37), (9, 17), (200, 8), (33, 130)] {
            let rgb = picture(w, h);
            let whole = encode(w, h, 1, rows_of(&rgb, w)).unwrap();
            for threads in [2, 3, 5] {
                let striped = encode(w, h, threads, rows_of(&rgb, w)).unwrap();
                // a restart interval (DRI) in the header where there are strips to make
                let dri = striped.windows(2).any(|m| m == [0xFF, 0xDD]);
                assert_eq!(dri, h > MCU, "{w}x{h}");
                assert_eq!(
                    decoded(&striped),
                    decoded(&whole),
                    "{w}x{h} in {threads} strips"
                );
            }
        }
    }

    #[test]
    fn more_threads_than_mcu_rows_and_tiny_images_still_encode() {
        for (w, h) in [(1, 1), (8, 8), (16, 9)] {
            let rgb = picture(w, h);
            let (dw, dh, _) = decoded(&encode(w, h, 4, rows_of(&rgb, w)).unwrap());
            assert_eq!((dw, dh), (w as u32, h as u32));
        }
    }

    /// vendor/jpeg-encoder is jpeg-encoder 0.6.1 made faster, not changed: these are the
    /// hashes of the files the crate as published writes, on its AVX2 and its portable path.
    #[test]
    fn the_vendored_encoder_writes_the_published_crates_bytes() {
        let hashes: Vec<String> = [(640, 480), (61, 37), (9, 17)]
            .into_iter()
            .map(|(w, h)| {
                let jpeg = encode(w, h, 1, rows_of(&picture(w, h), w)).unwrap();
                blake3::hash(&jpeg).to_hex()[..16].to_string()
            })
            .collect();
        // the crate's AVX2 DCT rounds differently from its portable one
        let published = match avx2() {
            true => ["c9ced8869a0133f1", "849b7bb59117388e", "dfbb75e72536f312"],
            false => ["dce9553ed340df91", "e96efcd7d5615dfa", "de00b5647bc2067a"],
        };
        assert_eq!(hashes, published);
    }

    /// Whether jpeg-encoder takes its AVX2 path here, as it detects it.
    fn avx2() -> bool {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        return std::is_x86_feature_detected!("avx2");
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        false
    }

    #[test]
    fn a_short_buffer_is_an_error_not_a_panic() {
        assert!(encode(4, 4, 2, |_| vec![0; 10]).is_err());
    }
}
