//! `takumi run`: the station as a service. MQTT in and out on the async runtime; the pipeline
//! (capture, learn, apply: seconds of CPU) on its own thread behind a bounded queue; results
//! through the on-disk outbox; approved results on the display; systemd readiness and watchdog.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::events::{Drops, EventQueue, StatusCounters};
use super::fleet::FleetKeys;
use super::journal;
use super::protocol::{Event, Level, request_id};
use super::station::{Outgoing, Station};
use super::watchdog::Watchdog;
use crate::capture;
use crate::config::{Config, DisplayKind};
use crate::display::{Display, DisplayState, FbDisplay, PngDisplay};
use crate::engine::Engine;
use crate::publish::broker::EmbeddedBroker;
use crate::publish::mqtt::{LinkError, MqttConfig, MqttLink, QoS, StatusMessage};
use crate::publish::outbox::Outbox;
use crate::store::TemplateStore;
use crate::{Error, Result};

enum Job {
    Command(Vec<u8>),
    Fleet(Vec<u8>),
    Tick,
}

/// A running service; dropping the stop sender (or calling `stop`) shuts it down.
pub struct Running {
    /// The embedded broker's port, when there is one.
    pub broker_port: Option<u16>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task
            .await
            .map_err(|e| Error::Invalid(format!("service task failed: {e}")))?
    }

    /// Waits until the service ends by itself (an error) or `stop` is called elsewhere.
    pub async fn wait(self) -> Result<()> {
        let Running { stop, task, .. } = self;
        let r = task.await;
        drop(stop);
        r.map_err(|e| Error::Invalid(format!("service task failed: {e}")))?
    }
}

fn link_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("mqtt: {e}"))
}

/// A taken port names the key that moves the embedded broker.
fn broker_err(e: LinkError) -> Error {
    match e {
        LinkError::PortInUse { addr } => Error::Config {
            key: "mqtt.port".into(),
            reason: format!(
                "{addr} is already in use (another MQTT broker, or another takumi?), so the \
                 embedded broker cannot listen there; set [mqtt] port to a free port (0 = any), \
                 or [broker] embedded = false to use the broker already there"
            ),
        },
        e => link_err(e),
    }
}

