//! MQTT link: durable (outbox-backed, QoS 1) and volatile publishes, subscriptions, reconnects.
//!
//! Speaks MQTT 3.1.1 (`rumqttc`'s main protocol path, and the one rumqttd serves fully). What v5
//! would add is covered here otherwise: delivery does not rely on the broker session because
//! every unacked outbox entry is resent after each CONNACK, so no session expiry is requested;
//! a persistent session (`clean_session = false`) is still used so that subscriptions and QoS 1
//! messages for us survive a short disconnect. How long the broker keeps it is broker policy
//! (mosquitto: `persistent_client_expiration`).
//!
//! Delivery bookkeeping: every PUBLISH request handed to rumqttc gets an entry in a FIFO
//! (`Some(seq)` durable, `None` volatile). rumqttc takes requests in order and reports each one
//! as `Outgoing::Publish(pkid)` (or `AwaitAck` on a packet-id collision), which maps pkid to seq;
//! `PubAck(pkid)` then deletes the outbox entry. On any connection error all of that is dropped,
//! along with rumqttc's own retransmission queue, and the outbox is replayed from its oldest
//! entry after the next CONNACK: duplicates are possible, losses are not.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, Request,
    Subscribe, SubscribeFilter, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::outbox::{Message, Outbox};

pub use crate::config::TlsConfig;
pub use rumqttc::QoS;

// Reconnect backoff: doubling from BACKOFF_MIN to BACKOFF_MAX, reset on CONNACK. Kept as these
// two lines rather than a backoff crate: those bring jitter, clocks and retry loops of their own,
// none of which fits a poll loop that must keep driving rumqttc's event loop between tries.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest remaining length MQTT can encode.
const MQTT_MAX_PACKET: usize = 268_435_455;
/// Fixed header (1 + up to 4 length bytes), topic length, packet id.
const PUBLISH_OVERHEAD: usize = 1 + 4 + 2 + 2;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    // not `source`: the message holds the cause, and the CLI prints the chain
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("outbox full ({entries} entries, {bytes} bytes pending); refusing new messages")]
    Full { entries: usize, bytes: u64 },
    #[error("mqtt config {key}: {reason}")]
    Config { key: String, reason: String },
    #[error("mqtt TLS {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("mqtt topic {topic:?}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("mqtt message of {size} bytes exceeds max_packet_bytes {max}")]
    TooLarge { size: usize, max: usize },
    #[error("mqtt link is not connected; volatile message dropped")]
    NotConnected,
    #[error("mqtt request queue is full; volatile message dropped")]
    Busy,
    #[error("mqtt link has stopped")]
    Stopped,
    #[error("embedded mqtt broker: {0}")]
    Broker(String),
    #[error("embedded mqtt broker: {addr} is already in use")]
    PortInUse { addr: std::net::SocketAddr },
}

