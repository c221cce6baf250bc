//! The host target: render into memory, write a PNG.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;
use image::ImageEncoder;
use image::codecs::png::PngEncoder;

use super::{Display, DisplayError, DisplayState, MAX_SIDE, render};
use crate::atomic_write::{Durability, write_atomic};

/// An in-memory Rgb888 framebuffer (interleaved RGB8, row-major); pixels outside it are
/// dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Canvas {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Canvas {
    /// A black canvas, or `None` when a side exceeds [`MAX_SIDE`].
    pub fn new(width: u32, height: u32) -> Option<Self> {
        if width > MAX_SIDE || height > MAX_SIDE {
            return None;
        }
        let len = width as usize * height as usize * 3;
        Some(Self {
            width,
            height,
            rgb: vec![0; len],
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixel at (x, y), or `None` outside the canvas.
    pub fn pixel(&self, x: u32, y: u32) -> Option<Rgb888> {
        let i = self.index(x, y)?;
        Some(Rgb888::new(self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]))
    }

    /// Interleaved RGB8 bytes, `width * height * 3` of them.
    pub fn as_rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// Writes the canvas as a PNG at `path`, atomically: readers see the old file or the
    /// new one, never a partial one. No fsync: the image is redrawn on every show, so syncing
    /// each frame would only wear the station's flash.
    pub fn write_png(&self, path: &Path) -> Result<(), DisplayError> {
        let png_err = |reason: String| DisplayError::Png {
            path: path.to_path_buf(),
            reason,
        };
        let name = path
            .file_name()
            .ok_or_else(|| png_err("path names no file".into()))?;
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(
                &self.rgb,
                self.width,
                self.height,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| png_err(e.to_string()))?;
        // pid + counter keeps concurrent writers, in this process or another, apart
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = path.with_file_name(format!(
            ".{}.{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // errors name `path`, the file the caller asked for, not the temporary one
        write_atomic(&tmp, path, &[&png], Durability::Atomic).map_err(|e| DisplayError::Io {
            path: path.to_path_buf(),
            cause: e.cause,
        })
    }

    fn index(&self, x: u32, y: u32) -> Option<usize> {
        (x < self.width && y < self.height)
            .then(|| (y as usize * self.width as usize + x as usize) * 3)
    }
}

impl std::fmt::Debug for Canvas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canvas")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.width, self.height)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(p, c) in pixels {
            let (Ok(x), Ok(y)) = (u32::try_from(p.x), u32::try_from(p.y)) else {
                continue;
            };
            if let Some(i) = self.index(x, y) {
                self.rgb[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }

    // Row fills: clearing a 1080p screen pixel by pixel is needlessly slow.
    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        let area = area.intersection(&self.bounding_box());
        let Some(bottom_right) = area.bottom_right() else {
            return Ok(());
        };
        let rgb = [color.r(), color.g(), color.b()];
        let (x0, x1) = (area.top_left.x as usize, bottom_right.x as usize);
        for y in area.top_left.y as usize..=bottom_right.y as usize {
            let row = y * self.width as usize * 3;
            for px in self.rgb[row + x0 * 3..row + (x1 + 1) * 3].chunks_exact_mut(3) {
                px.copy_from_slice(&rgb);
            }
        }
        Ok(())
    }
}

/// Renders each state into memory and writes it as a PNG file (atomically replaced).
#[derive(Debug, Clone)]
pub struct PngDisplay {
    path: PathBuf,
    width: u32,
    height: u32,
}

impl PngDisplay {
    /// A `width` x `height` PNG display at `path`; both sides must be in 1..=[`MAX_SIDE`].
    pub fn new(path: impl Into<PathBuf>, width: u32, height: u32) -> Result<Self, DisplayError> {
        let path = path.into();
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(DisplayError::Size {
                path,
                width,
                height,
            });
        }
        Ok(Self {
            path,
            width,
            height,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}

impl Display for PngDisplay {
    fn show(&mut self, state: &DisplayState) -> Result<(), DisplayError> {
        let mut canvas = Canvas::new(self.width, self.height).ok_or(DisplayError::Size {
            path: self.path.clone(),
            width: self.width,
            height: self.height,
        })?;
        let Ok(()) = render(&mut canvas, state);
        canvas.write_png(&self.path)
    }
}
