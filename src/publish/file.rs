//! Writing result images. Writes go to a temporary name and are renamed into place, so a reader
//! never sees half a file and a failed run leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::ImageEncoder;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;

use crate::{Error, Frame, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Png,
    Jpeg,
}

impl ImageKind {
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "png" => Some(ImageKind::Png),
            "jpg" | "jpeg" => Some(ImageKind::Jpeg),
            _ => None,
        }
    }
}

pub fn encode(frame: &Frame, kind: ImageKind) -> Result<Vec<u8>> {
    let rgb = frame.to_rgb8();
    let mut out = Vec::new();
    let (w, h) = (frame.width as u32, frame.height as u32);
    let r = match kind {
        ImageKind::Png => {
            PngEncoder::new(&mut out).write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        }
        ImageKind::Jpeg => JpegEncoder::new_with_quality(&mut out, 92).write_image(
            &rgb,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        ),
    };
    r.map_err(|e| Error::Invalid(format!("cannot encode image: {e}")))?;
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
        let res = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::Output {
                path: dst.into(),
                reason: e.to_string(),
            });
        }
        Ok(PendingFile {
            tmp,
            dst: dst.into(),
        })
    }

    pub fn commit(self) -> Result<()> {
        // on failure `self` drops here and removes the temporary file
        std::fs::rename(&self.tmp, &self.dst).map_err(|e| Error::Output {
            path: self.dst.clone(),
            reason: e.to_string(),
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
