//! The station's pipeline, independent of the transport: commands in, results/events out. The
//! service (service.rs) feeds it from MQTT on a dedicated thread, because every op here may run
//! seconds of CPU work that must not stall the async runtime.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::copies::{Copies, Keeper};
use super::fleet::{Fleet, FleetError, Signed};
use super::protocol::{
    ApplyMode, Command, Event, Level, Op, ResultMeta, ResultState, TemplateInfo, parse_command,
    request_id,
};
use crate::capture::file::{decode_image, decode_scaled, scale_for_learn};
use crate::capture::{FrameSource, ImageLimits, Scaled};
use crate::config::QualityConfig;
use crate::display::RgbImage8;
use crate::engine::{Engine, LearnOptions};
use crate::frame::Frame;
use crate::publish::file::{ImageKind, encode_on};
use crate::store::{Template, TemplateName, TemplateStore};

/// Results kept for approve/reject (with display-size copies, about 0.5 MB each); older ones can
/// no longer be approved. Bounds the station's memory however many results it makes.
pub const RESULTS_KEPT: usize = 64;

pub enum Outgoing {
    Result {
        meta: ResultMeta,
        jpeg: Vec<u8>,
    },
    /// A result's state changed (approve/reject).
    State {
        meta: ResultMeta,
    },
    Event(Event),
    /// Reply to templates.list.
    Templates {
        request_id: String,
        names: Vec<TemplateInfo>,
    },
    /// A template signed by `templates.publish`, for the fleet topic (retained).
    Fleet {
        name: String,
        file: Vec<u8>,
    },
    /// Publish the status now (the service answers most `status` commands before they are
    /// queued; this is the same publication for one that reaches the station).
    Status,
    /// The latest approved result, for the local display.
    Approved {
        meta: ResultMeta,
        before: RgbImage8,
        after: RgbImage8,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub commands: u64,
    pub captures: u64,
    pub results: u64,
    pub approved: u64,
    pub rejected: u64,
    pub errors: u64,
}

struct Kept {
    meta: ResultMeta,
    copies: Copies,
    /// The generation of its template when it was made: its approval vouches for the fleet
    /// only if the template has not changed since.
    generation: u64,
}

pub struct Station {
    engine: Engine,
    fleet: Fleet,
    store: TemplateStore,
    camera: Box<dyn FrameSource>,
    limits: ImageLimits,
    quality: QualityConfig,
    last_before: Option<Frame>,
    last_after: Option<Frame>,
    armed: Option<(String, String, bool)>, // (template, request id, reverse)
    pending_next: Option<(String, String, bool)>,
    results: VecDeque<Kept>,
    keeper: Keeper,
    seq: u64,
    /// Per template name, the count of `changes` when it last changed (learned, installed,
    /// deleted) in this process; a name not here has not changed since the start.
    generations: HashMap<String, u64>,
    changes: u64,
    pub counters: Counters,
}

fn event(
    level: Level,
    code: &str,
    message: impl Into<String>,
    request_id: Option<&str>,
) -> Outgoing {
    Outgoing::Event(Event {
        level,
        code: code.into(),
        message: message.into(),
        request_id: request_id.map(str::to_string),
        request_ids: Vec::new(),
    })
}

/// A capture as learn works on it: downscaled, like a sent image, when it has more pixels than
/// learn's memory budget holds (a 4K camera).
fn for_learn(f: &Frame) -> Scaled {
    scale_for_learn(f, Engine::learn_max_px(1))
}

/// The event of a fleet payload refused before its template is read.
fn refusal(e: FleetError) -> (&'static str, String) {
    let code = match e {
        FleetError::Unversioned => "unversioned_template",
        FleetError::Malformed(_) => "bad_template",
        _ => "forged_template",
    };
    (code, format!("fleet template refused: {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Station {
    pub fn new(
        engine: Engine,
        store: TemplateStore,
        camera: Box<dyn FrameSource>,
        limits: ImageLimits,
        quality: QualityConfig,
        fleet: Fleet,
    ) -> Self {
        Station {
            engine,
            fleet,
            store,
            camera,
            limits,
            quality,
            last_before: None,
            last_after: None,
            armed: None,
            pending_next: None,
            results: VecDeque::new(),
            keeper: Keeper::start(),
            seq: 0,
            generations: HashMap::new(),
            changes: 0,
            counters: Counters::default(),
        }
    }

    pub fn model_hash(&self) -> &str {
        &self.engine.models.hash
    }

    pub fn armed(&self) -> Option<&str> {
        self.armed.as_ref().map(|a| a.0.as_str())
    }

    /// Whether a capture is wanted now (armed, or an apply waiting for the next capture).
    pub fn wants_capture(&self) -> bool {
        self.armed.is_some() || self.pending_next.is_some()
    }

    /// Handles one command payload from the cmd topic; never panics on any payload.
    pub fn handle(&mut self, payload: &[u8]) -> Vec<Outgoing> {
        self.handle_from(payload, false)
    }

    /// Handles one command payload from the admin topic, which alone takes `templates.publish`.
    pub fn handle_admin(&mut self, payload: &[u8]) -> Vec<Outgoing> {
        self.handle_from(payload, true)
    }

    fn handle_from(&mut self, payload: &[u8], admin: bool) -> Vec<Outgoing> {
        self.counters.commands += 1;
        let cmd = match parse_command(payload) {
            Ok(c) => c,
            Err(e) => {
                self.counters.errors += 1;
                return vec![event(
                    Level::Error,
                    "bad_command",
                    e.to_string(),
                    request_id(payload).as_deref(),
                )];
            }
        };
        let id = cmd.id.clone();
        match self.run(cmd, admin) {
            Ok(out) => out,
            Err((code, msg)) => {
                self.counters.errors += 1;
                vec![event(Level::Error, code, msg, Some(&id))]
            }
        }
    }

    fn capture(&mut self) -> Result<Frame, (&'static str, String)> {
        let f = self
            .camera
            .next_frame()
            .map_err(|e| ("capture_failed", format!("{}: {e}", self.camera.describe())))?;
        self.counters.captures += 1;
        Ok(f)
    }

    fn decode(&self, what: &str, bytes: &[u8]) -> Result<Frame, (&'static str, String)> {
        decode_image(bytes, &self.limits).map_err(|e| ("bad_image", format!("{what}: {e}")))
    }

    fn name(s: &str) -> Result<TemplateName, (&'static str, String)> {
        TemplateName::new(s).map_err(|e| ("bad_name", e.to_string()))
    }

    fn load(&self, name: &str) -> Result<Template, (&'static str, String)> {
        let t = self
            .store
            .load(&Self::name(name)?)
            .map_err(|e| ("unknown_template", e.to_string()))?;
        if t.model_hash != self.engine.models.hash {
            return Err((
                "wrong_model",
                format!(
                    "template {name} was made for model {}, this station runs {}",
                    t.model_hash, self.engine.models.hash
                ),
            ));
        }
        Ok(t)
    }

    /// The pair to learn from: the images sent, or the last captures.
    fn pair(
        &self,
        before_jpeg: Option<Vec<u8>>,
        after_jpeg: Option<Vec<u8>>,
    ) -> Result<(Scaled, Scaled), (&'static str, String)> {
        let (before, after) = match (before_jpeg, after_jpeg) {
            (Some(b), Some(a)) => (
                self.decode_for_learn("before_jpeg_b64", &b)?,
                self.decode_for_learn("after_jpeg_b64", &a)?,
            ),
            (None, None) => match (&self.last_before, &self.last_after) {
                (Some(b), Some(a)) => (for_learn(b), for_learn(a)),
                _ => {
                    return Err((
                        "no_pair",
                        "capture_before and capture_after first, or send both images".into(),
                    ));
                }
            },
            _ => {
                return Err((
                    "bad_command",
                    "send both before_jpeg_b64 and after_jpeg_b64, or neither".into(),
                ));
            }
        };
        let ((bw, bh), (aw, ah)) = (before.original, after.original);
        if (bw, bh) != (aw, ah) {
            return Err((
                "pair_size",
                format!("before is {bw}x{bh} but after is {aw}x{ah}"),
            ));
        }
        Ok((before, after))
    }

    /// A learn input as learn works on it (upright, and downscaled to what the memory budget
    /// holds, as `takumi learn` reads files), with the image's own size.
    fn decode_for_learn(&self, what: &str, bytes: &[u8]) -> Result<Scaled, (&'static str, String)> {
        decode_scaled(bytes, &self.limits, Engine::learn_max_px(1))
            .map_err(|e| ("bad_image", format!("{what}: {e}")))
    }

    fn save(&mut self, t: &Template) -> Result<(), (&'static str, String)> {
        self.store
            .save(t)
            .map_err(|e| ("store_failed", e.to_string()))
    }

    /// Learns and stores a template. It stays on this station: only `templates.publish`, after
    /// an approval, shares it with the fleet.
    fn learn(
        &mut self,
        name: &str,
        before_jpeg: Option<Vec<u8>>,
        after_jpeg: Option<Vec<u8>>,
        id: &str,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let name = Self::name(name)?;
        let (before, after) = self.pair(before_jpeg, after_jpeg)?;
        let pair = (before.frame, after.frame);
        let mut t = Template::learn(&self.engine, name.clone(), &[pair], LearnOptions::default())
            .map_err(|e| ("learn_failed", e.to_string()))?;
        t.sources[0].read_from([before.original.0, before.original.1]);
        self.save(&t)?;
        let mut out = vec![event(
            Level::Info,
            "learned",
            format!(
                "learned {name} at {}: {}",
                t.sources[0].size_text(),
                t.card.validation_summary()
            ),
            Some(id),
        )];
        if t.card.registration.iter().any(|r| !r.registered) {
            out.push(event(
                Level::Warning,
                "unregistered",
                format!("{name}: the after shot does not register onto the before shot (moved too far, or another scene); it was not fitted pixel-wise and its results need review"),
                Some(id),
            ));
        }
        out.extend(self.changed(name.as_str()));
        Ok(out)
    }

    fn generation(&self, name: &str) -> u64 {
        self.generations.get(name).copied().unwrap_or(0)
    }

    /// The template under `name` changed: results made with the old one no longer count as
    /// its approvals. A warning when that cannot be recorded on disk.
    fn changed(&mut self, name: &str) -> Option<Outgoing> {
        self.changes += 1;
        self.generations.insert(name.to_string(), self.changes);
        let e = self.fleet.changed(name).err()?;
        self.counters.errors += 1;
        Some(event(
            Level::Warning,
            "store_failed",
            format!(
                "{name}: the reset of its approvals was not stored ({e}); approve anew before templates.publish"
            ),
            None,
        ))
    }

    /// An approved result counts for `templates.publish` while its template is the one stored.
    fn count_approval(&mut self, template: &str, generation: u64) -> Option<Outgoing> {
        if self.generation(template) != generation {
            return None;
        }
        let e = self.fleet.approved(template).err()?;
        self.counters.errors += 1;
        Some(event(
            Level::Warning,
            "store_failed",
            format!(
                "the approval of a {template} result was not stored for templates.publish: {e}"
            ),
            None,
        ))
    }

    fn check_model(&self, t: &Template) -> Result<(), (&'static str, String)> {
        if t.model_hash == self.engine.models.hash {
            return Ok(());
        }
        Err((
            "wrong_model",
            format!(
                "template {} is for model {}, this station runs {}; not installed",
                t.name, t.model_hash, self.engine.models.hash
            ),
        ))
    }

    /// `templates.install`: a template file on a local-only station; on a fleet station only a
    /// signed payload, under the version rule of the fleet topic.
    fn install_command(
        &mut self,
        payload: &[u8],
        id: &str,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        if self.fleet.enabled() {
            let signed = self.fleet.verify(payload).map_err(refusal)?;
            return self.install_signed(signed, Some(id));
        }
        let t = Template::from_bytes(payload).map_err(|e| ("bad_template", e.to_string()))?;
        self.check_model(&t)?;
        self.save(&t)?;
        let mut out = vec![event(
            Level::Info,
            "installed",
            format!("installed {}", t.name),
            Some(id),
        )];
        out.extend(self.changed(t.name.as_str()));
        Ok(out)
    }

    /// `templates.publish`: the named template, signed as its next fleet version, for the fleet
    /// topic; only from the admin topic, with the signing key, after an approval here.
    fn publish(
        &mut self,
        name: &str,
        admin: bool,
        id: &str,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        if !admin {
            let topic = self.fleet.admin_topic();
            return Err((
                "admin_only",
                format!(
                    "templates.publish is taken only on {topic}, which only the operator's account may write; refused on cmd"
                ),
            ));
        }
        if !self.fleet.can_sign() {
            return Err((
                "no_signing_key",
                format!(
                    "templates.publish {name}: this station holds no fleet signing key ([fleet] enabled with public_key and signing_key_file); nothing published"
                ),
            ));
        }
        let t = self.load(name)?;
        if self.fleet.held(name).approvals == 0 {
            return Err((
                "not_approved",
                format!(
                    "template {name} has no approved result on this station since it was last learned or installed: approve one of its results first"
                ),
            ));
        }
        let file = t.encode().map_err(|e| ("store_failed", e.to_string()))?;
        let (version, signed) = self
            .fleet
            .sign_next(name, &file)
            .map_err(|e| ("store_failed", format!("{name} not published: {e}")))?;
        let signer = self.fleet.signer();
        let message =
            format!("published {name} version {version} to the fleet, signed by {signer}");
        Ok(vec![
            Outgoing::Fleet {
                name: name.to_string(),
                file: signed,
            },
            event(Level::Info, "published", message, Some(id)),
        ])
    }

    fn run(&mut self, cmd: Command, admin: bool) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let id = cmd.id;
        match cmd.op {
            Op::Trigger => {
                if !self.wants_capture() {
                    return Err((
                        "not_armed",
                        "trigger: no template is armed or waiting for a capture".into(),
                    ));
                }
                Ok(self.capture_tick())
            }
            Op::CaptureBefore => {
                self.last_before = Some(self.capture()?);
                Ok(vec![event(
                    Level::Info,
                    "captured",
                    "before captured",
                    Some(&id),
                )])
            }
            Op::CaptureAfter => {
                self.last_after = Some(self.capture()?);
                Ok(vec![event(
                    Level::Info,
                    "captured",
                    "after captured",
                    Some(&id),
                )])
            }
            Op::Learn {
                name,
                before_jpeg,
                after_jpeg,
            } => self.learn(&name, before_jpeg, after_jpeg, &id),
            Op::Apply {
                template,
                mode,
                image,
                reverse,
            } => self.apply(template, mode, image, reverse, id),
            Op::Disarm => {
                self.armed = None;
                self.pending_next = None;
                Ok(vec![event(Level::Info, "disarmed", "disarmed", Some(&id))])
            }
            Op::Approve { result } => self.decide(&result, ResultState::Approved),
            Op::Reject { result } => self.decide(&result, ResultState::Rejected),
            Op::TemplatesList => self.list(id),
            Op::TemplatesDelete { name } => self.delete(&name, &id),
            Op::TemplatesInstall { template } => self.install_command(&template, &id),
            Op::TemplatesPublish { name } => self.publish(&name, admin, &id),
            Op::Status => Ok(vec![Outgoing::Status]),
        }
    }

    /// `apply`: to the image sent, or to the next capture, or to every capture until disarm.
    fn apply(
        &mut self,
        template: String,
        mode: ApplyMode,
        image: Option<Vec<u8>>,
        reverse: bool,
        id: String,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        self.load(&template)?;
        let (code, message) = match mode {
            ApplyMode::Image => {
                let frame = self.decode("image_jpeg_b64", &image.unwrap_or_default())?;
                return self.apply_to(&template, &id, reverse, frame);
            }
            ApplyMode::Next => {
                self.pending_next = Some((template, id.clone(), reverse));
                ("waiting", "applies to the next capture")
            }
            ApplyMode::Armed => {
                self.armed = Some((template, id.clone(), reverse));
                ("armed", "applies to every capture until disarm")
            }
        };
        Ok(vec![event(Level::Info, code, message, Some(&id))])
    }

    /// `templates.list`: every readable template, on the `templates` topic.
    fn list(&self, id: String) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let names = self
            .store
            .list()
            .map_err(|e| ("store_failed", e.to_string()))?
            .into_iter()
            .filter_map(|(n, t)| {
                t.ok().map(|t| TemplateInfo {
                    name: n.to_string(),
                    pairs: t.card.pairs,
                    self_psnr_db: t.card.self_psnr_db,
                    created_unix: t.created_unix,
                })
            })
            .collect();
        Ok(vec![Outgoing::Templates {
            request_id: id,
            names,
        }])
    }

    /// `templates.delete`: disarms it if armed.
    fn delete(&mut self, name: &str, id: &str) -> Result<Vec<Outgoing>, (&'static str, String)> {
        self.store
            .remove(&Self::name(name)?)
            .map_err(|e| ("unknown_template", e.to_string()))?;
        if self.armed.as_ref().is_some_and(|a| a.0 == name) {
            self.armed = None;
        }
        let mut out = vec![event(
            Level::Info,
            "deleted",
            format!("deleted {name}"),
            Some(id),
        )];
        out.extend(self.changed(name));
        Ok(out)
    }

    fn decide(
        &mut self,
        result: &str,
        state: ResultState,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let kept = self
            .results
            .iter_mut()
            .find(|k| k.meta.id == result)
            .ok_or((
                "unknown_result",
                format!(
                    "no result '{}' (or it is too old)",
                    result.chars().take(64).collect::<String>()
                ),
            ))?;
        if matches!(
            kept.meta.state,
            ResultState::Approved | ResultState::Rejected
        ) {
            return Err((
                "already_decided",
                format!("result {result} is already {:?}", kept.meta.state),
            ));
        }
        kept.meta.state = state;
        let meta = kept.meta.clone();
        let generation = kept.generation;
        let mut out = vec![Outgoing::State { meta: meta.clone() }];
        if state == ResultState::Approved {
            self.counters.approved += 1;
            let (before, after) = kept.copies.made();
            out.push(Outgoing::Approved {
                meta: meta.clone(),
                before,
                after,
            });
            out.extend(self.count_approval(&meta.template, generation));
        } else {
            self.counters.rejected += 1;
        }
        Ok(out)
    }

    fn apply_to(
        &mut self,
        template: &str,
        request: &str,
        reverse: bool,
        frame: Frame,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let t = self.load(template)?;
        let t0 = Instant::now();
        let (out, score) = self
            .engine
            .apply_scored(
                t.edit(reverse),
                &frame,
                t.gate_hist(reverse),
                self.engine.threads,
            )
            .map_err(|e| ("apply_failed", e.to_string()))?;
        let jpeg = encode_on(&out, ImageKind::Jpeg, self.engine.threads)
            .map_err(|e| ("encode_failed", e.to_string()))?;
        let latency_ms = t0.elapsed().as_secs_f32() * 1e3;
        self.seq += 1;
        let meta = ResultMeta {
            id: format!("r{}-{}", now_ms(), self.seq),
            request_id: request.into(),
            template: template.into(),
            state: if self.quality.needs_review(score, &t.card, reverse) {
                ResultState::NeedsReview
            } else {
                ResultState::Pending
            },
            score,
            reverse,
            width: out.width as u32,
            height: out.height as u32,
            latency_ms,
            created_unix_ms: now_ms(),
        };
        self.counters.results += 1;
        if self.results.len() >= RESULTS_KEPT {
            self.results.pop_front();
        }
        self.results.push_back(Kept {
            meta: meta.clone(),
            copies: Copies::new(frame, out),
            generation: self.generation(template),
        });
        Ok(vec![Outgoing::Result { meta, jpeg }])
    }

    /// A template from the fleet topic; a refusal is a warning (no request of this station's
    /// brought it).
    pub fn install_fleet(&mut self, payload: &[u8]) -> Vec<Outgoing> {
        let res = self
            .fleet
            .verify(payload)
            .map_err(refusal)
            .and_then(|s| self.install_signed(s, None));
        res.unwrap_or_else(|(code, msg)| {
            self.counters.errors += 1;
            vec![event(Level::Warning, code, msg, None)]
        })
    }

    /// A verified fleet template: installed when it is for this station's model and newer than
    /// the version held for its name. `request`: the `templates.install` that brought it.
    fn install_signed(
        &mut self,
        s: Signed<'_>,
        request: Option<&str>,
    ) -> Result<Vec<Outgoing>, (&'static str, String)> {
        let t = Template::from_bytes(s.file)
            .map_err(|e| ("bad_template", format!("fleet template refused: {e}")))?;
        self.check_model(&t)?;
        let name = t.name.to_string();
        let held = self.fleet.held(&name);
        let from = format!("version {} from {}", s.version, s.signer);
        if s.version == held.version && held.signer.as_deref() == Some(s.signer) {
            // the version held, again: its retained message after a reconnect or a restart
            let again = format!("{name} {from} is already installed");
            return Ok(request
                .map(|id| event(Level::Info, "installed", again, Some(id)))
                .into_iter()
                .collect());
        }
        if s.version <= held.version {
            let by = held
                .signer
                .map(|s| format!(" from {s}"))
                .unwrap_or_default();
            return Err((
                "stale_template",
                format!(
                    "fleet template {name} {from} refused: this station holds version {}{by}, and only a newer version replaces it (an old message replayed?)",
                    held.version
                ),
            ));
        }
        self.save(&t)?;
        let mut out = vec![event(
            Level::Info,
            "installed",
            format!("installed fleet template {name} {from}"),
            request,
        )];
        out.extend(self.installed(&name, held.version, &s, request));
        Ok(out)
    }

    /// After a fleet template is stored: its version recorded, approvals of the old one
    /// forgotten, and an armed template's replacement said.
    fn installed(
        &mut self,
        name: &str,
        old: u64,
        s: &Signed<'_>,
        request: Option<&str>,
    ) -> Vec<Outgoing> {
        let mut out = Vec::new();
        self.changes += 1;
        self.generations.insert(name.to_string(), self.changes);
        if let Err(e) = self.fleet.installed(name, s.version, s.signer) {
            self.counters.errors += 1;
            let message = format!("{name} installed, but its fleet version was not stored: {e}");
            out.push(event(Level::Error, "store_failed", message, request));
        }
        if self.armed() == Some(name) {
            out.push(event(
                Level::Warning,
                "armed_template_replaced",
                format!("armed template {name} replaced: version {old} -> {} from {}; the next capture applies version {}", s.version, s.signer, s.version),
                request,
            ));
        }
        out
    }

    /// Has the approval screen's copies of the newest result made, once it is out: the
    /// pipeline calls this after handing on each job's messages.
    pub fn settle(&mut self) {
        if let Some(k) = self.results.back() {
            self.keeper.settle(&k.copies);
        }
    }

    /// One capture for whoever waits for it (the armed template, or one `apply` of mode next).
    pub fn capture_tick(&mut self) -> Vec<Outgoing> {
        let job = self.pending_next.take().or_else(|| self.armed.clone());
        let Some((template, request, reverse)) = job else {
            return vec![];
        };
        let res = self
            .capture()
            .and_then(|f| self.apply_to(&template, &request, reverse, f));
        match res {
            Ok(o) => o,
            Err((code, msg)) => {
                self.counters.errors += 1;
                vec![event(Level::Error, code, msg, Some(&request))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CaptureError;
    use crate::engine::Precision;

    /// A camera that always sees the same grey scene.
    struct Still;

    impl FrameSource for Still {
        fn next_frame(&mut self) -> Result<Frame, CaptureError> {
            let mut f = Frame::zeros(96, 64);
            f.data.iter_mut().for_each(|v| *v = 0.5);
            Ok(f)
        }
        fn describe(&self) -> String {
            "still".into()
        }
    }

    fn station(store: &std::path::Path) -> Station {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let engine = Engine::load(&models, Precision::Float, 1).unwrap();
        Station::new(
            engine,
            TemplateStore::open(store).unwrap(),
            Box::new(Still),
            ImageLimits::default(),
            QualityConfig::default(),
            Fleet::local_only("s", "t/s/admin"),
        )
    }

    /// Each effect in a word: an event's code, or what else it is.
    fn effects(out: &[Outgoing]) -> Vec<String> {
        let word = |o: &Outgoing| match o {
            Outgoing::Event(e) => e.code.clone(),
            Outgoing::Result { .. } => "result".into(),
            Outgoing::State { .. } => "state".into(),
            Outgoing::Templates { names, .. } => format!("templates {}", names.len()),
            Outgoing::Fleet { .. } => "fleet".into(),
            Outgoing::Status => "status".into(),
            Outgoing::Approved { .. } => "approved".into(),
        };
        out.iter().map(word).collect()
    }

    #[test]
    fn commands_in_effects_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = station(dir.path());
        let mut run = |cmd: &str| effects(&s.handle(cmd.as_bytes()));
        assert_eq!(run(r#"{"id":"s","op":"status"}"#), ["status"]);
        assert_eq!(run(r#"{"id":"t","op":"trigger"}"#), ["not_armed"]);
        assert_eq!(run(r#"{"id":"c","op":"capture_before"}"#), ["captured"]);
        assert_eq!(run(r#"{"id":"l","op":"learn","name":"x"}"#), ["no_pair"]);
        assert_eq!(run(r#"{"id":"L","op":"templates.list"}"#), ["templates 0"]);
        let missing = r#"{"id":"a","op":"apply","template":"nope","mode":"armed"}"#;
        assert_eq!(run(missing), ["unknown_template"]);
        assert_eq!(
            run(r#"{"id":"p","op":"approve","result":"r1"}"#),
            ["unknown_result"]
        );
        assert_eq!(run(r#"{"id":"d","op":"disarm"}"#), ["disarmed"]);
        assert_eq!(run("not json"), ["bad_command"]);
        assert_eq!(s.armed(), None);
        assert!(s.capture_tick().is_empty(), "nothing waits for a capture");
        let c = &s.counters;
        assert_eq!((c.commands, c.captures, c.errors), (9, 1, 5));
    }

    #[test]
    fn publish_is_taken_only_on_admin_and_only_with_the_signing_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = station(dir.path());
        let publish = br#"{"id":"p","op":"templates.publish","name":"polish"}"#;
        let out = s.handle(publish);
        assert_eq!(effects(&out), ["admin_only"]);
        match &out[0] {
            Outgoing::Event(e) => assert!(e.message.contains("t/s/admin"), "{}", e.message),
            _ => unreachable!(),
        }
        assert_eq!(effects(&s.handle_admin(publish)), ["no_signing_key"]);
        // admin takes the other commands too
        let list = br#"{"id":"L","op":"templates.list"}"#;
        assert_eq!(effects(&s.handle_admin(list)), ["templates 0"]);
        assert!(!dir.path().join(super::super::fleet::STATE_FILE).exists());
    }
}
