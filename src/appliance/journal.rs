//! What `takumi run` tells the person reading its log (journald, a terminal): what it is at
//! start-up, then one line per command and per result. Events that are errors or warnings are
//! logged too; acknowledgements only at debug level.

use serde::Deserialize;

use super::protocol::{Event, Level, ResultMeta, ResultState};
use crate::capture::SourceConfig;
use crate::config::{Config, DisplayKind};

/// Start-up lines: version, model, precision, station, broker address, topics, camera, display.
pub fn started(cfg: &Config, model: &str, embedded_port: Option<u16>) {
    tracing::info!(
        version = %env!("CARGO_PKG_VERSION"),
        %model,
        precision = %cfg.engine.precision,
        station = %cfg.station.id,
        "takumi run: station starting"
    );
    match embedded_port {
        Some(port) => tracing::info!(
            addr = %format!("127.0.0.1:{port}"),
            "broker: embedded, listening (config [mqtt] port)"
        ),
        None => tracing::info!(
            addr = %format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port),
            "broker: external (config [mqtt] host, port)"
        ),
    }
    let root = cfg.topic_root();
    tracing::info!(
        cmd = %format!("{root}/cmd"),
        results = %format!("{root}/result/<id>"),
        events = %format!("{root}/event"),
        status = %format!("{root}/status"),
        available = %format!("{root}/available"),
        "topics"
    );
    tracing::info!(source = %describe_camera(&cfg.camera), "camera");
    tracing::info!(output = %describe_display(cfg), "display");
}

fn describe_camera(c: &SourceConfig) -> String {
    match c {
        SourceConfig::Dir { path, looping } => format!(
            "folder {}{}",
            path.display(),
            if *looping { " (looping)" } else { "" }
        ),
        SourceConfig::Synthetic { width, height } => format!("synthetic {width}x{height}"),
        SourceConfig::V4l {
            device,
            format,
            width,
            height,
            fps,
            ..
        } => format!("v4l2 {device} {format:?} {width}x{height} @ {fps} fps"),
    }
}

fn describe_display(cfg: &Config) -> String {
    let d = &cfg.display;
    match d.kind {
        DisplayKind::None => "none".into(),
        DisplayKind::Png => format!("png {} {}x{}", d.path.display(), d.width, d.height),
        DisplayKind::Fb => format!("framebuffer {}", d.path.display()),
    }
}

/// The fields of a command worth a log line; the rest of the payload (images) is skipped.
#[derive(Deserialize, Default)]
struct Head {
    id: Option<String>,
    op: Option<String>,
    template: Option<String>,
    name: Option<String>,
    result: Option<String>,
}

/// One line per received command (status polls at debug level only).
pub fn command(payload: &[u8]) {
    let Ok(h) = serde_json::from_slice::<Head>(payload) else {
        tracing::info!(bytes = payload.len(), "command: not a JSON object");
        return;
    };
    let (id, op) = (h.id.unwrap_or_default(), h.op.unwrap_or_default());
    match (h.template.or(h.name), h.result) {
        _ if op == "status" => tracing::debug!(%id, %op, "command"),
        (Some(t), _) => tracing::info!(%id, %op, template = %t, "command"),
        (None, Some(r)) => tracing::info!(%id, %op, result = %r, "command"),
        (None, None) => tracing::info!(%id, %op, "command"),
    }
}

/// One line per result, and again on each change of its state.
pub fn result(meta: &ResultMeta) {
    tracing::info!(
        id = %meta.id,
        request = %meta.request_id,
        template = %meta.template,
        latency_ms = %format!("{:.1}", meta.latency_ms),
        score = %format!("{:.3}", meta.score),
        state = %state(meta.state),
        "result"
    );
}

fn state(s: ResultState) -> &'static str {
    match s {
        ResultState::Pending => "pending",
        ResultState::NeedsReview => "needs_review",
        ResultState::Approved => "approved",
        ResultState::Rejected => "rejected",
    }
}

/// Errors and warnings the station publishes as events.
pub fn event(e: &Event) {
    let id = e.request_id.as_deref().unwrap_or("-");
    match e.level {
        Level::Error | Level::Warning => {
            tracing::warn!(code = %e.code, request = %id, "event: {}", e.message)
        }
        Level::Info => tracing::debug!(code = %e.code, request = %id, "event: {}", e.message),
    }
}
