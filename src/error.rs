//! The library's typed errors. Each message is one line that names the file and the problem.

use std::path::PathBuf;

use crate::store::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
