//! Frames in: image files (checked against size limits before decoding), a folder replayed as a
//! camera, a synthetic test pattern, and V4L2 cameras (feature `v4l`).

pub mod convert;
pub mod file;
pub mod source;
#[cfg(feature = "v4l")]
pub mod v4l2;

pub use convert::{CaptureError, mjpeg_to_frame, yuyv_to_frame};
pub use source::{DirSource, FrameSource, PixelFormat, SourceConfig, SyntheticSource, open};
#[cfg(feature = "v4l")]
pub use v4l2::V4lSource;

pub use file::{
    Depth, Image, ImageKind, ImageLimits, Scaled, load_for_learn, load_image, read_image,
};
