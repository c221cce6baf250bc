//! Events and replies leave the station through the outbox like results, so that they survive a
//! broker outage. One writer task stores everything the service sends durably, in the order the
//! service emits it (an ack before the results it announces), so that the service loop never
//! waits for an fsync (a flood of refusals would otherwise stall status answers). What cannot be
//! stored is counted, logged and, where possible, said in an event: nothing is dropped without a
//! trace.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::journal;
use super::protocol::{Event, Level, ResultMeta};
use super::station::Counters;
use crate::publish::mqtt::DurablePublisher;

/// Messages waiting for the writer, at most; events beyond it are counted, not kept, so a flood
/// of refused commands costs bounded memory (results wait for room instead).
const QUEUE: usize = 1024;

/// Request ids of refused commands waiting to be said, at most (64 bytes each at most: 6.4 MB).
/// The writer stores events at ~150/s on a slow disk while a flood refuses 10,000 commands/s, so
/// refusals are said in groups: one `overloaded` event lists every id refused since the last.
const REFUSED_IDS: usize = 100_000;

/// Ids listed in one `overloaded` event, at most: 1,000 ids keep it near 70 kB, well inside a
/// line client's packet limit.
const IDS_PER_EVENT: usize = 1000;

/// Work the service refused and messages it could not store, for the status's counters.
#[derive(Debug, Default)]
pub struct Drops {
    /// Commands answered with `overloaded` (outbox full, or the pipeline's queue full).
    pub refused_commands: AtomicU64,
    /// Armed interval captures skipped because the outbox was full.
    pub refused_captures: AtomicU64,
    /// Results made but not stored (the outbox refused them); each also gets an event.
    pub dropped_results: AtomicU64,
    /// Events and replies neither stored nor sent (writer queue or outbox reserve full).
    pub dropped_events: AtomicU64,
}

impl Drops {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DropCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DropCounts {
            refused_commands: get(&self.refused_commands),
            refused_captures: get(&self.refused_captures),
            dropped_results: get(&self.dropped_results),
            dropped_events: get(&self.dropped_events),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    pub refused_commands: u64,
    pub refused_captures: u64,
    pub dropped_results: u64,
    pub dropped_events: u64,
}

/// The status's `counters` object: the pipeline's counters and the service's, side by side.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCounters {
    #[serde(flatten)]
    pub station: Counters,
    #[serde(flatten)]
    pub drops: DropCounts,
}

/// What the writer stores.
enum Item {
    /// An event or a reply; it may use the outbox's reserve.
    Notice { topic: String, payload: Vec<u8> },
    /// A result's messages (image, then metadata), from work already accepted: they may use the
    /// reserve. After a failure the rest is skipped, so no metadata goes out without its image.
    Result {
        meta: ResultMeta,
        parts: Vec<(String, Vec<u8>)>,
    },
    /// Refused commands are waiting in [`Refusals`]: store their grouped events.
    Refusals,
    /// A template for the fleet topic: retained, and within the bounds (new work for others).
    Fleet {
        name: String,
        topic: String,
        file: Vec<u8>,
    },
}

/// The queue in front of the writer task.
pub struct EventQueue {
    tx: mpsc::Sender<Item>,
    event_topic: String,
    drops: Arc<Drops>,
    refusals: Arc<Refusals>,
    writer: JoinHandle<()>,
}

/// Refused commands not yet said, grouped by the reason given, in order of first refusal.
#[derive(Default)]
struct Refusals {
    waiting: Mutex<Vec<(Level, String, Vec<String>)>>,
    /// A [`Item::Refusals`] is in the writer's queue: the ids added meanwhile ride on it.
    queued: AtomicBool,
}

impl Refusals {
    /// Adds one refused command's id; false when the bound is reached (the caller counts it).
    fn add(&self, e: &Event, id: String) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if w.iter().map(|g| g.2.len()).sum::<usize>() >= REFUSED_IDS {
            return false;
        }
        match w.iter_mut().find(|g| g.1 == e.message) {
            Some(g) => g.2.push(id),
            None => w.push((e.level, e.message.clone(), vec![id])),
        }
        true
    }

    /// Everything waiting, as events of at most [`IDS_PER_EVENT`] ids; one id keeps the usual
    /// form (`request_id`), several are listed in `request_ids`.
    fn take(&self) -> Vec<Vec<u8>> {
        self.queued.store(false, Ordering::SeqCst);
        let groups = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        let mut out = Vec::new();
        for (level, message, ids) in groups {
            for chunk in ids.chunks(IDS_PER_EVENT) {
                out.push(grouped(level, &message, chunk));
            }
        }
        out
    }
}