impl LinkError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        LinkError::Io {
            path: path.into(),
            cause: source,
        }
    }

    fn config(key: &str, reason: impl Into<String>) -> Self {
        LinkError::Config {
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Broker connection settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Fixed: the broker keys the persistent session on it.
    pub client_id: String,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u16,
    /// Largest PUBLISH packet sent or accepted (topic + payload + a few header bytes).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    #[serde(default)]
    pub username: Option<String>,
    /// Resolved by the caller (file or env); never serialized.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Sent by the broker when the link dies without a DISCONNECT (QoS 1).
    #[serde(default)]
    pub will: Option<StatusMessage>,
    /// Published (QoS 1, not stored) after every CONNACK, e.g. "online" to undo the will.
    #[serde(default)]
    pub birth: Option<StatusMessage>,
    /// Durable messages sent but not yet acked, at most.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Capacity of the incoming message channel; further messages are dropped and counted.
    #[serde(default = "default_incoming_capacity")]
    pub incoming_capacity: usize,
    /// With durable messages in flight and no PUBACK for this long, reconnect and resend.
    #[serde(default = "default_ack_timeout_s")]
    pub ack_timeout_s: u64,
}

fn default_port() -> u16 {
    1883
}
fn default_keep_alive_s() -> u16 {
    30
}
fn default_max_packet_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_inflight() -> u16 {
    16
}
fn default_incoming_capacity() -> usize {
    64
}
fn default_ack_timeout_s() -> u64 {
    120
}

impl MqttConfig {
    /// Defaults for everything but the broker address and client id.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        MqttConfig {
            host: host.into(),
            port,
            client_id: client_id.into(),
            keep_alive_s: default_keep_alive_s(),
            max_packet_bytes: default_max_packet_bytes(),
            username: None,
            password: None,
            tls: None,
            will: None,
            birth: None,
            inflight: default_inflight(),
            incoming_capacity: default_incoming_capacity(),
            ack_timeout_s: default_ack_timeout_s(),
        }
    }

    pub fn validate(&self) -> Result<(), LinkError> {
        if self.host.trim().is_empty() {
            return Err(LinkError::config("host", "must not be empty"));
        }
        if self.client_id.is_empty() || self.client_id.len() > 65535 {
            return Err(LinkError::config(
                "client_id",
                "must be set (a persistent session needs a fixed id)",
            ));
        }
        if !(1024..=MQTT_MAX_PACKET).contains(&self.max_packet_bytes) {
            return Err(LinkError::config(
                "max_packet_bytes",
                format!("must be between 1024 and {MQTT_MAX_PACKET}"),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(LinkError::config(
                "password",
                "MQTT 3.1.1 needs a username with a password",
            ));
        }
        if self.inflight == 0 || self.inflight > 1024 {
            return Err(LinkError::config("inflight", "must be between 1 and 1024"));
        }
        if self.incoming_capacity == 0 {
            return Err(LinkError::config("incoming_capacity", "must be at least 1"));
        }
        if self.ack_timeout_s == 0 {
            return Err(LinkError::config("ack_timeout_s", "must be at least 1"));
        }
        for (key, msg) in [("will", &self.will), ("birth", &self.birth)] {
            if let Some(m) = msg {
                check_topic(&m.topic).map_err(|e| LinkError::config(key, e.to_string()))?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("keep_alive_s", &self.keep_alive_s)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("will", &self.will)
            .field("birth", &self.birth)
            .field("inflight", &self.inflight)
            .field("incoming_capacity", &self.incoming_capacity)
            .field("ack_timeout_s", &self.ack_timeout_s)
            .finish()
    }
}

/// A small fixed message: the will, or the birth message that undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusMessage {
    pub topic: String,
    pub payload: String,
    #[serde(default)]
    pub retain: bool,
}

/// A message received on a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    /// Empty when the message was over `max_packet_bytes`: it was dropped, see `size`.
    pub payload: Vec<u8>,
    /// The payload's size as it arrived.
    pub size: usize,
}

impl Incoming {
    pub fn new(topic: String, payload: Vec<u8>) -> Self {
        let size = payload.len();
        Incoming {
            topic,
            payload,
            size,
        }
    }

    /// Whether the link dropped the payload for being over `max_packet_bytes`.
    pub fn oversized(&self) -> bool {
        self.payload.len() < self.size
    }
}

/// Counters since `start`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkStats {
    /// Durable messages written to the broker connection (resends included).
    pub sent: u64,
    /// Durable messages acknowledged by the broker (their outbox entries are then deleted).
    pub acked: u64,
    /// Incoming messages dropped because the consumer was not keeping up.
    pub dropped_incoming: u64,
    /// Incoming messages over `max_packet_bytes`, passed on without their payload.
    pub oversized_incoming: u64,
    /// Successful connections after the first.
    pub reconnects: u64,
    /// Outbox entries dropped unsent because they can never be sent (too large, bad topic).
    pub discarded: u64,
}

