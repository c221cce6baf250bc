//! The library's typed errors. Each message is one line that names the file and the problem.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // not `source`: the message already holds the cause, and the CLI prints the chain
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a readable PNG or JPEG image ({reason})")]
    BadImage { path: PathBuf, reason: String },
    #[error("{path}: image is {width}x{height}; {limit}")]
    ImageSize {
        path: PathBuf,
        width: u64,
        height: u64,
        limit: String,
    },
    #[error(
        "{after}: after image is {aw}x{ah} but its before image {before} is {bw}x{bh}; a pair must have one size"
    )]
    PairSize {
        before: PathBuf,
        after: PathBuf,
        bw: usize,
        bh: usize,
        aw: usize,
        ah: usize,
    },
    /// Inputs of one `apply` that could not be read, each named in `each`.
    #[error("{failed} of {total} inputs failed, nothing was written: {each}")]
    Inputs {
        failed: usize,
        total: usize,
        each: String,
    },
    #[error("{path}: cannot write output ({reason})")]
    Output { path: PathBuf, reason: String },
    #[error("template {name}: made for model {found}, but this station runs model {expected}")]
    WrongModel {
        name: String,
        expected: String,
        found: String,
    },
    #[error("model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("config {key}: {reason}")]
    Config { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{what} needs about {need_mb} MB, over the budget of {budget_mb} MB ([engine] memory_mb; \
         keep it under the unit's MemoryMax=): send smaller frames, or raise both"
    )]
    Memory {
        what: String,
        need_mb: u64,
        budget_mb: u32,
    },
    /// A template store error (`crate::store::StoreError`), kept whole for `source()`: the
    /// store sits above this module, so it supplies the conversion.
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// The same error naming `path` where a decoder that reads no file says `<bytes>`.
    pub fn at(self, path: &Path) -> Self {
        match self {
            Error::BadImage { reason, .. } => Error::BadImage {
                path: path.into(),
                reason,
            },
            Error::ImageSize {
                width,
                height,
                limit,
                ..
            } => Error::ImageSize {
                path: path.into(),
                width,
                height,
                limit,
            },
            other => other,
        }
    }

    /// A bad value under the config key `key`.
    pub fn config(key: &str, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}