/// Local time is not known to a board without a clock daemon; UTC is unambiguous on the display.
fn utc_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (s / 86400, s % 86400);
    // civil-from-days (Howard Hinnant's algorithm): avoids a date crate for one label
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub async fn start(cfg: Config) -> Result<Running> {
    let watchdog = Watchdog::resolve(cfg.station.watchdog_s)?;
    let engine = Engine::load(&cfg.engine.models, cfg.engine.precision, cfg.engine.threads)?
        .with_memory_budget(cfg.engine.memory_mb);
    let store = TemplateStore::open(&cfg.store.dir)?;
    let camera = capture::open(&cfg.camera).map_err(|e| Error::Config {
        key: "camera".into(),
        reason: e.to_string(),
    })?;
    let mut display: Option<Box<dyn Display + Send>> = match cfg.display.kind {
        DisplayKind::None => None,
        DisplayKind::Png => Some(Box::new(
            PngDisplay::new(&cfg.display.path, cfg.display.width, cfg.display.height)
                .map_err(|e| Error::Invalid(e.to_string()))?,
        )),
        DisplayKind::Fb => Some(Box::new(
            FbDisplay::open(&cfg.display.path).map_err(|e| Error::Invalid(e.to_string()))?,
        )),
    };
    let broker = if cfg.broker.embedded {
        Some(EmbeddedBroker::start(cfg.mqtt.port).map_err(broker_err)?)
    } else {
        None
    };
    let broker_port = broker.as_ref().map(|b| b.port());
    let root = cfg.topic_root();
    let available = format!("{root}/available");
    let mut mc = MqttConfig::new(
        if broker.is_some() {
            "127.0.0.1".to_string()
        } else {
            cfg.mqtt.host.clone()
        },
        broker_port.unwrap_or(cfg.mqtt.port),
        cfg.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("takumi-{}", cfg.station.id)),
    );
    mc.keep_alive_s = cfg.mqtt.keep_alive_s;
    mc.username = cfg.mqtt.username.clone();
    mc.password = cfg.mqtt_password()?;
    mc.tls = cfg.mqtt.tls.clone();
    mc.max_packet_bytes = cfg.station.max_payload_bytes.max(8 << 20) + 4096;
    mc.will = Some(StatusMessage {
        topic: available.clone(),
        payload: "offline".into(),
        retain: true,
    });
    mc.birth = Some(StatusMessage {
        topic: available.clone(),
        payload: "online".into(),
        retain: true,
    });
    let outbox = Arc::new(
        Outbox::open(
            &cfg.outbox.dir,
            cfg.outbox.max_entries,
            cfg.outbox.max_bytes,
        )
        .map_err(link_err)?,
    );
    let link_limit = mc.max_packet_bytes;
    let (link, mut incoming) = MqttLink::start(mc, outbox.clone()).map_err(link_err)?;
    let cmd_topic = format!("{root}/cmd");
    let fleet_prefix = format!("{}/fleet/template/", cfg.station.prefix);
    link.subscribe(&cmd_topic, QoS::AtLeastOnce)
        .await
        .map_err(link_err)?;
    let fleet = FleetKeys::from_config(&cfg.fleet)?;
    if !fleet.local_only() {
        link.subscribe(&format!("{fleet_prefix}+"), QoS::AtLeastOnce)
            .await
            .map_err(link_err)?;
    }

    let mut station = Station::new(
        engine,
        store,
        camera,
        cfg.limits,
        cfg.quality.clone(),
        fleet,
    );
    let model = station.model_hash().to_string();
    journal::started(&cfg, &model, broker_port);
    let (job_tx, job_rx) = sync_channel::<Job>(cfg.station.queue);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(64);
    let depth = Arc::new(AtomicUsize::new(0));
    let beat = Arc::new(AtomicU64::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let counters = Arc::new(std::sync::Mutex::new(station.counters.clone()));
    {
        let (depth, beat, armed, counters) =
            (depth.clone(), beat.clone(), armed.clone(), counters.clone());
        std::thread::Builder::new()
            .name("takumi-pipeline".into())
            .spawn(move || {
                loop {
                    beat.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    let job = match job_rx.recv_timeout(watchdog.beat_every()) {
                        Ok(j) => j,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(_) => break,
                    };
                    depth.fetch_sub(1, Ordering::Relaxed);
                    if std::env::var_os("TAKUMI_TEST_STALL").is_some() {
                        // test hook: a pipeline that hangs must stop the watchdog pings
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    let out = match job {
                        Job::Command(p) => station.handle(&p),
                        Job::Fleet(p) => station.install_fleet(&p),
                        Job::Tick => station.capture_tick(),
                    };
                    armed.store(station.armed().is_some(), Ordering::Relaxed);
                    if let Ok(mut c) = counters.lock() {
                        *c = station.counters.clone();
                    }
                    for o in out {
                        if out_tx.blocking_send(o).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the pipeline thread: {e}")))?;
    }

    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let cfg2 = cfg.clone();
    let task = tokio::spawn(async move {
        let _broker = broker;
        let cfg = cfg2;
        // counted before sending, so the pipeline's decrement can never run first and wrap
        let submit = |tx: &SyncSender<Job>, job: Job| -> bool {
            depth.fetch_add(1, Ordering::Relaxed);
            match tx.try_send(job) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    false
                }
            }
        };
        // through the outbox like results: an event must survive a broker outage and a full
        // outbox, above all the `overloaded` one that says work was refused
        let drops = Arc::new(Drops::default());
        let events = EventQueue::start(link.publisher(), format!("{root}/event"), drops.clone());
        let publish_event = |e: Event| {
            journal::event(&e);
            events.event(&e);
        };
        let status = |link: &MqttLink| {
            let c = counters.lock().map(|c| c.clone()).unwrap_or_default();
            let s = json!({
                "state": if armed.load(Ordering::Relaxed) { "armed" } else { "idle" },
                "version": env!("CARGO_PKG_VERSION"),
                "model": model,
                "precision": cfg.engine.precision.to_string(),
                "uptime_s": started.elapsed().as_secs(),
                "queue_depth": depth.load(Ordering::Relaxed),
                "outbox": link.outbox().len(),
                "link": link.stats(),
                "counters": StatusCounters { station: c, drops: drops.snapshot() },
            });
            let _ = link.publish_volatile(
                &format!("{root}/status"),
                s.to_string().into_bytes(),
                true,
                QoS::AtLeastOnce,
            );
        };
        let mut shown = DisplayState {
            template: String::new(),
            score: 0.0,
            needs_review: false,
            time: utc_now(),
            connected: false,
            armed: false,
            queue_depth: 0,
            before: None,
            after: None,
        };
        let mut seen_dropped = 0u64;
        let mut ticks_refused = false;
        let mut status_tick =
            tokio::time::interval(Duration::from_secs(cfg.station.status_interval_s));
        let capture_every = Duration::from_millis(cfg.station.capture_interval_ms.max(1));
        let mut capture_tick = tokio::time::interval(capture_every);
        let mut dog = tokio::time::interval(watchdog.ping_every());
        let _ = sd_notify::notify(&watchdog.ready_states());
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                Some(m) = incoming.recv() => {
                    if m.topic == cmd_topic {
                        if m.oversized() || m.size > cfg.station.max_payload_bytes {
                            publish_event(Event { level: Level::Error, code: "bad_command".into(),
                                message: format!("command of {} bytes dropped: over the {} byte limit", m.size, cfg.station.max_payload_bytes),
                                request_id: None });
                            continue;
                        }
                        journal::command(&m.payload);
                        let rid = request_id(&m.payload);
                        // status is answered here, so it stays responsive under a flood of commands
                        if serde_json::from_slice::<serde_json::Value>(&m.payload).ok()
                            .is_some_and(|v| v.get("op").and_then(|o| o.as_str()) == Some("status") && v.as_object().is_some_and(|o| o.len() == 2) && rid.is_some())
                        {
                            status(&link);
                            continue;
                        }
                        if link.outbox().is_full() {
                            Drops::count(&drops.refused_commands);
                            publish_event(Event { level: Level::Error, code: "overloaded".into(),
                                message: "the result outbox is full (broker unreachable?); new work refused".into(), request_id: rid });
                            continue;
                        }
                        if !submit(&job_tx, Job::Command(m.payload)) {
                            Drops::count(&drops.refused_commands);
                            publish_event(Event { level: Level::Error, code: "overloaded".into(),
                                message: format!("{} commands already queued; refused", cfg.station.queue), request_id: rid });
                        }
                    } else if m.topic.starts_with(&fleet_prefix) && m.oversized() {
                        publish_event(Event { level: Level::Warning, code: "bad_template".into(),
                            message: format!("fleet template {} of {} bytes dropped: over the {} byte limit", m.topic, m.size, link_limit),
                            request_id: None });
                    } else if m.topic.starts_with(&fleet_prefix) && !m.payload.is_empty()
                        && !submit(&job_tx, Job::Fleet(m.payload)) {
                        publish_event(Event { level: Level::Warning, code: "overloaded".into(),
                            message: format!("fleet template {} not installed: queue full", m.topic), request_id: None });
                    }
                }
                Some(o) = out_rx.recv() => {
                    match o {
                        Outgoing::Result { meta, jpeg } => {
                            journal::result(&meta);
                            let t = format!("{root}/result/{}", meta.id);
                            // through the writer, in order with the events around it
                            let parts = vec![(format!("{t}/image"), jpeg), (t, serde_json::to_vec(&meta).unwrap_or_default())];
                            events.result(meta.id, meta.request_id, parts).await;
                        }
                        Outgoing::State { meta } => {
                            journal::result(&meta);
                            let t = format!("{root}/result/{}", meta.id);
                            let parts = vec![(t, serde_json::to_vec(&meta).unwrap_or_default())];
                            events.result(meta.id, meta.request_id, parts).await;
                        }
                        Outgoing::Event(e) => publish_event(e),
                        Outgoing::Templates { request_id, names } => {
                            // a reply, queued like events: it outlives an outage too
                            events.send(format!("{root}/templates"),
                                json!({"request_id": request_id, "templates": names}).to_string().into_bytes());
                        }
                        Outgoing::Fleet { name, file } => {
                            events.fleet(name.clone(), format!("{fleet_prefix}{name}"), file).await;
                        }
                        Outgoing::Approved { meta, before, after } => {
                            shown.template = meta.template.clone();
                            shown.score = meta.score;
                            shown.needs_review = false;
                            shown.time = utc_now();
                            shown.before = Some(before);
                            shown.after = Some(after);
                            if let Some(d) = display.as_mut() {
                                shown.connected = link.connected();
                                shown.armed = armed.load(Ordering::Relaxed);
                                shown.queue_depth = depth.load(Ordering::Relaxed);
                                if let Err(e) = d.show(&shown) {
                                    publish_event(Event { level: Level::Warning, code: "display_failed".into(),
                                        message: e.to_string(), request_id: None });
                                }
                            }
                        }
                    }
                }
                _ = status_tick.tick() => {
                    status(&link);
                    if let Some(d) = display.as_mut() {
                        shown.connected = link.connected();
                        shown.armed = armed.load(Ordering::Relaxed);
                        shown.queue_depth = depth.load(Ordering::Relaxed);
                        let _ = d.show(&shown);
                    }
                }
                _ = capture_tick.tick(), if cfg.station.capture_interval_ms > 0 => {
                    if !armed.load(Ordering::Relaxed) || depth.load(Ordering::Relaxed) > 0 {
                        continue;
                    }
                    // the same bound as commands: with the outbox full, captures stop, said once
                    let full = link.outbox().is_full();
                    if full {
                        Drops::count(&drops.refused_captures);
                    }
                    if full && !ticks_refused {
                        publish_event(Event { level: Level::Error, code: "overloaded".into(),
                            message: "the result outbox is full (broker unreachable?); interval captures paused".into(), request_id: None });
                    }
                    ticks_refused = full;
                    if !full && !submit(&job_tx, Job::Tick) {
                        Drops::count(&drops.refused_captures);
                    }
                }
                _ = dog.tick() => {
                    // ping only while the pipeline thread makes progress
                    let last = beat.load(Ordering::Relaxed);
                    let now = started.elapsed().as_millis() as u64;
                    if u128::from(now.saturating_sub(last)) < watchdog.stall_after().as_millis() {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
            // the link drops what this loop cannot read in time: say so, never silently
            let dropped = link.stats().dropped_incoming;
            if dropped > seen_dropped {
                publish_event(Event {
                    level: Level::Error,
                    code: "overloaded".into(),
                    message: format!(
                        "{} incoming messages dropped unread: the station could not keep up",
                        dropped - seen_dropped
                    ),
                    request_id: None,
                });
                seen_dropped = dropped;
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = link.publish_volatile(&available, "offline", true, QoS::AtLeastOnce);
        drop(job_tx);
        // stored now, sent after the next start if not before the disconnect
        events.flush(Duration::from_secs(2)).await;
        link.shutdown().await;
        Ok(())
    });
    Ok(Running {
        broker_port,
        stop: Some(stop_tx),
        task,
    })
}