/// Handle to a running link. Dropping it stops the link abruptly (the broker then publishes
/// the will); `shutdown` disconnects cleanly. Unacked messages stay in the outbox either way.
pub struct MqttLink {
    client: AsyncClient,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    max_packet_bytes: usize,
    driver: JoinHandle<()>,
    sender: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    track: Mutex<Track>,
    connected: AtomicBool,
    stopping: AtomicBool,
    sent: AtomicU64,
    acked: AtomicU64,
    dropped_incoming: AtomicU64,
    oversized_incoming: AtomicU64,
    reconnects: AtomicU64,
    discarded: AtomicU64,
    /// Wakes the sender: new entry, PUBACK (window space) or CONNACK.
    wake: Notify,
}

#[derive(Default)]
struct Track {
    connected: bool,
    /// Changes on every connect and disconnect; a sender holding an older one must re-check.
    epoch: u64,
    /// Highest seq handed to rumqttc on this connection (0: none yet).
    cursor: u64,
    /// Durable messages handed over on this connection and not yet acked.
    inflight: usize,
    /// One entry per PUBLISH request rumqttc has not reported yet.
    fifo: VecDeque<Option<u64>>,
    /// The request rumqttc parked on a packet-id collision; it is reported when released.
    collided: Option<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
    last_progress: Option<Instant>,
    subscriptions: Vec<(String, QoS)>,
    /// The start's subscriptions go out on the first CONNACK even when the broker kept the
    /// session (as `subscribe` sends them), so a changed set of filters still reaches it.
    subscribe_first: bool,
}

