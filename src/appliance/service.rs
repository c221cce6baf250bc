//! `takumi run`: the station as a service. MQTT in and out on the async runtime; the pipeline
//! (capture, learn, apply: seconds of CPU) on its own thread behind a bounded queue; results
//! through the on-disk outbox; approved results on the display; systemd readiness and watchdog.
//!
//! In four parts: [`Parts`] (engine, store, camera, display, broker, fleet keys), [`connect`]
//! (the MQTT link and its subscriptions), [`Pipeline`] (the station on its thread) and
//! [`Service`] (the loop that carries out the router's decisions, publishes what the pipeline
//! makes and the status, draws the display and pings the watchdog).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::events::{Drops, EventQueue, StatusCounters};
use super::fleet::Fleet;
use super::journal;
use super::protocol::{Event, Level, StationState, Status, TemplatesReply, is_status_request};
use super::router::{Bounds, Job, Refusal, Route, Router};
use super::station::{Counters, Outgoing, Station};
use super::watchdog::Watchdog;
use crate::capture::{self, FrameSource};
use crate::config::{Config, DisplayKind};
use crate::display::{Display, DisplayState, FbDisplay, PngDisplay};
use crate::engine::Engine;
use crate::publish::broker::EmbeddedBroker;
use crate::publish::mqtt::{Incoming, LinkError, MqttConfig, MqttLink, QoS, StatusMessage};
use crate::publish::outbox::Outbox;
use crate::store::TemplateStore;
use crate::{Error, Result};

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
        LinkError::PortInUse { addr } => Error::config(
            "mqtt.port",
            format!(
                "{addr} is already in use (another MQTT broker, or another takumi?), so the \
                 embedded broker cannot listen there; set [mqtt] port to a free port (0 = any), \
                 or [broker] embedded = false to use the broker already there"
            ),
        ),
        e => link_err(e),
    }
}

/// Local time is not known to a board without a clock daemon; UTC is unambiguous on the display.
fn utc_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M:%S UTC")
        .to_string()
}

pub async fn start(cfg: Config) -> Result<Running> {
    let watchdog = Watchdog::resolve(cfg.station.watchdog_s)?;
    let parts = Parts::open(&cfg)?;
    let broker_port = parts.broker.as_ref().map(|b| b.port());
    let (link, incoming) = connect(&cfg, broker_port, !parts.fleet.enabled())?;
    let station = Station::new(
        parts.engine,
        parts.store,
        parts.camera,
        cfg.limits,
        cfg.quality.clone(),
        parts.fleet,
    );
    let model = station.model_hash().to_string();
    journal::started(&cfg, &model, broker_port);
    let (pipeline, results) = Pipeline::spawn(station, cfg.station.queue, watchdog)?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let service = Service::new(cfg, model, link, pipeline, parts.display, parts.broker);
    let task = tokio::spawn(service.run(watchdog, incoming, results, stop_rx));
    Ok(Running {
        broker_port,
        stop: Some(stop_tx),
        task,
    })
}

/// What the station runs on, opened from the config before anything is connected.
struct Parts {
    engine: Engine,
    store: TemplateStore,
    camera: Box<dyn FrameSource>,
    display: Option<Box<dyn Display + Send>>,
    broker: Option<EmbeddedBroker>,
    fleet: Fleet,
}

impl Parts {
    fn open(cfg: &Config) -> Result<Parts> {
        let engine = Engine::load(&cfg.engine.models, cfg.engine.precision, cfg.engine.threads)?
            .with_memory_budget(cfg.engine.memory_mb);
        let store = TemplateStore::open(&cfg.store.dir)?;
        let camera = capture::open(&cfg.camera, &cfg.limits)
            .map_err(|e| Error::config("camera", e.to_string()))?;
        let display = open_display(cfg)?;
        let broker = match cfg.broker.embedded {
            true => Some(EmbeddedBroker::start(cfg.mqtt.port).map_err(broker_err)?),
            false => None,
        };
        let fleet = Fleet::open(cfg)?;
        Ok(Parts {
            engine,
            store,
            camera,
            display,
            broker,
            fleet,
        })
    }
}

fn open_display(cfg: &Config) -> Result<Option<Box<dyn Display + Send>>> {
    let d = &cfg.display;
    let err = |e: crate::display::DisplayError| Error::Invalid(e.to_string());
    Ok(match d.kind {
        DisplayKind::None => None,
        DisplayKind::Png => Some(Box::new(
            PngDisplay::new(&d.path, d.width, d.height).map_err(err)?,
        )),
        DisplayKind::Fb => Some(Box::new(FbDisplay::open(&d.path).map_err(err)?)),
    })
}

