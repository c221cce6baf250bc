//! The station's configuration: TOML, checked at start-up. An unknown key or a bad value is an
//! error that names the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::capture::{ImageLimits, SourceConfig};
use crate::engine::Precision;
use crate::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub engine: EngineConfig,
    pub store: StoreConfig,
    pub limits: ImageLimits,
    pub quality: QualityConfig,
    pub station: StationConfig,
    pub camera: SourceConfig,
    pub mqtt: MqttSection,
    pub broker: BrokerConfig,
    pub outbox: OutboxConfig,
    pub display: DisplayConfig,
    pub fleet: crate::appliance::fleet::FleetConfig,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig::Synthetic {
            width: 640,
            height: 480,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StationConfig {
    /// The station's name in topics: `<prefix>/<id>/...`.
    pub id: String,
    pub prefix: String,
    /// Capture and apply every this many ms while armed; 0 = only on a `trigger` command.
    pub capture_interval_ms: u64,
    /// Commands waiting for the pipeline, at most; further ones are refused with an event.
    pub queue: usize,
    pub status_interval_s: u64,
    /// Largest accepted command payload (images travel base64 inside commands).
    pub max_payload_bytes: usize,
    /// systemd watchdog timeout, 1 to 3600 s: told to systemd at start-up, unless systemd set
    /// its own (`WatchdogSec=` in the unit or a drop-in), which wins. The pings stop, and
    /// systemd restarts the service, when the pipeline makes no progress for half of it.
    pub watchdog_s: u64,
}

impl Default for StationConfig {
    fn default() -> Self {
        StationConfig {
            id: "host".into(),
            prefix: "takumi".into(),
            capture_interval_ms: 0,
            queue: 8,
            status_interval_s: 10,
            max_payload_bytes: 6 << 20,
            watchdog_s: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    pub host: String,
    pub port: u16,
    /// Fixed client id (the broker keys the persistent session on it); default `takumi-<station id>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// The password comes from this file or environment variable, never from the TOML.
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    pub tls: Option<crate::publish::mqtt::TlsConfig>,
    pub keep_alive_s: u16,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: None,
            username: None,
            password_file: None,
            password_env: None,
            tls: None,
            keep_alive_s: 30,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Run an embedded MQTT broker (rumqttd) on 127.0.0.1:`mqtt.port` (0 = any free port).
    pub embedded: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    pub dir: PathBuf,
    pub max_entries: usize,
    pub max_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            dir: "takumi-outbox".into(),
            max_entries: 2000,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayKind {
    #[default]
    None,
    Png,
    Fb,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisplayConfig {
    pub kind: DisplayKind,
    /// The PNG file (png) or the framebuffer device (fb).
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            kind: DisplayKind::None,
            path: "takumi-display.png".into(),
            width: 800,
            height: 480,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Folder with model.json and the ONNX files.
    pub models: PathBuf,
    pub precision: Precision,
    /// Threads for the filter bank, slicing and tract's matrix kernels.
    pub threads: usize,
    /// Memory `learn` and `apply` may take, in MB; a frame that would need more is refused up
    /// front (0: no budget). Board profiles keep it under the unit's MemoryMax=.
    pub memory_mb: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            models: "models".into(),
            precision: Precision::Float,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            memory_mb: 0,
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
    /// Results of a template whose validated gain over doing nothing (its card) is under this
    /// many dB are flagged needs_review too; so are templates with no validated gain.
    pub min_validated_gain_db: f32,
}

impl QualityConfig {
    /// Whether a result needs an operator's look: B is unlike the template's source, or the
    /// template (in the direction applied) did not validate well on its own pair.
    pub fn needs_review(&self, score: f32, card: &crate::store::Card, reverse: bool) -> bool {
        let gain = if reverse {
            card.reverse_gain_db
        } else {
            card.validated_gain_db
        };
        score > self.review_threshold || gain.is_none_or(|g| g < self.min_validated_gain_db)
    }
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            review_threshold: 0.5,
            min_validated_gain_db: 0.5,
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
        if !(0.0..=60.0).contains(&self.quality.min_validated_gain_db) {
            return bad("quality.min_validated_gain_db", "must be between 0 and 60");
        }
        let st = &self.station;
        if st.id.is_empty()
            || !st
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("station.id", "must be letters, digits, - or _");
        }
        if st.prefix.is_empty() || st.prefix.contains(['#', '+']) {
            return bad(
                "station.prefix",
                "must be a non-empty topic without wildcards",
            );
        }
        if !(1..=1024).contains(&st.queue) {
            return bad("station.queue", "must be 1 to 1024");
        }
        if st.watchdog_s == 0 || st.status_interval_s == 0 {
            return bad(
                "station",
                "watchdog_s and status_interval_s must be at least 1",
            );
        }
        // systemd takes the timeout as a 32-bit count of microseconds (71 minutes at most)
        if st.watchdog_s > 3600 {
            return bad("station.watchdog_s", "must be at most 3600 (one hour)");
        }
        if self.outbox.max_entries == 0 {
            return bad("outbox.max_entries", "must be at least 1");
        }
        if self.mqtt.password_file.is_some() && self.mqtt.password_env.is_some() {
            return bad(
                "mqtt.password_file",
                "give password_file or password_env, not both",
            );
        }
        self.camera.validate().map_err(|e| Error::Config {
            key: "camera".into(),
            reason: e.to_string(),
        })?;
        let l = &self.limits;
        if l.min_side < 64 || l.max_width < l.min_side || l.max_height < l.min_side {
            return bad("limits", "need 64 <= min_side <= max_width, max_height");
        }
        Ok(())
    }
}

impl Config {
    /// The MQTT password from its file or environment variable, if one is configured.
    pub fn mqtt_password(&self) -> Result<Option<String>> {
        if let Some(p) = &self.mqtt.password_file {
            let s = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            return Ok(Some(s.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(v) = &self.mqtt.password_env {
            return std::env::var(v).map(Some).map_err(|_| Error::Config {
                key: "mqtt.password_env".into(),
                reason: format!("environment variable {v} is not set"),
            });
        }
        Ok(None)
    }

    /// `<prefix>/<station id>`.
    pub fn topic_root(&self) -> String {
        format!("{}/{}", self.station.prefix, self.station.id)
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