impl Track {
    fn reset_connection(&mut self) {
        self.epoch += 1;
        self.cursor = 0;
        self.inflight = 0;
        self.fifo.clear();
        self.collided = None;
        self.by_pkid.clear();
        self.last_progress = None;
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Says which incoming messages must reach the consumer even while it lags behind a flood (a
/// station's status requests): see [`MqttLink::start_with_urgent`].
pub type Urgent = Box<dyn Fn(&str, &[u8]) -> bool + Send + 'static>;

/// Slots of the incoming channel, beyond `incoming_capacity`, that only urgent messages may
/// take: a flood of others then fills the channel up to them and is dropped (and counted), and
/// an urgent message still gets in.
const URGENT_SLOTS: usize = 8;
/// Only messages up to this size are offered to the urgent check, which may parse them: a
/// status request is a few dozen bytes, and the link's own task must not parse large payloads.
const URGENT_MAX_BYTES: usize = 1024;

/// The sending end of the incoming channel, with the urgent check.
struct Inbox {
    tx: mpsc::Sender<Incoming>,
    urgent: Urgent,
}

impl Inbox {
    /// Passes a message on without waiting for the consumer; false when it had to be dropped.
    fn pass(&self, msg: Incoming) -> bool {
        let urgent =
            msg.payload.len() <= URGENT_MAX_BYTES && (self.urgent)(&msg.topic, &msg.payload);
        let room = if urgent { 1 } else { URGENT_SLOTS + 1 };
        // this task is the only sender, so the room seen here can only grow until the send
        self.tx.capacity() >= room && self.tx.try_send(msg).is_ok()
    }
}

impl MqttLink {
    /// Starts the link on the current tokio runtime. Returns at once; it connects (and
    /// reconnects, with backoff) in the background and sends what the outbox holds.
    pub fn start(
        cfg: MqttConfig,
        outbox: Arc<Outbox>,
    ) -> Result<(MqttLink, mpsc::Receiver<Incoming>), LinkError> {
        Self::start_with_urgent(cfg, outbox, Box::new(|_, _| false))
    }

    /// [`MqttLink::start`], where incoming messages that `urgent` picks (among those up to
    /// 1 KiB) still reach the consumer when it lags so far behind that others are dropped.
    pub fn start_with_urgent(
        cfg: MqttConfig,
        outbox: Arc<Outbox>,
        urgent: Urgent,
    ) -> Result<(MqttLink, mpsc::Receiver<Incoming>), LinkError> {
        Self::start_subscribed(cfg, outbox, urgent, &[])
    }

    /// [`MqttLink::start_with_urgent`], subscribed to `filters` from the first CONNACK on, ahead
    /// of the birth message: a client that sends a command as soon as it sees the birth
    /// ("online") finds the subscription in place. Subscribing after the start raced the birth,
    /// and the broker dropped such a command (no subscriber yet; tests/run_log.rs saw it).
    pub fn start_subscribed(
        cfg: MqttConfig,
        outbox: Arc<Outbox>,
        urgent: Urgent,
        filters: &[(String, QoS)],
    ) -> Result<(MqttLink, mpsc::Receiver<Incoming>), LinkError> {
        cfg.validate()?;
        for (filter, _) in filters {
            check_filter(filter)?;
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| LinkError::config("runtime", "MqttLink::start needs a tokio runtime"))?;
        let options = mqtt_options(&cfg)?;
        let window = cfg.inflight as usize;
        // Room for the durable window plus volatile messages and subscriptions.
        let (client, mut eventloop) = AsyncClient::new(options, window + 64);
        no_delay(&mut eventloop);
        let (tx, rx) = mpsc::channel(cfg.incoming_capacity.saturating_add(URGENT_SLOTS));
        let shared = Arc::new(Shared::default());
        {
            let mut t = shared.lock();
            t.subscriptions = filters.to_vec();
            t.subscribe_first = !filters.is_empty();
        }
        let driver = runtime.spawn(drive(
            eventloop,
            shared.clone(),
            outbox.clone(),
            Inbox { tx, urgent },
            cfg.birth.clone(),
            Duration::from_secs(cfg.ack_timeout_s),
            cfg.max_packet_bytes,
        ));
        let sender = runtime.spawn(send_outbox(
            client.clone(),
            shared.clone(),
            outbox.clone(),
            window,
            cfg.max_packet_bytes,
        ));
        shared.wake.notify_one();
        let link = MqttLink {
            client,
            shared,
            outbox,
            max_packet_bytes: cfg.max_packet_bytes,
            driver,
            sender,
        };
        Ok((link, rx))
    }

    /// Stores the message in the outbox (fsynced) and queues it for sending at QoS 1: it is
    /// sent while its file is written. The entry is deleted when the broker acks it; until then
    /// it is resent after every reconnect and restart. Returns the outbox sequence number.
    pub async fn publish_durable(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<u64, LinkError> {
        self.check_message(topic, payload.len())?;
        let msgs = vec![(topic.to_string(), payload)];
        let seqs = store(&self.outbox, &self.shared, msgs, retain, false).await?;
        seqs.first().copied().ok_or(LinkError::Stopped)
    }

    /// A handle that stores messages in this link's outbox from another task.
    pub fn publisher(&self) -> DurablePublisher {
        DurablePublisher {
            client: self.client.clone(),
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            max_packet_bytes: self.max_packet_bytes,
        }
    }

    /// Sends a status-like message now, without storing it: while disconnected it fails with
    /// `NotConnected`, and a message in flight when the connection drops is lost.
    pub fn publish_volatile(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        qos: QoS,
    ) -> Result<(), LinkError> {
        let payload = payload.into();
        self.check_message(topic, payload.len())?;
        send_volatile(&self.client, &self.shared, topic, payload, retain, qos)
    }

    /// Subscribes now if connected, and again after any reconnect that lost the session.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), LinkError> {
        check_filter(filter)?;
        {
            let mut t = self.shared.lock();
            t.subscriptions.retain(|(f, _)| f != filter);
            t.subscriptions.push((filter.to_string(), qos));
        }
        // Not tracked in the FIFO: only PUBLISH requests are. Queued while disconnected it is
        // sent after the CONNACK (or replaced by the resubscription if the session was lost).
        self.client
            .subscribe(filter, qos)
            .await
            .map_err(|_| LinkError::Stopped)
    }

    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> LinkStats {
        let s = &self.shared;
        LinkStats {
            sent: s.sent.load(Ordering::Relaxed),
            acked: s.acked.load(Ordering::Relaxed),
            dropped_incoming: s.dropped_incoming.load(Ordering::Relaxed),
            oversized_incoming: s.oversized_incoming.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            discarded: s.discarded.load(Ordering::Relaxed),
        }
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Sends DISCONNECT (so the broker drops the will) and stops. Waits at most 2 s.
    pub async fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.driver).await;
        }
    }

    fn check_message(&self, topic: &str, payload_len: usize) -> Result<(), LinkError> {
        check_message(topic, payload_len, self.max_packet_bytes)
    }
}

/// Stores durable messages for a link from a task that does not own it (the service's event
/// writer), so that an fsync there never holds up the task that owns the link.
#[derive(Clone)]
pub struct DurablePublisher {
    client: AsyncClient,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    max_packet_bytes: usize,
}

impl DurablePublisher {
    /// `MqttLink::publish_durable` for events, replies and results of accepted work: not
    /// retained, and it may use the outbox's reserve (`Outbox::push_reserved`), so that it is
    /// stored even when the outbox is full.
    pub async fn publish_reserved(&self, topic: &str, payload: Vec<u8>) -> Result<u64, LinkError> {
        self.store(topic, payload, false, true).await
    }