/// The link's settings: the embedded broker when there is one, availability as will and birth,
/// and room for the largest command.
fn mqtt_config(cfg: &Config, broker_port: Option<u16>) -> Result<MqttConfig> {
    let host = match broker_port {
        Some(_) => "127.0.0.1".to_string(),
        None => cfg.mqtt.host.clone(),
    };
    let client_id = cfg.mqtt.client_id.clone();
    let mut mc = MqttConfig::new(
        host,
        broker_port.unwrap_or(cfg.mqtt.port),
        client_id.unwrap_or_else(|| format!("takumi-{}", cfg.station.id)),
    );
    mc.keep_alive_s = cfg.mqtt.keep_alive_s;
    mc.username = cfg.mqtt.username.clone();
    mc.password = cfg.mqtt_password()?;
    mc.tls = cfg.mqtt.tls.clone();
    mc.max_packet_bytes = link_limit(cfg);
    let available = |payload: &str| StatusMessage {
        topic: format!("{}/available", cfg.topic_root()),
        payload: payload.into(),
        retain: true,
    };
    mc.will = Some(available("offline"));
    mc.birth = Some(available("online"));
    Ok(mc)
}

/// Starts the link on the outbox and subscribes to the commands (cmd, and admin, which the
/// broker's ACL should let only the operator write), and to the fleet's templates unless the
/// station is local-only. Called within the runtime: the link spawns its tasks on it.
fn connect(
    cfg: &Config,
    broker_port: Option<u16>,
    local_only: bool,
) -> Result<(MqttLink, mpsc::Receiver<Incoming>)> {
    let mc = mqtt_config(cfg, broker_port)?;
    let o = &cfg.outbox;
    let outbox = Outbox::open(&o.dir, o.max_entries, o.max_bytes).map_err(link_err)?;
    let cmd = format!("{}/cmd", cfg.topic_root());
    // status requests pass a flood of other commands, which the link drops when this loop lags
    // behind: status must stay answered (and shows the drops) however far behind it is
    let status_topic = cmd.clone();
    let urgent = Box::new(move |topic: &str, payload: &[u8]| {
        topic == status_topic && is_status_request(payload)
    });
    let mut filters = vec![cmd, cfg.admin_topic()];
    if !local_only {
        filters.push(format!("{}+", fleet_prefix(cfg)));
    }
    // subscribed before the birth ("online") goes out, so a command sent on it is not lost
    let filters: Vec<_> = filters.into_iter().map(|f| (f, QoS::AtLeastOnce)).collect();
    MqttLink::start_subscribed(mc, Arc::new(outbox), urgent, &filters).map_err(link_err)
}

/// The link's packet limit: room for the largest command, and for fleet templates.
fn link_limit(cfg: &Config) -> usize {
    cfg.station.max_payload_bytes.max(8 << 20) + 4096
}

fn fleet_prefix(cfg: &Config) -> String {
    format!("{}/fleet/template/", cfg.station.prefix)
}

/// What the pipeline thread tells the service.
struct Shared {
    /// Jobs queued and not yet taken.
    depth: AtomicUsize,
    /// When the thread last showed progress, in ms since `started`.
    beat: AtomicU64,
    armed: AtomicBool,
    counters: Mutex<Counters>,
    started: Instant,
}

