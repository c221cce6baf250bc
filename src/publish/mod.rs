//! Results out. For now: image files.

pub mod file;