    /// `publish_reserved` for messages that belong together (a result's image and its
    /// metadata): all are staged and sent before any file is written, so none waits for
    /// another's fsync. The first refused stops the rest, which are not stored.
    pub async fn publish_reserved_all(
        &self,
        msgs: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<u64>, LinkError> {
        self.store_all(msgs, false, true).await
    }

    /// `MqttLink::publish_durable`, within the outbox's bounds.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<u64, LinkError> {
        self.store(topic, payload, retain, false).await
    }

    /// `MqttLink::publish_volatile` at QoS 1, not retained: for an event saying that the outbox
    /// itself failed (a full disk), which could not be stored either, so that a connected line
    /// still hears it.
    pub fn publish_volatile(&self, topic: &str, payload: Vec<u8>) -> Result<(), LinkError> {
        check_message(topic, payload.len(), self.max_packet_bytes)?;
        send_volatile(
            &self.client,
            &self.shared,
            topic,
            payload,
            false,
            QoS::AtLeastOnce,
        )
    }

    async fn store(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
        reserved: bool,
    ) -> Result<u64, LinkError> {
        let seqs = self
            .store_all(vec![(topic.to_string(), payload)], retain, reserved)
            .await?;
        seqs.first().copied().ok_or(LinkError::Stopped)
    }

    async fn store_all(
        &self,
        msgs: Vec<(String, Vec<u8>)>,
        retain: bool,
        reserved: bool,
    ) -> Result<Vec<u64>, LinkError> {
        for (topic, payload) in &msgs {
            check_message(topic, payload.len(), self.max_packet_bytes)?;
        }
        store(&self.outbox, &self.shared, msgs, retain, reserved).await
    }
}

/// Stores messages in the outbox off the async threads, waking the sender as soon as they are
/// readable, before their files are written.
async fn store(
    outbox: &Arc<Outbox>,
    shared: &Arc<Shared>,
    msgs: Vec<(String, Vec<u8>)>,
    retain: bool,
    reserved: bool,
) -> Result<Vec<u64>, LinkError> {
    let (outbox, shared) = (outbox.clone(), shared.clone());
    tokio::task::spawn_blocking(move || {
        let refs: Vec<Message> = msgs
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_slice(), retain))
            .collect();
        outbox.push_all(&refs, reserved, || shared.wake.notify_one())
    })
    .await
    .map_err(|_| LinkError::Stopped)?
}

/// Hands a message to rumqttc without storing it; only while connected, so that it is not
/// queued for a connection that may never come.
fn send_volatile(
    client: &AsyncClient,
    shared: &Shared,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    qos: QoS,
) -> Result<(), LinkError> {
    let mut t = shared.lock();
    if !t.connected {
        return Err(LinkError::NotConnected);
    }
    // every PUBLISH request is tracked in the FIFO; None: no outbox entry behind it
    t.fifo.push_back(None);
    if client.try_publish(topic, qos, retain, payload).is_err() {
        t.fifo.pop_back();
        return Err(LinkError::Busy);
    }
    Ok(())
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        self.driver.abort();
        self.sender.abort();
    }
}

