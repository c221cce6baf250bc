//! The station's configuration: TOML, checked at start-up. An unknown key or a bad value is an
//! error that names the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::capture::ImageLimits;
use crate::engine::Precision;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub engine: EngineConfig,
    pub store: StoreConfig,
    pub limits: ImageLimits,
    pub quality: QualityConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Folder with model.json and the ONNX files.
    pub models: PathBuf,
    pub precision: Precision,
    /// Threads for the filter bank, slicing and tract's matrix kernels.
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            models: "models".into(),
            precision: Precision::Float,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dir: "takumi-store".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QualityConfig {
    /// Results whose quality-gate score exceeds this are flagged needs_review (docs/quality.md).
    pub review_threshold: f32,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            review_threshold: 0.35,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config { key, reason } => Error::Config {
                key: format!("{}: {key}", path.display()),
                reason,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::Config {
            key: key_at(text, e.span()),
            reason: e.message().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(Error::Config {
                key: key.into(),
                reason: reason.into(),
            })
        };
        if !(1..=64).contains(&self.engine.threads) {
            return bad("engine.threads", "must be 1 to 64");
        }
        if !(0.0..=1.0).contains(&self.quality.review_threshold) {
            return bad("quality.review_threshold", "must be between 0 and 1");
        }
        let l = &self.limits;
        if l.min_side < 64 || l.max_width < l.min_side || l.max_height < l.min_side {
            return bad("limits", "need 64 <= min_side <= max_width, max_height");
        }
        Ok(())
    }
}

/// The dotted key at a TOML error's position, so the message names it even when serde's does not.
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "(file)".into();
    };
    let upto = &text[..span.start.min(text.len())];
    let table = upto
        .lines()
        .rev()
        .find_map(|l| {
            let t = l.trim();
            (t.starts_with('[') && t.ends_with(']'))
                .then(|| t.trim_matches(|c| c == '[' || c == ']').to_string())
        })
        .unwrap_or_default();
    let line = text[span.start.min(text.len())..]
        .lines()
        .next()
        .unwrap_or("");
    let key = upto
        .rsplit('\n')
        .next()
        .and_then(|l| l.split('=').next())
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .or_else(|| line.split('=').next().map(str::trim))
        .unwrap_or("");
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}
