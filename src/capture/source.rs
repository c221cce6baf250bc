//! Where frames come from: a folder of recorded images, a generated test pattern, or (with the
//! `v4l` feature) a V4L2 camera. A bad frame is an error for that frame only: the next call
//! moves on, so one bad image does not stop the line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::convert::{CaptureError, one_line};
use super::file::{ImageKind, ImageLimits, load_image};
use crate::frame::Frame;

pub trait FrameSource: Send {
    /// The next frame. An error other than `Exhausted` concerns that frame only.
    fn next_frame(&mut self) -> Result<Frame, CaptureError>;
    /// One line for logs: what the source is and how it was set up.
    fn describe(&self) -> String;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Yuyv,
    Mjpeg,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    Dir {
        path: PathBuf,
        #[serde(default = "default_looping")]
        looping: bool,
    },
    Synthetic {
        width: usize,
        height: usize,
    },
    V4l {
        #[serde(default = "default_device")]
        device: String,
        format: PixelFormat,
        width: usize,
        height: usize,
        fps: u32,
        #[serde(default = "default_buffers")]
        buffers: u32,
    },
}

fn default_looping() -> bool {
    true
}

fn default_device() -> String {
    "/dev/video0".into()
}

fn default_buffers() -> u32 {
    4
}

impl SourceConfig {
    /// Checks the values serde cannot: sizes (against the same limits as every image, so a
    /// camera whose frames could never be applied is refused here), frame rate, buffer count.
    pub fn validate(&self, limits: &ImageLimits) -> Result<(), CaptureError> {
        match self {
            SourceConfig::Dir { .. } => Ok(()),
            SourceConfig::Synthetic { width, height } => check_size(*width, *height, limits),
            SourceConfig::V4l {
                format,
                width,
                height,
                fps,
                buffers,
                ..
            } => {
                check_size(*width, *height, limits)?;
                if *format == PixelFormat::Yuyv && !width.is_multiple_of(2) {
                    return Err(CaptureError::Format(format!(
                        "camera source: YUYV needs an even width, got {width}"
                    )));
                }
                if !(1..=240).contains(fps) {
                    return Err(CaptureError::Format(format!(
                        "camera source: fps must be 1 to 240, got {fps}"
                    )));
                }
                if !(1..=32).contains(buffers) {
                    return Err(CaptureError::Format(format!(
                        "camera source: buffers must be 1 to 32, got {buffers}"
                    )));
                }
                Ok(())
            }
        }
    }
}

fn check_size(width: usize, height: usize, limits: &ImageLimits) -> Result<(), CaptureError> {
    limits
        .check(width as u64, height as u64)
        .map_err(|limit| CaptureError::Format(format!("frame size {width}x{height}: {limit}")))
}

/// Opens the source a config names; its frames must be within `limits`.
pub fn open(
    cfg: &SourceConfig,
    limits: &ImageLimits,
) -> Result<Box<dyn FrameSource>, CaptureError> {
    cfg.validate(limits)?;
    match cfg {
        SourceConfig::Dir { path, looping } => {
            Ok(Box::new(DirSource::new(path, *looping, *limits)?))
        }
        SourceConfig::Synthetic { width, height } => {
            Ok(Box::new(SyntheticSource::new(*width, *height, limits)?))
        }
        #[cfg(feature = "v4l")]
        SourceConfig::V4l {
            device,
            format,
            width,
            height,
            fps,
            buffers,
        } => Ok(Box::new(super::v4l2::V4lSource::open(
            device, *format, *width, *height, *fps, *buffers,
        )?)),
        #[cfg(not(feature = "v4l"))]
        SourceConfig::V4l { device, .. } => Err(CaptureError::Device(format!(
            "{device}: this binary was built without the `v4l` feature, so it cannot read V4L2 \
             cameras; rebuild with `--features v4l`"
        ))),
    }
}

/// Replays the PNG and JPEG files of a folder in file-name order. The folder is listed once, when
/// the source is made.
pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next: usize,
    looping: bool,
    limits: ImageLimits,
}

