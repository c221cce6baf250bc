//! Writing result images. Writes go to a temporary name and are renamed into place, so a reader
//! never sees half a file and a failed run leaves nothing behind. A [`Batch`] renames many files
//! into place together: all of them, or none.

use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{DynamicImage, ImageBuffer, ImageEncoder};

use crate::atomic_write::{Durability, rename_into, write_temp};
use crate::capture::file::{Depth, Image};
use crate::publish::jpeg;
use crate::{Error, Frame, Result};

pub use crate::capture::file::ImageKind;

/// An 8-bit RGB PNG or JPEG of the frame.
pub fn encode(frame: &Frame, kind: ImageKind) -> Result<Vec<u8>> {
    encode_on(frame, kind, 1)
}

/// [`encode`], a JPEG on up to `threads` threads ([`jpeg::encode`]): for one result waited
/// for, not for a batch whose files are already encoded side by side.
pub fn encode_on(frame: &Frame, kind: ImageKind, threads: usize) -> Result<Vec<u8>> {
    let (w, h) = (frame.width, frame.height);
    match kind {
        ImageKind::Png => encode_png(&frame.to_rgb8(), w as u32, h as u32),
        ImageKind::Jpeg => jpeg::encode(w, h, threads, |r| frame.rgb8_rows(r)),
    }
}

/// A PNG keeps the image's alpha and 16-bit depth; a JPEG is 8-bit RGB, and [`lost_in`] says
/// what that drops.
pub fn encode_image(img: &Image, kind: ImageKind) -> Result<Vec<u8>> {
    let f = &img.frame;
    let (w, h) = (f.width as u32, f.height as u32);
    let dynamic = match (kind, img.depth, &img.alpha) {
        (ImageKind::Jpeg, ..) | (ImageKind::Png, Depth::Eight, None) => return encode(f, kind),
        (_, Depth::Eight, Some(a)) => ImageBuffer::from_raw(
            w,
            h,
            rgba(&f.to_rgb8(), a, |v| u8::try_from(v).unwrap_or(u8::MAX)),
        )
        .map(DynamicImage::ImageRgba8),
        (_, Depth::Sixteen, None) => {
            ImageBuffer::from_raw(w, h, f.to_rgb16()).map(DynamicImage::ImageRgb16)
        }
        (_, Depth::Sixteen, Some(a)) => ImageBuffer::from_raw(w, h, rgba(&f.to_rgb16(), a, |v| v))
            .map(DynamicImage::ImageRgba16),
    }
    .ok_or_else(|| encode_err(format!("the alpha plane does not match the {w}x{h} frame")))?;
    let mut out = Vec::new();
    dynamic
        .write_with_encoder(PngEncoder::new(&mut out))
        .map_err(encode_err)?;
    Ok(out)
}

/// What writing `img` as `kind` loses, in words ("alpha channel", "16-bit depth", both), or
/// None: only a JPEG loses anything.
pub fn lost_in(img: &Image, kind: ImageKind) -> Option<String> {
    if kind != ImageKind::Jpeg {
        return None;
    }
    let lost: Vec<&str> = [
        img.alpha.is_some().then_some("alpha channel"),
        (img.depth == Depth::Sixteen).then_some("16-bit depth"),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!lost.is_empty()).then(|| lost.join(" and "))
}

/// RGB samples and an alpha plane (u16 at the image's depth, `cast` to the sample type)
/// interleaved as RGBA; a short alpha plane gives a short buffer, which
/// `ImageBuffer::from_raw` refuses.
fn rgba<T: Copy>(rgb: &[T], alpha: &[u16], cast: impl Fn(u16) -> T) -> Vec<T> {
    rgb.chunks_exact(3)
        .zip(alpha)
        .flat_map(|(p, &a)| [p[0], p[1], p[2], cast(a)])
        .collect()
}

fn encode_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("cannot encode image: {e}"))
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(encode_err)?;
    Ok(out)
}

/// Writes `bytes` to a hidden temporary file next to `path`; `commit` renames it into place.
pub struct PendingFile {
    tmp: PathBuf,
    dst: PathBuf,
}

impl PendingFile {
    pub fn write(dst: &Path, bytes: &[u8]) -> Result<Self> {
        let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = dst.with_file_name(format!(".{name}.takumi-tmp.{}", std::process::id()));
        write_temp(&tmp, &[bytes], Durability::Data).map_err(|e| Error::Output {
            path: dst.into(),
            reason: e.cause.to_string(),
        })?;
        Ok(PendingFile {
            tmp,
            dst: dst.into(),
        })
    }

    pub fn commit(self) -> Result<()> {
        // on failure `self` drops here and removes the temporary file
        rename_into(&self.tmp, &self.dst, Durability::Data).map_err(|e| Error::Output {
            path: self.dst.clone(),
            reason: e.cause.to_string(),
        })?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Files written to temporary names that go into place together. If any of them cannot, the
/// ones already renamed are taken back: a new file is removed, a replaced one gets its old
/// content back. So a failed batch leaves the folder as it found it.
#[derive(Default)]
pub struct Batch {
    files: Vec<PendingFile>,
}

/// A file of a batch that is in place, with what it replaced (a hard link or a copy of the old
/// file), until the batch is done.
struct Placed {
    dst: PathBuf,
    old: Option<PathBuf>,
}

impl Batch {
    pub fn push(&mut self, f: PendingFile) {
        self.files.push(f);
    }

    /// Renames every file into place, or none; the error names the file that failed.
    pub fn commit(self) -> Result<()> {
        let mut placed = Vec::with_capacity(self.files.len());
        // files not reached when one fails drop with the iterator, removing their temporaries
        for f in self.files {
            match place(f) {
                Ok(p) => placed.push(p),
                Err(e) => {
                    // every one is undone, even after one fails (`all` would stop there)
                    let mut undone = true;
                    for p in placed.into_iter().rev() {
                        undone &= undo(p);
                    }
                    return Err(rolled_back(e, undone));
                }
            }
        }
        for p in placed {
            if let Some(old) = p.old {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(())
    }
}

/// Keeps the file `f` replaces (if any) under a hidden name, then renames `f` into place.
fn place(f: PendingFile) -> Result<Placed> {
    let dst = f.dst.clone();
    let old = if std::fs::symlink_metadata(&dst).is_ok() {
        let name = dst.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let keep = dst.with_file_name(format!(".{name}.takumi-old.{}", std::process::id()));
        // a hard link costs nothing; a file system without links gets a copy
        let kept =
            std::fs::hard_link(&dst, &keep).or_else(|_| std::fs::copy(&dst, &keep).map(drop));
        if let Err(e) = kept {
            return Err(Error::Output {
                path: dst,
                reason: format!("cannot keep the existing file while replacing it: {e}"),
            });
        }
        Some(keep)
    } else {
        None
    };
    match f.commit() {
        Ok(()) => Ok(Placed { dst, old }),
        Err(e) => {
            if let Some(keep) = old {
                let _ = std::fs::remove_file(keep);
            }
            Err(e)
        }
    }
}

/// Puts back what a placed file replaced; false if that failed.
fn undo(p: Placed) -> bool {
    match p.old {
        Some(old) => std::fs::rename(&old, &p.dst).is_ok(),
        None => std::fs::remove_file(&p.dst).is_ok(),
    }
}

fn rolled_back(e: Error, undone: bool) -> Error {
    let note = if undone {
        "no output was written"
    } else {
        "some outputs renamed into place before it could not be taken back"
    };
    match e {
        Error::Output { path, reason } => Error::Output {
            path,
            reason: format!("{reason}; {note}"),
        },
        other => other,
    }
}