/// The payload of one `overloaded` event for the refused commands `ids`.
fn grouped(level: Level, message: &str, ids: &[String]) -> Vec<u8> {
    let e = match ids {
        [one] => Event {
            level,
            code: "overloaded".into(),
            message: message.into(),
            request_id: Some(one.clone()),
            request_ids: Vec::new(),
        },
        _ => Event {
            level,
            code: "overloaded".into(),
            message: format!("{} commands refused: {message}", ids.len()),
            request_id: None,
            request_ids: ids.to_vec(),
        },
    };
    serde_json::to_vec(&e).unwrap_or_default()
}

impl EventQueue {
    /// Starts the writer on the current runtime.
    pub fn start(publisher: DurablePublisher, event_topic: String, drops: Arc<Drops>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let refusals = Arc::new(Refusals::default());
        let writer = Writer {
            publisher,
            event_topic: event_topic.clone(),
            drops: drops.clone(),
            refusals: refusals.clone(),
        };
        EventQueue {
            tx,
            event_topic,
            drops,
            refusals,
            writer: tokio::spawn(writer.run(rx)),
        }
    }

    pub fn event(&self, e: &Event) {
        if let (true, Some(id)) = (e.code == "overloaded", &e.request_id) {
            return self.refused(e, id.clone());
        }
        match serde_json::to_vec(e) {
            Ok(payload) => self.send(self.event_topic.clone(), payload),
            Err(err) => lost(&self.drops, &err),
        }
    }

    /// A refused command: its id joins the group the writer says next.
    fn refused(&self, e: &Event, id: String) {
        if !self.refusals.add(e, id) {
            return lost(&self.drops, &"too many refused commands waiting to be said");
        }
        // one marker in the queue at a time; if the queue is full, the next refusal retries
        if !self.refusals.queued.swap(true, Ordering::SeqCst)
            && self.tx.try_send(Item::Refusals).is_err()
        {
            self.refusals.queued.store(false, Ordering::SeqCst);
        }
    }

    /// Queues a message for the outbox without waiting.
    pub fn send(&self, topic: String, payload: Vec<u8>) {
        if self.tx.try_send(Item::Notice { topic, payload }).is_err() {
            lost(&self.drops, &"event queue full");
        }
    }

    /// Queues a result (or its new state), waiting for room: results hold the pipeline back
    /// rather than vanish. Its log line is written once it is stored, not before: a result the
    /// log names must survive a crash (tests/faults.rs kills the station at random moments).
    pub async fn result(&self, meta: ResultMeta, parts: Vec<(String, Vec<u8>)>) {
        let item = Item::Result { meta, parts };
        if self.tx.send(item).await.is_err() {
            Drops::count(&self.drops.dropped_results);
        }
    }

    pub async fn fleet(&self, name: String, topic: String, file: Vec<u8>) {
        if self
            .tx
            .send(Item::Fleet { name, topic, file })
            .await
            .is_err()
        {
            lost(&self.drops, &"event writer stopped");
        }
    }

    /// Stops taking messages and waits, at most `within`, until the queued ones are stored: at
    /// shutdown, so they are sent after the next start rather than lost.
    pub async fn flush(self, within: Duration) {
        drop(self.tx);
        let _ = tokio::time::timeout(within, self.writer).await;
    }
}