impl Shared {
    fn since_start_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// The station on its own thread, fed through a bounded queue.
struct Pipeline {
    jobs: SyncSender<Job>,
    shared: Arc<Shared>,
}

impl Pipeline {
    fn spawn(
        station: Station,
        queue: usize,
        watchdog: Watchdog,
    ) -> Result<(Pipeline, mpsc::Receiver<Outgoing>)> {
        let (jobs, job_rx) = sync_channel::<Job>(queue);
        let (out_tx, out_rx) = mpsc::channel::<Outgoing>(64);
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            beat: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            counters: Mutex::new(station.counters.clone()),
            started: Instant::now(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("takumi-pipeline".into())
            .spawn(move || work(station, job_rx, out_tx, &s, watchdog.beat_every()))
            .map_err(|e| Error::Invalid(format!("cannot start the pipeline thread: {e}")))?;
        Ok((Pipeline { jobs, shared }, out_rx))
    }

    /// Queues a job; false when the queue is full (or the thread is gone).
    fn submit(&self, job: Job) -> bool {
        // counted before sending, so the pipeline's decrement can never run first and wrap
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        let queued = self.jobs.try_send(job).is_ok();
        if !queued {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
        }
        queued
    }

    fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    fn armed(&self) -> bool {
        self.shared.armed.load(Ordering::Relaxed)
    }
}

/// The pipeline thread: one job at a time, marking progress for the watchdog at least every
/// `beat_every` while idle.
fn work(
    mut station: Station,
    jobs: Receiver<Job>,
    out: mpsc::Sender<Outgoing>,
    shared: &Shared,
    beat_every: Duration,
) {
    loop {
        shared
            .beat
            .store(shared.since_start_ms(), Ordering::Relaxed);
        let job = match jobs.recv_timeout(beat_every) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        shared.depth.fetch_sub(1, Ordering::Relaxed);
        let made = match job {
            Job::Command(p) => station.handle(&p),
            Job::Admin(p) => station.handle_admin(&p),
            Job::Fleet(p) => station.install_fleet(&p),
            Job::Tick => station.capture_tick(),
        };
        shared
            .armed
            .store(station.armed().is_some(), Ordering::Relaxed);
        if let Ok(mut c) = shared.counters.lock() {
            *c = station.counters.clone();
        }
        for o in made {
            if out.blocking_send(o).is_err() {
                return;
            }
        }
        station.settle();
    }
}

/// The service loop's state: the link and everything published through it.
struct Service {
    cfg: Config,
    root: String,
    model: String,
    link: MqttLink,
    /// Events, replies and results, through the outbox like results: an event must survive a
    /// broker outage and a full outbox, above all the `overloaded` one that says work was refused.
    events: EventQueue,
    drops: Arc<Drops>,
    pipeline: Pipeline,
    router: Router,
    display: Option<Box<dyn Display + Send>>,
    shown: DisplayState,
    /// Kept alive as long as the service.
    _broker: Option<EmbeddedBroker>,
}

impl Service {
    fn new(
        cfg: Config,
        model: String,
        link: MqttLink,
        pipeline: Pipeline,
        display: Option<Box<dyn Display + Send>>,
        broker: Option<EmbeddedBroker>,
    ) -> Service {
        let root = cfg.topic_root();
        let drops = Arc::new(Drops::default());
        let events = EventQueue::start(link.publisher(), format!("{root}/event"), drops.clone());
        let router = Router::new(Bounds {
            cmd_topic: format!("{root}/cmd"),
            admin_topic: cfg.admin_topic(),
            fleet_prefix: fleet_prefix(&cfg),
            max_payload_bytes: cfg.station.max_payload_bytes,
            link_limit: link_limit(&cfg),
            queue: cfg.station.queue,
        });
        let shown = DisplayState {
            time: utc_now(),
            ..DisplayState::default()
        };
        Service {
            cfg,
            root,
            model,
            link,
            events,
            drops,
            pipeline,
            router,
            display,
            shown,
            _broker: broker,
        }
    }

