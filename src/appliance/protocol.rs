//! The MQTT protocol's payloads (docs/mqtt.md). Commands are parsed in two steps — the envelope
//! (`id`, `op`), then the op's own fields with unknown fields refused — so that every bad payload
//! gets one precise error tied to its request id when it has one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::events::StatusCounters;
use crate::publish::mqtt::LinkStats;

/// Longest accepted request id; ids are echoed into topics and events.
pub const MAX_ID: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub id: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Apply to the next capture.
    #[default]
    Next,
    /// Apply to every capture until `disarm`.
    Armed,
    /// Apply to the image sent in the command.
    Image,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Capture now for whoever waits (an armed template or an `apply` of mode next).
    Trigger,
    CaptureBefore,
    CaptureAfter,
    /// From the last before/after captures, or from the images sent in the command.
    Learn {
        name: String,
        before_jpeg: Option<Vec<u8>>,
        after_jpeg: Option<Vec<u8>>,
    },
    Apply {
        template: String,
        mode: ApplyMode,
        image: Option<Vec<u8>>,
        reverse: bool,
    },
    Disarm,
    Approve {
        result: String,
    },
    Reject {
        result: String,
    },
    TemplatesList,
    TemplatesDelete {
        name: String,
    },
    /// A template file (the store's format), base64 in JSON.
    TemplatesInstall {
        template: Vec<u8>,
    },
    /// Sign the named template and publish it on the fleet topic; taken only on the admin
    /// topic, and only for a template with an approved result on this station.
    TemplatesPublish {
        name: String,
    },
    Status,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
    #[error("field 'id' must be a string of 1 to {MAX_ID} characters [A-Za-z0-9_.:-]")]
    BadId,
    #[error("field 'op' is missing or not a string")]
    NoOp,
    #[error("unknown op '{0}'")]
    UnknownOp(String),
    #[error("op '{op}': {reason}")]
    BadArgs { op: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnArgs {
    name: String,
    #[serde(default)]
    before_jpeg_b64: Option<String>,
    #[serde(default)]
    after_jpeg_b64: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyArgs {
    template: String,
    #[serde(default)]
    mode: ApplyMode,
    #[serde(default)]
    image_jpeg_b64: Option<String>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultArgs {
    result: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstallArgs {
    template_b64: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
}

/// The request id of a payload, if it has a valid one (for tying an error event to it).
pub fn request_id(payload: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("id")?.as_str()?;
    valid_id(id).then(|| id.to_string())
}

/// Whether a payload is a well-formed `status` command (a valid id, no other field), read
/// without decoding another op's fields: the service answers it before anything is queued.
pub fn is_status_request(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Envelope {
        id: String,
        op: String,
    }
    // a derived struct also reads a JSON array (`["id", "status"]`), which `parse_command`
    // refuses as not an object: only an object may be answered as a status request
    payload.trim_ascii_start().starts_with(b"{")
        && serde_json::from_slice::<Envelope>(payload)
            .is_ok_and(|e| e.op == "status" && valid_id(&e.id))
}

fn b64(op: &str, field: &str, s: &str) -> Result<Vec<u8>, ProtocolError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ProtocolError::BadArgs {
            op: op.into(),
            reason: format!("field '{field}' is not valid base64 ({e})"),
        })
}

pub fn parse_command(payload: &[u8]) -> Result<Command, ProtocolError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| ProtocolError::NotJson(e.to_string()))?;
    let Value::Object(mut map) = v else {
        return Err(ProtocolError::NotJson("not an object".into()));
    };
    let id = match map.remove("id") {
        Some(Value::String(s)) if valid_id(&s) => s,
        _ => return Err(ProtocolError::BadId),
    };
    let op = match map.remove("op") {
        Some(Value::String(s)) => s,
        _ => return Err(ProtocolError::NoOp),
    };
    let rest = Value::Object(map);
    fn args<T: serde::de::DeserializeOwned>(op: &str, v: Value) -> Result<T, ProtocolError> {
        serde_json::from_value(v).map_err(|e| ProtocolError::BadArgs {
            op: op.into(),
            reason: e.to_string(),
        })
    }
    let parsed = match op.as_str() {
        "trigger" | "capture_before" | "capture_after" | "disarm" | "templates.list" | "status" => {
            args::<NoArgs>(&op, rest)?;
            match op.as_str() {
                "trigger" => Op::Trigger,
                "capture_before" => Op::CaptureBefore,
                "capture_after" => Op::CaptureAfter,
                "disarm" => Op::Disarm,
                "templates.list" => Op::TemplatesList,
                _ => Op::Status,
            }
        }
        "learn" => {
            let a: LearnArgs = args(&op, rest)?;
            Op::Learn {
                name: a.name,
                before_jpeg: a
                    .before_jpeg_b64
                    .map(|s| b64(&op, "before_jpeg_b64", &s))
                    .transpose()?,
                after_jpeg: a
                    .after_jpeg_b64
                    .map(|s| b64(&op, "after_jpeg_b64", &s))
                    .transpose()?,
            }
        }
        "apply" => {
            let a: ApplyArgs = args(&op, rest)?;
            let image = a
                .image_jpeg_b64
                .map(|s| b64(&op, "image_jpeg_b64", &s))
                .transpose()?;
            if (a.mode == ApplyMode::Image) != image.is_some() {
                return Err(ProtocolError::BadArgs {
                    op,
                    reason: "mode 'image' needs image_jpeg_b64, and only it takes one".into(),
                });
            }
            Op::Apply {
                template: a.template,
                mode: a.mode,
                image,
                reverse: a.reverse,
            }
        }
        "approve" | "reject" => {
            let a: ResultArgs = args(&op, rest)?;
            if op == "approve" {
                Op::Approve { result: a.result }
            } else {
                Op::Reject { result: a.result }
            }
        }
        "templates.delete" => Op::TemplatesDelete {
            name: args::<NameArgs>(&op, rest)?.name,
        },
        "templates.publish" => Op::TemplatesPublish {
            name: args::<NameArgs>(&op, rest)?.name,
        },
        "templates.install" => Op::TemplatesInstall {
            template: b64(
                &op,
                "template_b64",
                &args::<InstallArgs>(&op, rest)?.template_b64,
            )?,
        },
        _ => return Err(ProtocolError::UnknownOp(op.chars().take(40).collect())),
    };
    Ok(Command { id, op: parsed })
}

