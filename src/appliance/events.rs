//! Events and replies leave the station through the outbox like results, so that they survive a
//! broker outage. One writer task stores everything the service sends durably, in the order the
//! service emits it (an ack before the results it announces), so that the service loop never
//! waits for an fsync (a flood of refusals would otherwise stall status answers). What cannot be
//! stored is counted, logged and, where possible, said in an event: nothing is dropped without a
//! trace.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    writer: JoinHandle<()>,
}

impl EventQueue {
    /// Starts the writer on the current runtime.
    pub fn start(publisher: DurablePublisher, event_topic: String, drops: Arc<Drops>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            publisher,
            event_topic: event_topic.clone(),
            drops: drops.clone(),
        };
        EventQueue {
            tx,
            event_topic,
            drops,
            writer: tokio::spawn(writer.run(rx)),
        }
    }

    pub fn event(&self, e: &Event) {
        match serde_json::to_vec(e) {
            Ok(payload) => self.send(self.event_topic.clone(), payload),
            Err(err) => lost(&self.drops, &err),
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
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Item>) {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Notice { topic, payload } => self.store_or_send(&topic, payload).await,
                Item::Result { meta, parts } => self.result(meta, parts).await,
                Item::Fleet { name, topic, file } => {
                    if let Err(e) = self.publisher.publish(&topic, file, true).await {
                        let msg = format!("fleet template {name}: {e}");
                        self.failed(Level::Warning, msg, None).await;
                    }
                }
            }
        }
    }

    async fn result(&self, meta: ResultMeta, parts: Vec<(String, Vec<u8>)>) {
        for (topic, payload) in parts {
            if let Err(e) = self.publisher.publish_reserved(&topic, payload).await {
                Drops::count(&self.drops.dropped_results);
                let message = format!("result {}: {e}", meta.id);
                self.failed(Level::Error, message, Some(meta.request_id))
                    .await;
                return;
            }
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
