//! Frames in. For now: image files (PNG/JPEG), checked against size limits before decoding.

pub mod file;

pub use file::{ImageLimits, load_image};