fn check_topic(topic: &str) -> Result<(), LinkError> {
    if topic.is_empty() || topic.len() > 65535 || !rumqttc::valid_topic(topic) {
        return Err(LinkError::Topic {
            topic: topic.to_string(),
            reason: "must be non-empty, without wildcards".to_string(),
        });
    }
    Ok(())
}

fn check_message(topic: &str, payload_len: usize, max: usize) -> Result<(), LinkError> {
    check_topic(topic)?;
    let size = wire_size(topic, payload_len);
    if size > max {
        return Err(LinkError::TooLarge { size, max });
    }
    Ok(())
}

fn wire_size(topic: &str, payload_len: usize) -> usize {
    PUBLISH_OVERHEAD + topic.len() + payload_len
}

fn mqtt_options(cfg: &MqttConfig) -> Result<MqttOptions, LinkError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_s.into()));
    // Persistent session: clean_session=true lost QoS 1 messages across reconnects here.
    o.set_clean_session(false);
    // rumqttc drops the connection on an incoming packet over its limit, and the broker then
    // redelivers it after every reconnect: decode any size MQTT allows, and drop it in `drive`.
    o.set_max_packet_size(MQTT_MAX_PACKET, cfg.max_packet_bytes);
    // rumqttc's packet-id space; larger than our window so ids are rarely near reuse.
    o.set_inflight(cfg.inflight.saturating_mul(2).max(100));
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(w) = &cfg.will {
        o.set_last_will(LastWill::new(
            w.topic.clone(),
            w.payload.clone().into_bytes(),
            QoS::AtLeastOnce,
            w.retain,
        ));
    }
    if let Some(tls) = &cfg.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls_client_config(
            tls,
        )?)));
    }
    Ok(o)
}