/// An event: errors and warnings, tied to the request that caused them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub level: Level,
    /// Stable machine-readable code, e.g. "bad_command", "unknown_template", "overloaded".
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Several requests one event answers: `overloaded` groups the commands refused since the
    /// last one (a flood refuses faster than events can be stored one by one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultState {
    Pending,
    NeedsReview,
    Approved,
    Rejected,
}

/// Metadata of one result; its JPEG goes on `<prefix>/result/<id>/image`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub id: String,
    pub request_id: String,
    pub template: String,
    pub state: ResultState,
    pub score: f32,
    pub reverse: bool,
    pub width: u32,
    pub height: u32,
    /// From the start of the apply until the result's JPEG was ready (apply, score, encode).
    pub latency_ms: f32,
    pub created_unix_ms: u64,
}

/// Whether the station applies to every capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StationState {
    Idle,
    Armed,
}

/// The retained snapshot on `<prefix>/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub state: StationState,
    pub version: String,
    /// The short model hash templates are bound to.
    pub model: String,
    pub precision: String,
    pub uptime_s: u64,
    /// Jobs waiting for the pipeline.
    pub queue_depth: usize,
    /// Outbox entries waiting for their PUBACK.
    pub outbox: usize,
    pub link: LinkStats,
    pub counters: StatusCounters,
}

/// The reply to `templates.list`, on `<prefix>/templates`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesReply {
    pub request_id: String,
    pub templates: Vec<TemplateInfo>,
}

/// One stored template, as `templates.list` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInfo {
    pub name: String,
    pub pairs: u32,
    pub self_psnr_db: f32,
    pub created_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the command_json fuzz target (fuzz/corpus/command_json/status_as_array): the
    /// service answered status to an array that the pipeline refuses as a bad command.
    #[test]
    fn a_status_request_is_an_object_the_pipeline_reads_as_status() {
        for p in [&br#"["ab","status"]"#[..], br#" ["ab", "status"] "#] {
            assert!(!is_status_request(p), "{}", String::from_utf8_lossy(p));
            assert!(parse_command(p).is_err());
        }
        for p in [
            &br#"{"id":"ab","op":"status"}"#[..],
            b" \n{\"op\":\"status\",\"id\":\"ab\"}",
        ] {
            assert!(is_status_request(p), "{}", String::from_utf8_lossy(p));
            assert_eq!(parse_command(p).map(|c| c.op), Ok(Op::Status));
        }
    }
}
