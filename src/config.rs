//! The station's configuration: TOML, checked at start-up. An unknown key or a bad value is an
//! error that names the key. Each section is checked by the module that owns it; this module
//! sits below the publisher and the appliance, so the sections they read (`[mqtt.tls]`,
//! `[fleet]`) are plain data defined here, and they take it from here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::capture::{ImageLimits, SourceConfig};
use crate::engine::Precision;
pub use crate::engine::quality::QualityConfig;
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
    pub fleet: FleetConfig,
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
    pub tls: Option<TlsConfig>,
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

/// PEM files for a TLS connection (rustls). The broker's name is checked against `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// The `[fleet]` section; the keys themselves are checked by `appliance::fleet` when the
/// station starts, since one of them is read from a file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Take part in the fleet: install signed templates from the fleet topic, and publish them
    /// with `templates.publish` when this station also holds the signing key. Off: local-only.
    pub enabled: bool,
    /// The fleet's ed25519 public key, base64 (32 bytes); required when `enabled`.
    pub public_key: Option<String>,
    /// File holding the fleet's signing key (base64 of the 32-byte seed); only stations that
    /// share their templates need it.
    pub signing_key_file: Option<PathBuf>,
}

/// Longest station id a fleet station may sign with (the signer field of a signed template).
pub const MAX_SIGNER_LEN: usize = 64;

impl FleetConfig {
    /// Keys and `enabled` must agree: a fleet station without the public key would have to
    /// take unsigned templates, and keys on a disabled fleet would be ignored silently.
    /// `station_id` is the signer a signing station names in what it publishes.
    pub fn validate(&self, station_id: &str) -> Result<()> {
        if self.enabled && self.public_key.is_none() {
            return Err(Error::config(
                "fleet.public_key",
                "required with [fleet] enabled = true: without it the station would accept \
                 unsigned templates from anyone who can write the fleet topic",
            ));
        }
        if !self.enabled && (self.public_key.is_some() || self.signing_key_file.is_some()) {
            let key = match self.public_key {
                Some(_) => "fleet.public_key",
                None => "fleet.signing_key_file",
            };
            return Err(Error::config(
                key,
                "set while [fleet] enabled = false: set enabled = true to take part in the \
                 fleet, or remove the keys for a local-only station",
            ));
        }
        if self.signing_key_file.is_some() && station_id.len() > MAX_SIGNER_LEN {
            return Err(Error::config(
                "station.id",
                format!(
                    "at most {MAX_SIGNER_LEN} bytes on a station that signs fleet templates: \
                     they name it as their signer"
                ),
            ));
        }
        Ok(())
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.threads) {
            return Err(Error::config("engine.threads", "must be 1 to 64"));
        }
        Ok(())
    }
}

impl StationConfig {
    fn validate(&self) -> Result<()> {
        let id_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if self.id.is_empty() || !self.id.bytes().all(id_ok) {
            return Err(Error::config(
                "station.id",
                "must be letters, digits, - or _",
            ));
        }
        if self.prefix.is_empty() || self.prefix.contains(['#', '+']) {
            return Err(Error::config(
                "station.prefix",
                "must be a non-empty topic without wildcards",
            ));
        }
        if !(1..=1024).contains(&self.queue) {
            return Err(Error::config("station.queue", "must be 1 to 1024"));
        }
        if self.watchdog_s == 0 || self.status_interval_s == 0 {
            return Err(Error::config(
                "station",
                "watchdog_s and status_interval_s must be at least 1",
            ));
        }
        // systemd takes the timeout as a 32-bit count of microseconds (71 minutes at most)
        if self.watchdog_s > 3600 {
            return Err(Error::config(
                "station.watchdog_s",
                "must be at most 3600 (one hour)",
            ));
        }
        Ok(())
    }
}

impl MqttSection {
    fn validate(&self) -> Result<()> {
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(Error::config(
                "mqtt.password_file",
                "give password_file or password_env, not both",
            ));
        }
        Ok(())
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

    /// Each section by its owner; the camera after the limits, which its frames must meet.
    fn validate(&self) -> Result<()> {
        self.engine.validate()?;
        self.quality.validate()?;
        self.station.validate()?;
        if self.outbox.max_entries == 0 {
            return Err(Error::config("outbox.max_entries", "must be at least 1"));
        }
        self.mqtt.validate()?;
        self.fleet.validate(&self.station.id)?;
        self.limits
            .validate()
            .map_err(|reason| Error::config("limits", reason))?;
        self.camera
            .validate(&self.limits)
            .map_err(|e| Error::config("camera", e.to_string()))
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

    /// `<prefix>/<id>/admin`: commands that only the operator may send (`templates.publish`).
    pub fn admin_topic(&self) -> String {
        format!("{}/admin", self.topic_root())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(text: &str) -> String {
        match Config::parse(text) {
            Err(Error::Config { key, .. }) => key,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn a_camera_below_the_image_limits_fails_the_check() {
        let cam = |w, h| format!("[camera]\nkind = \"synthetic\"\nwidth = {w}\nheight = {h}\n");
        assert_eq!(key_of(&cam(1, 1)), "camera");
        assert_eq!(key_of(&cam(640, 63)), "camera");
        assert!(Config::parse(&cam(64, 64)).is_ok());
        // the limits move the bound for the camera too
        let big = format!("{}[limits]\nmin_side = 128\n", cam(96, 96));
        assert_eq!(key_of(&big), "camera");
    }

    #[test]
    fn each_section_names_its_key() {
        assert_eq!(key_of("[engine]\nthreads = 0"), "engine.threads");
        assert_eq!(
            key_of("[quality]\nreview_threshold = 2.0"),
            "quality.review_threshold"
        );
        assert_eq!(key_of("[station]\nid = \"a b\""), "station.id");
        assert_eq!(key_of("[outbox]\nmax_entries = 0"), "outbox.max_entries");
        assert_eq!(key_of("[limits]\nmin_side = 8"), "limits");
        let both = "[mqtt]\npassword_file = \"p\"\npassword_env = \"P\"";
        assert_eq!(key_of(both), "mqtt.password_file");
    }

    #[test]
    fn a_fleet_station_without_its_key_does_not_start() {
        let reason = |text: &str| match Config::parse(text) {
            Err(Error::Config { key, reason }) => (key, reason),
            other => panic!("{text}: {other:?}"),
        };
        let (key, why) = reason("[fleet]\nenabled = true");
        assert_eq!(key, "fleet.public_key");
        assert!(why.contains("unsigned templates"), "{why}");
        // keys on a disabled fleet: no silent local-only mode
        assert_eq!(key_of("[fleet]\npublic_key = \"AAAA\""), "fleet.public_key");
        assert_eq!(
            key_of("[fleet]\nsigning_key_file = \"k\""),
            "fleet.signing_key_file"
        );
        let signer = format!(
            "[station]\nid = \"{}\"\n[fleet]\nenabled = true\npublic_key = \"A\"\n\
             signing_key_file = \"k\"",
            "a".repeat(65)
        );
        assert_eq!(key_of(&signer), "station.id");
        assert!(Config::parse("[fleet]\nenabled = true\npublic_key = \"AAAA\"").is_ok());
        assert!(Config::parse("[fleet]\nenabled = false").is_ok());
    }
}