struct Writer {
    publisher: DurablePublisher,
    event_topic: String,
    drops: Arc<Drops>,
    refusals: Arc<Refusals>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Notice { topic, payload } => self.store_or_send(&topic, payload).await,
                Item::Result { meta, parts } => self.result(meta, parts).await,
                Item::Refusals => self.say_refusals().await,
                Item::Fleet { name, topic, file } => {
                    if let Err(e) = self.publisher.publish(&topic, file, true).await {
                        let msg = format!("fleet template {name}: {e}");
                        self.failed(Level::Warning, msg, None).await;
                    }
                }
            }
            // refusals whose marker found the queue full: said after the item that filled it
            if !self.refusals.queued.load(Ordering::SeqCst) {
                self.say_refusals().await;
            }
        }
        // at shutdown, the refusals not yet said
        self.say_refusals().await;
    }

    /// Stores the grouped events of the commands refused so far.
    async fn say_refusals(&self) {
        for payload in self.refusals.take() {
            self.store_or_send(&self.event_topic, payload).await;
        }
    }

    async fn result(&self, meta: ResultMeta, parts: Vec<(String, Vec<u8>)>) {
        if let Err(e) = self.publisher.publish_reserved_all(parts).await {
            Drops::count(&self.drops.dropped_results);
            let message = format!("result {}: {e}", meta.id);
            self.failed(Level::Error, message, Some(meta.request_id))
                .await;
            return;
        }
        journal::result(&meta);
    }

    /// Stores an event or reply. When the outbox cannot (its disk is full or failing, or the
    /// reserve is full too), it is sent at once without storing, so that a connected line still
    /// hears it: a full disk must not silence the events that say so. Dropped only when that
    /// fails too.
    async fn store_or_send(&self, topic: &str, payload: Vec<u8>) {
        let Err(e) = self
            .publisher
            .publish_reserved(topic, payload.clone())
            .await
        else {
            return;
        };
        match self.publisher.publish_volatile(topic, payload) {
            Ok(()) => {
                tracing::warn!(error = %e, %topic, "event not stored, sent without the outbox")
            }
            Err(_) => lost(&self.drops, &e),
        }
    }

    /// An `outbox_failed` event, stored like any other (the reserve may still have room).
    async fn failed(&self, level: Level, message: String, request_id: Option<String>) {
        tracing::warn!(%message, "outbox_failed");
        let e = Event {
            level,
            code: "outbox_failed".into(),
            message,
            request_id,
            request_ids: Vec::new(),
        };
        let payload = serde_json::to_vec(&e).unwrap_or_default();
        self.store_or_send(&self.event_topic, payload).await;
    }
}

fn lost(drops: &Drops, why: &dyn std::fmt::Display) {
    let n = drops.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
    // at powers of two: a flood of refusals must not become a flood of log lines
    if n.is_power_of_two() {
        tracing::warn!(dropped = n, reason = %why, "event not stored, dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(message: &str) -> Event {
        Event {
            level: Level::Error,
            code: "overloaded".into(),
            message: message.into(),
            request_id: None,
            request_ids: Vec::new(),
        }
    }

    fn parse(payload: &[u8]) -> serde_json::Value {
        serde_json::from_slice(payload).unwrap()
    }

    #[test]
    fn refusals_are_said_in_groups_that_name_every_id() {
        let r = Refusals::default();
        let full = refused("queue full");
        for i in 0..2500 {
            assert!(r.add(&full, format!("c{i}")));
        }
        assert!(r.add(&refused("outbox full"), "x".into()));
        let events: Vec<_> = r.take().iter().map(|p| parse(p)).collect();
        // 2,500 ids in events of 1,000, then the other reason's single id in the usual form
        assert_eq!(events.len(), 4);
        let ids: Vec<&str> = events[..3]
            .iter()
            .flat_map(|e| e["request_ids"].as_array().unwrap())
            .map(|i| i.as_str().unwrap())
            .collect();
        assert_eq!(ids, (0..2500).map(|i| format!("c{i}")).collect::<Vec<_>>());
        assert_eq!(events[0]["message"], "1000 commands refused: queue full");
        assert_eq!(events[2]["message"], "500 commands refused: queue full");
        assert_eq!(events[3]["request_id"], "x");
        assert_eq!(events[3]["message"], "outbox full");
        assert!(events[3].get("request_ids").is_none());
        // parsed as the station's own event type by a line client
        let e: Event = serde_json::from_value(events[3].clone()).unwrap();
        assert_eq!(e.code, "overloaded");
        assert!(r.take().is_empty(), "said twice");
    }

    #[test]
    fn refusals_beyond_the_bound_are_refused_for_counting() {
        let r = Refusals::default();
        let e = refused("queue full");
        for i in 0..REFUSED_IDS {
            assert!(r.add(&e, i.to_string()));
        }
        assert!(!r.add(&e, "one more".into()));
        assert_eq!(r.take().len(), REFUSED_IDS / IDS_PER_EVENT);
        assert!(r.add(&e, "room again".into()));
    }
}