/// Built here rather than by rumqttc so the files are checked at start and the crypto
/// provider is explicit (rustls panics when several are compiled in and none is chosen).
fn tls_client_config(tls: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let tls_err = |path: &Path, reason: String| LinkError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let read = |path: &Path| std::fs::read(path).map_err(|e| LinkError::io(path, e));
    let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, LinkError> {
        let pem = read(path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(path, format!("bad PEM: {e}")))?;
        if certs.is_empty() {
            return Err(tls_err(path, "no certificate in file".to_string()));
        }
        Ok(certs)
    };

    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&tls.ca_file)? {
        roots
            .add(cert)
            .map_err(|e| tls_err(&tls.ca_file, format!("unusable CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&tls.ca_file, e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.client_cert_file, &tls.client_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let chain = certs(cert_file)?;
            let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
                .map_err(|e| tls_err(key_file, format!("no usable private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err(cert_file, e.to_string()))?
        }
        _ => {
            return Err(LinkError::config(
                "tls",
                "client_cert_file and client_key_file go together",
            ));
        }
    };
    Ok(Arc::new(config))
}

/// Polls the rumqttc event loop forever: connection state, pkid bookkeeping, acks, incoming.
async fn drive(
    mut el: EventLoop,
    sh: Arc<Shared>,
    outbox: Arc<Outbox>,
    inbox: Inbox,
    birth: Option<StatusMessage>,
    ack_timeout: Duration,
    max_incoming: usize,
) {
    let mut backoff = BACKOFF_MIN;
    let mut ever_connected = false;
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = BACKOFF_MIN;
                if ever_connected {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_connected = true;
                tracing::info!(session_present = ack.session_present, "mqtt: connected");
                on_connack(&mut el, &sh, ack.session_present, birth.as_ref());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = if p.payload.len() > max_incoming {
                    sh.oversized_incoming.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(topic = %p.topic, bytes = p.payload.len(), "mqtt: oversized message dropped");
                    Incoming {
                        topic: p.topic,
                        payload: Vec::new(),
                        size: p.payload.len(),
                    }
                } else {
                    Incoming::new(p.topic, Vec::from(p.payload))
                };
                // Never wait for the consumer: that would stall acks and pings.
                if !inbox.pass(msg) {
                    let n = sh.dropped_incoming.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(dropped = n, "mqtt: consumer too slow, incoming dropped");
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => on_puback(&sh, &outbox, ack.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => on_published(&sh, pkid),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                tracing::warn!(pkid, "mqtt: packet id collision (broker acks out of order)");
                let mut t = sh.lock();
                let kind = t.fifo.pop_front().flatten();
                t.collided = Some(kind);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if sh.stopping.load(Ordering::Relaxed) => {
                sh.connected.store(false, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = sh.connected.load(Ordering::Relaxed);
                drop_connection(&mut el, &sh);
                if was_connected {
                    tracing::warn!(error = %e, "mqtt: connection lost");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "mqtt: cannot connect");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        let stalled = {
            let t = sh.lock();
            t.connected
                && t.inflight > 0
                && t.last_progress.is_some_and(|p| p.elapsed() > ack_timeout)
        };
        if stalled {
            tracing::warn!(
                timeout_s = ack_timeout.as_secs(),
                "mqtt: no PUBACK in time; reconnecting to resend"
            );
            drop_connection(&mut el, &sh);
        }
    }
}

fn check_filter(filter: &str) -> Result<(), LinkError> {
    if filter.is_empty() || !rumqttc::valid_filter(filter) {
        return Err(LinkError::Topic {
            topic: filter.to_string(),
            reason: "not a valid MQTT topic filter".to_string(),
        });
    }
    Ok(())
}

fn on_connack(
    el: &mut EventLoop,
    sh: &Shared,
    session_present: bool,
    birth: Option<&StatusMessage>,
) {
    let mut t = sh.lock();
    t.reset_connection();
    t.connected = true;
    sh.connected.store(true, Ordering::Relaxed);
    // `pending` goes out before anything in the request channel, and nothing was queued there
    // while disconnected, so the FIFO entry below matches the first PUBLISH rumqttc reports.
    let first = std::mem::take(&mut t.subscribe_first);
    if (first || !session_present) && !t.subscriptions.is_empty() {
        let filters = t
            .subscriptions
            .iter()
            .map(|(f, q)| SubscribeFilter::new(f.clone(), *q));
        el.pending
            .push_back(Request::Subscribe(Subscribe::new_many(filters)));
    }
    if let Some(b) = birth {
        let mut p = rumqttc::Publish::new(&b.topic, QoS::AtLeastOnce, b.payload.as_bytes());
        p.retain = b.retain;
        t.fifo.push_back(None);
        el.pending.push_back(Request::Publish(p));
    }
    drop(t);
    sh.wake.notify_one();
}

/// Sends each packet at once: with Nagle's algorithm a small packet (a PUBACK, a short event)
/// waits for the peer's delayed ACK, up to 40 ms on Linux, which was most of trigger -> result.
pub fn no_delay(el: &mut EventLoop) {
    let mut net = el.network_options();
    net.set_tcp_nodelay(true);
    el.set_network_options(net);
}

/// Forgets the connection: our pkid map, and rumqttc's retransmissions (the outbox resends).
fn drop_connection(el: &mut EventLoop, sh: &Shared) {
    let mut t = sh.lock();
    t.reset_connection();
    t.connected = false;
    sh.connected.store(false, Ordering::Relaxed);
    // Under the lock, so no publisher adds to the request channel in between.
    el.clean();
    el.pending.retain(|r| !matches!(r, Request::Publish(_)));
    el.state.collision = None;
    // Buffered Outgoing events would be matched against the next connection's FIFO.
    el.state
        .events
        .retain(|e| matches!(e, Event::Incoming(Packet::Publish(_))));
}

fn on_published(sh: &Shared, pkid: u16) {
    let mut t = sh.lock();
    let kind = match t.collided.take() {
        Some(kind) => kind,
        None => t.fifo.pop_front().unwrap_or_else(|| {
            tracing::error!(pkid, "mqtt: publish not in the bookkeeping");
            None
        }),
    };
    if let Some(seq) = kind
        && pkid != 0
    {
        t.by_pkid.insert(pkid, seq);
        sh.sent.fetch_add(1, Ordering::Relaxed);
    }
}

fn on_puback(sh: &Shared, outbox: &Arc<Outbox>, pkid: u16) {
    let seq = {
        let mut t = sh.lock();
        let seq = t.by_pkid.remove(&pkid);
        if seq.is_some() {
            t.inflight = t.inflight.saturating_sub(1);
            t.last_progress = Some(Instant::now());
        }
        seq
    };
    let Some(seq) = seq else { return };
    sh.acked.fetch_add(1, Ordering::Relaxed);
    sh.wake.notify_one();
    // Off the network task: an unlink can stall on slow storage. Order does not matter.
    let outbox = outbox.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = outbox.ack(seq) {
            tracing::error!(seq, error = %e, "outbox: cannot delete acked entry");
        }
    });
}

/// Hands outbox entries to rumqttc in seq order, at most `window` unacked at a time.
async fn send_outbox(
    client: AsyncClient,
    sh: Arc<Shared>,
    outbox: Arc<Outbox>,
    window: usize,
    max_packet: usize,
) {
    loop {
        sh.wake.notified().await;
        loop {
            let (epoch, cursor) = {
                let t = sh.lock();
                if !t.connected || t.inflight >= window {
                    break;
                }
                (t.epoch, t.cursor)
            };
            let Some(seq) = outbox.next_after(cursor) else {
                break;
            };
            // a message still being written is read from memory, without a blocking thread
            let read = match outbox.staged(seq) {
                Some(entry) => Ok(Ok(Some(entry))),
                None => {
                    let ob = outbox.clone();
                    tokio::task::spawn_blocking(move || ob.read(seq)).await
                }
            };
            let entry = match read {
                Ok(Ok(entry)) => entry,
                Ok(Err(e)) => {
                    tracing::error!(seq, error = %e, "outbox: cannot read entry; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "mqtt: outbox sender stopped");
                    return;
                }
            };
            let Some(entry) = entry else {
                continue; // acked or damaged meanwhile; next_after skips it now
            };
            if let Err(reason) = sendable(&entry.topic, entry.payload.len(), max_packet) {
                tracing::error!(seq, topic = %entry.topic, %reason, "outbox: discarding entry that can never be sent");
                if let Err(e) = outbox.ack(seq) {
                    tracing::error!(seq, error = %e, "outbox: cannot delete entry");
                }
                sh.discarded.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if hand_over(&client, &sh, epoch, entry) == HandOver::ChannelFull {
                // Request channel full of volatile traffic: retry shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum HandOver {
    Done,
    /// Reconnected while reading: the caller starts over from the new cursor.
    Stale,
    ChannelFull,
}

fn hand_over(
    client: &AsyncClient,
    sh: &Shared,
    epoch: u64,
    entry: super::outbox::OutboxEntry,
) -> HandOver {
    let mut t = sh.lock();
    if t.epoch != epoch || !t.connected {
        return HandOver::Stale;
    }
    t.fifo.push_back(Some(entry.seq));
    match client.try_publish(entry.topic, QoS::AtLeastOnce, entry.retain, entry.payload) {
        Ok(()) => {
            t.cursor = entry.seq;
            if t.inflight == 0 {
                t.last_progress = Some(Instant::now());
            }
            t.inflight += 1;
            HandOver::Done
        }
        Err(ClientError::TryRequest(_) | ClientError::Request(_)) => {
            t.fifo.pop_back();
            HandOver::ChannelFull
        }
    }
}

fn sendable(topic: &str, payload_len: usize, max_packet: usize) -> Result<(), String> {
    check_topic(topic).map_err(|e| e.to_string())?;
    let size = wire_size(topic, payload_len);
    if size > max_packet {
        return Err(format!("{size} bytes exceed max_packet_bytes {max_packet}"));
    }
    Ok(())
}