    async fn run(
        mut self,
        watchdog: Watchdog,
        mut incoming: mpsc::Receiver<Incoming>,
        mut results: mpsc::Receiver<Outgoing>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<()> {
        let st = &self.cfg.station;
        let mut status_tick = tokio::time::interval(Duration::from_secs(st.status_interval_s));
        let capture_on = st.capture_interval_ms > 0;
        let every = Duration::from_millis(st.capture_interval_ms.max(1));
        let mut capture_tick = tokio::time::interval(every);
        let mut dog = tokio::time::interval(watchdog.ping_every());
        let _ = sd_notify::notify(&watchdog.ready_states());
        loop {
            tokio::select! {
                _ = &mut stop => break,
                Some(m) = incoming.recv() => self.on_message(m),
                Some(o) = results.recv() => self.publish(o).await,
                _ = status_tick.tick() => {
                    self.publish_status();
                    // a failed redraw is said when an approved result cannot be shown
                    let _ = self.redraw();
                }
                _ = capture_tick.tick(), if capture_on => self.on_capture_tick(),
                _ = dog.tick() => self.ping(&watchdog),
            }
            self.report_dropped();
        }
        self.shut_down().await;
        Ok(())
    }

    fn event(&self, e: Event) {
        journal::event(&e);
        self.events.event(&e);
    }

    fn outbox_full(&self) -> bool {
        self.link.outbox().is_full()
    }

    fn on_message(&mut self, m: Incoming) {
        let route = self.router.incoming(m, self.outbox_full());
        self.carry_out(route);
    }

    fn on_capture_tick(&mut self) {
        let (armed, depth) = (self.pipeline.armed(), self.pipeline.depth());
        let route = self.router.capture_tick(armed, depth, self.outbox_full());
        self.carry_out(route);
    }

    fn carry_out(&self, route: Route) {
        let (event, count) = match route {
            Route::Ignore => return,
            Route::Status => return self.publish_status(),
            Route::Submit {
                job,
                if_full,
                count,
            } => match self.pipeline.submit(job) {
                true => return,
                false => (if_full, count),
            },
            Route::Refuse { event, count } => (event, count),
        };
        match count {
            Some(Refusal::Command) => Drops::count(&self.drops.refused_commands),
            Some(Refusal::Capture) => Drops::count(&self.drops.refused_captures),
            None => {}
        }
        if let Some(e) = event {
            self.event(e);
        }
    }

    /// Publishes what the pipeline made.
    async fn publish(&mut self, o: Outgoing) {
        let root = &self.root;
        match o {
            Outgoing::Result { meta, jpeg } => {
                let t = format!("{root}/result/{}", meta.id);
                // through the writer, in order with the events around it
                let json = serde_json::to_vec(&meta).unwrap_or_default();
                let parts = vec![(format!("{t}/image"), jpeg), (t, json)];
                // logged by the writer once stored
                self.events.result(meta, parts).await;
            }
            Outgoing::State { meta } => {
                let t = format!("{root}/result/{}", meta.id);
                let parts = vec![(t, serde_json::to_vec(&meta).unwrap_or_default())];
                self.events.result(meta, parts).await;
            }
            Outgoing::Event(e) => self.event(e),
            Outgoing::Templates { request_id, names } => {
                // a reply, queued like events: it outlives an outage too
                let reply = TemplatesReply {
                    request_id,
                    templates: names,
                };
                let json = serde_json::to_vec(&reply).unwrap_or_default();
                self.events.send(format!("{root}/templates"), json);
            }
            Outgoing::Fleet { name, file } => {
                let topic = format!("{}{name}", self.router.bounds().fleet_prefix);
                self.events.fleet(name, topic, file).await;
            }
            Outgoing::Status => self.publish_status(),
            Outgoing::Approved {
                meta,
                before,
                after,
            } => {
                self.shown = DisplayState {
                    template: meta.template,
                    score: meta.score,
                    needs_review: false,
                    time: utc_now(),
                    before: Some(before),
                    after: Some(after),
                    ..std::mem::take(&mut self.shown)
                };
                if let Err(e) = self.redraw() {
                    let code = "display_failed".into();
                    self.event(Event {
                        level: Level::Warning,
                        code,
                        message: e.to_string(),
                        request_id: None,
                        request_ids: Vec::new(),
                    });
                }
            }
        }
    }

    fn status(&self) -> Status {
        let station = self
            .pipeline
            .shared
            .counters
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        Status {
            state: match self.pipeline.armed() {
                true => StationState::Armed,
                false => StationState::Idle,
            },
            version: env!("CARGO_PKG_VERSION").into(),
            model: self.model.clone(),
            precision: self.cfg.engine.precision.to_string(),
            uptime_s: self.pipeline.shared.started.elapsed().as_secs(),
            queue_depth: self.pipeline.depth(),
            outbox: self.link.outbox().len(),
            link: self.link.stats(),
            counters: StatusCounters {
                station,
                drops: self.drops.snapshot(),
            },
        }
    }

    /// The one way status goes out: retained, and not through the outbox (a snapshot that a
    /// newer one replaces).
    fn publish_status(&self) {
        let json = serde_json::to_vec(&self.status()).unwrap_or_default();
        let topic = format!("{}/status", self.root);
        let _ = self
            .link
            .publish_volatile(&topic, json, true, QoS::AtLeastOnce);
    }

    /// Draws the display with the station's state as it is now.
    fn redraw(&mut self) -> std::result::Result<(), crate::display::DisplayError> {
        let Some(d) = self.display.as_mut() else {
            return Ok(());
        };
        self.shown.connected = self.link.connected();
        self.shown.armed = self.pipeline.armed();
        self.shown.queue_depth = self.pipeline.depth();
        d.show(&self.shown)
    }

    /// Pings only while the pipeline thread makes progress.
    fn ping(&self, watchdog: &Watchdog) {
        let shared = &self.pipeline.shared;
        let last = shared.beat.load(Ordering::Relaxed);
        let idle = shared.since_start_ms().saturating_sub(last);
        if u128::from(idle) < watchdog.stall_after().as_millis() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// The link drops what this loop cannot read in time: say so, never silently.
    fn report_dropped(&mut self) {
        if let Some(e) = self
            .router
            .dropped_incoming(self.link.stats().dropped_incoming)
        {
            self.event(e);
        }
    }

    async fn shut_down(self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let available = format!("{}/available", self.root);
        let _ = self
            .link
            .publish_volatile(&available, "offline", true, QoS::AtLeastOnce);
        drop(self.pipeline);
        // stored now, sent after the next start if not before the disconnect
        self.events.flush(Duration::from_secs(2)).await;
        self.link.shutdown().await;
    }
}