impl DirSource {
    pub fn new(
        dir: impl AsRef<Path>,
        looping: bool,
        limits: ImageLimits,
    ) -> Result<Self, CaptureError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |source| CaptureError::Io {
            path: dir.clone(),
            cause: source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if ImageKind::from_path(&path).is_some() && is_file_or_fifo(&path) {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(CaptureError::Format(format!(
                "{}: no PNG or JPEG files to replay",
                dir.display()
            )));
        }
        files.sort();
        Ok(DirSource {
            dir,
            files,
            next: 0,
            looping,
            limits,
        })
    }

    /// The files replayed, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl FrameSource for DirSource {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        if self.next >= self.files.len() {
            if !self.looping {
                return Err(CaptureError::Exhausted);
            }
            self.next = 0;
        }
        // advance first, so that a bad file is skipped on the next call
        let path = &self.files[self.next];
        self.next += 1;
        read_image(path, &self.limits)
    }

    fn describe(&self) -> String {
        format!(
            "folder {} ({} images, {})",
            self.dir.display(),
            self.files.len(),
            if self.looping { "looping" } else { "once" }
        )
    }
}

/// A named pipe counts: a process that writes each frame into one is a camera too.
fn is_file_or_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() || m.file_type().is_fifo())
}

fn read_image(path: &Path, limits: &ImageLimits) -> Result<Frame, CaptureError> {
    load_image(path, limits).map_err(|e| match e {
        crate::Error::Io { path, cause } => CaptureError::Io { path, cause },
        e => CaptureError::Format(one_line(&e.to_string())),
    })
}

/// A generated test pattern for running the line without a camera: colour bars on top, a
/// gradient that moves a step each frame below them, and the frame counter in binary along the
/// bottom. The same size always gives the same sequence.
pub struct SyntheticSource {
    width: usize,
    height: usize,
    count: u64,
}

impl SyntheticSource {
    /// A `width` x `height` pattern; the size must be within `limits`, as for every frame.
    pub fn new(width: usize, height: usize, limits: &ImageLimits) -> Result<Self, CaptureError> {
        check_size(width, height, limits)?;
        Ok(SyntheticSource {
            width,
            height,
            count: 0,
        })
    }

    fn render(&self, count: u64) -> Frame {
        const BARS: [[f32; 3]; 8] = [
            [0.75, 0.75, 0.75],
            [0.75, 0.75, 0.0],
            [0.0, 0.75, 0.75],
            [0.0, 0.75, 0.0],
            [0.75, 0.0, 0.75],
            [0.75, 0.0, 0.0],
            [0.0, 0.0, 0.75],
            [0.0, 0.0, 0.0],
        ];
        const BITS: usize = 16;
        let (w, h) = (self.width, self.height);
        let n = w * h;
        let bars_end = h * 2 / 3;
        let cell = (w / BITS).clamp(1, (h / 8).max(1));
        let counter_start = h.saturating_sub(cell);
        let shift = (count as usize).wrapping_mul((w / 32).max(1)) % w;
        let mut data = vec![0.0f32; 3 * n];
        for y in 0..h {
            for x in 0..w {
                let rgb = if y >= counter_start && x / cell < BITS {
                    let bit = (count >> (x / cell)) & 1;
                    [bit as f32; 3]
                } else if y < bars_end {
                    BARS[x * BARS.len() / w]
                } else {
                    let t = ((x + shift) % w) as f32 / w as f32;
                    let s = (y - bars_end) as f32 / (h - bars_end) as f32;
                    [t, 1.0 - t, s]
                };
                for (c, v) in rgb.into_iter().enumerate() {
                    data[c * n + y * w + x] = v;
                }
            }
        }
        Frame {
            width: w,
            height: h,
            data,
        }
    }
}

impl FrameSource for SyntheticSource {
    fn next_frame(&mut self) -> Result<Frame, CaptureError> {
        let frame = self.render(self.count);
        self.count = self.count.wrapping_add(1);
        Ok(frame)
    }

    fn describe(&self) -> String {
        format!("synthetic test pattern {}x{}", self.width, self.height)
    }
}
