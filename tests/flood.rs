//! A flood of commands against a real `takumi run` (its own process, so that its memory is
//! measured alone) through a real mosquitto with its default limits, as a plant runs it: an
//! armed station receives `trigger` far faster than it can capture and apply. What must hold:
//! status is answered within 1 s throughout, the work beyond the queue is refused with
//! `overloaded` events and counted in status, every command is accounted for, memory stays
//! bounded, and the station works normally afterwards.
//!
//! CI runs a few seconds of it. The full run (10,000 commands/s for 30 s), printing its figures:
//!
//! ```text
//! cargo test --release --test flood -- --ignored --nocapture
//! ```

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const ID: &str = "flood";
/// A status request is answered within this, or the station counts as unresponsive.
const STATUS_WITHIN: Duration = Duration::from_secs(1);
/// Memory the station may gain during a flood.
const RSS_GROWTH_MAX_KB: u64 = 50 * 1024;
/// Messages mosquitto dropped because a client's queue was full (`max_queued_messages`): the
/// station cannot see those, so a count here explains commands it never received.
const BROKER_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// Kills the station when the test ends, however it ends.
struct Station(Child);

impl Drop for Station {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Station {
    fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("no VmRSS in /proc/<pid>/status")
    }
}

/// A station with the defaults a plant gets (queue, outbox bounds), on a small synthetic camera
/// so that each trigger costs a real capture and apply, and no periodic status (every status
/// seen is an answer).
fn station_toml(dir: &Path, port: u16) -> PathBuf {
    let text = format!(
        "[engine]\nmodels = \"{models}\"\nthreads = 1\n\
         [store]\ndir = \"{dir}/store\"\n\
         [station]\nid = \"{ID}\"\nstatus_interval_s = 3600\n\
         [camera]\nkind = \"synthetic\"\nwidth = 320\nheight = 240\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n\
         [outbox]\ndir = \"{dir}/outbox\"\n",
        models = models().display(),
        dir = dir.display()
    );
    let p = dir.join("station.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A client whose incoming publishes go to a channel; its event loop runs on its own task.
/// Connection errors of the test's own clients, for the figures: a client that lost its
/// connection may have missed messages, which would make the counts below wrong.
static CLIENT_ERRORS: AtomicU64 = AtomicU64::new(0);

async fn client(port: u16, name: &str, filters: &[&str]) -> (AsyncClient, Incoming) {
    let mut o = MqttOptions::new(name, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    // subscriptions survive a reconnect
    o.set_clean_session(false);
    let (c, el) = AsyncClient::new(o, 1024);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(pump(el, tx));
    for f in filters {
        c.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
    }
    (c, rx)
}

type Incoming = tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>, Instant)>;

async fn pump(
    mut el: EventLoop,
    tx: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>, Instant)>,
) {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx
                    .send((p.topic, p.payload.to_vec(), Instant::now()))
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("flood: test client: {e}");
                CLIENT_ERRORS.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn cmd(v: Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// Asks for status and returns it with how long it took; None after 10 s.
async fn status(c: &AsyncClient, rx: &mut Incoming) -> Option<(Value, Duration)> {
    while rx.try_recv().is_ok() {} // an answer to an earlier request that timed out
    let t0 = Instant::now();
    let topic = format!("takumi/{ID}/cmd");
    c.publish(
        &topic,
        QoS::AtLeastOnce,
        false,
        cmd(json!({"id": "probe", "op": "status"})),
    )
    .await
    .unwrap();
    let status_topic = format!("takumi/{ID}/status");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (t, p, at) = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if t == status_topic {
            return Some((serde_json::from_slice(&p).unwrap(), at - t0));
        }
    }
}

/// What the independent subscriber saw of the station's events and results.
#[derive(Default)]
struct Seen {
    /// Request ids of `overloaded` events.
    overloaded: HashSet<String>,
    /// `overloaded` events without a request id (messages the link dropped unread).
    overloaded_anonymous: u64,
    /// Results received: an armed template's results carry the arming request's id, whatever
    /// trigger made them, so they are counted rather than matched.
    results: u64,
    /// Every other event, by code.
    other: HashMap<String, u64>,
    /// mosquitto's count of messages it dropped for a client's full queue (`$SYS`).
    broker_dropped: u64,
}

async fn watch(mut rx: Incoming, seen: Arc<Mutex<Seen>>) {
    let event_topic = format!("takumi/{ID}/event");
    while let Some((t, p, _)) = rx.recv().await {
        if t == BROKER_DROPPED {
            let n = String::from_utf8_lossy(&p).trim().parse().unwrap_or(0);
            seen.lock().unwrap().broker_dropped = n;
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&p) else {
            continue;
        };
        let mut s = seen.lock().unwrap();
        if t == event_topic {
            let code = v["code"].as_str().unwrap_or_default().to_string();
            // refusals come one id per event, or grouped in `request_ids`
            let ids = v["request_ids"].as_array().cloned().unwrap_or_default();
            match (code.as_str(), v["request_id"].as_str()) {
                ("overloaded", Some(id)) => {
                    s.overloaded.insert(id.to_string());
                }
                ("overloaded", None) if !ids.is_empty() => {
                    let ids = ids.iter().filter_map(|i| i.as_str()).map(String::from);
                    s.overloaded.extend(ids);
                }
                ("overloaded", None) => s.overloaded_anonymous += 1,
                // the set-up's own events (arming) are not the flood's
                (_, Some(id)) if !id.starts_with('f') => {}
                _ => *s.other.entry(code).or_default() += 1,
            }
        } else if v["request_id"] == "arm" {
            s.results += 1;
        }
    }
}

/// The figures of one flood.
#[derive(Debug)]
struct Figures {
    sent: u64,
    flood_s: f64,
    /// Status round trips during the flood.
    status: Vec<Duration>,
    /// Status requests with no answer within 10 s.
    unanswered: u64,
    /// Deltas of the status counters over the flood (and its drain).
    handled: u64,
    refused: u64,
    dropped_incoming: u64,
    dropped_events: u64,
    /// What the subscriber received for the flood's requests.
    overloaded_events: u64,
    overloaded_anonymous: u64,
    results: u64,
    other_events: HashMap<String, u64>,
    rss_before_kb: u64,
    rss_max_kb: u64,
    rss_after_kb: u64,
    /// Results the station made, results it could not store, commands that failed (counters).
    results_made: u64,
    dropped_results: u64,
    errors: u64,
    /// Messages mosquitto dropped during the flood (to any client).
    broker_dropped: u64,
    /// Connection errors of the test's clients (their counts may be short then).
    client_errors: u64,
    /// How long a trigger sent after the flood took to give its result.
    result_after: Option<Duration>,
}

fn counter(s: &Value, key: &str) -> u64 {
    s["counters"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no counters.{key}: {s}"))
}

/// `rate` trigger commands a second for `secs` seconds against an armed station; None when
/// mosquitto is not installed (outside CI).
fn flood(rate: u64, secs: u64) -> Option<Figures> {
    // mosquitto's default limits; $SYS every second, for its drop count
    let broker = mosquitto_with("sys_interval 1\n")?;
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    learn_sample(&store, "polish");
    let cfg = station_toml(dir.path(), port);
    let log = File::create(dir.path().join("station.log")).unwrap();
    let station = Station(
        takumi(&store)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let figures = rt.block_on(async {
        let cmd_topic = format!("takumi/{ID}/cmd");
        let (probe, mut probe_rx) = client(
            port,
            "flood-probe",
            &[
                &format!("takumi/{ID}/status"),
                &format!("takumi/{ID}/available"),
            ],
        )
        .await;
        let online = format!("takumi/{ID}/available");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (t, p, _) = tokio::time::timeout_at(deadline, probe_rx.recv())
                .await
                .expect("the station did not come online")
                .unwrap();
            if t == online && p == b"online" {
                break;
            }
        }
        let (watcher, watcher_rx) = client(
            port,
            "flood-watch",
            &[
                &format!("takumi/{ID}/event"),
                &format!("takumi/{ID}/result/+"),
                BROKER_DROPPED,
            ],
        )
        .await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(watch(watcher_rx, seen.clone()));
        probe
            .publish(
                &cmd_topic,
                QoS::AtLeastOnce,
                false,
                cmd(json!({"id": "arm", "op": "apply", "template": "polish", "mode": "armed"})),
            )
            .await
            .unwrap();
        loop {
            let (s, _) = status(&probe, &mut probe_rx).await.expect("no status");
            if s["state"] == "armed" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // one trigger first: the memory the engine takes for its first apply is the station's
        // working set, not growth caused by the flood
        probe
            .publish(
                &cmd_topic,
                QoS::AtLeastOnce,
                false,
                cmd(json!({"id": "warm", "op": "trigger"})),
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().results == 0 {
            assert!(
                Instant::now() < deadline,
                "no result for the warm-up trigger"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (before, _) = status(&probe, &mut probe_rx).await.expect("no status");
        let rss_before_kb = station.rss_kb();
        let (results_before, broker_dropped_before) = {
            let s = seen.lock().unwrap();
            (s.results, s.broker_dropped)
        };

        // the flood, on its own connection, paced in 10 ms slices
        let (flooder, _flood_rx) = client(port, "flood-line", &[]).await;
        let per_slice = rate.div_ceil(100);
        let slices = secs * 100;
        let sender = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut sent = 0u64;
            for _ in 0..slices {
                tick.tick().await;
                for _ in 0..per_slice {
                    let payload = cmd(json!({"id": format!("f{sent}"), "op": "trigger"}));
                    flooder
                        .publish(&cmd_topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                    sent += 1;
                }
            }
            (sent, t0.elapsed().as_secs_f64(), flooder)
        });
        let mut latencies = Vec::new();
        let mut unanswered = 0;
        let mut rss_max_kb = rss_before_kb;
        while !sender.is_finished() {
            match status(&probe, &mut probe_rx).await {
                Some((_, took)) => latencies.push(took),
                None => unanswered += 1,
            }
            rss_max_kb = rss_max_kb.max(station.rss_kb());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (sent, flood_s, _flooder) = sender.await.unwrap();

        // drained: nothing queued, nothing waiting in the outbox, and the counters still (the
        // last commands may still have been on their way through the broker)
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last = Value::Null;
        let after = loop {
            let s = status(&probe, &mut probe_rx).await;
            rss_max_kb = rss_max_kb.max(station.rss_kb());
            if let Some((s, _)) = s {
                if s["queue_depth"] == 0 && s["outbox"] == 0 && s["counters"] == last["counters"] {
                    break s;
                }
                last = s;
            }
            assert!(
                Instant::now() < deadline,
                "the station did not drain the flood"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let rss_after_kb = station.rss_kb();

        // the flood's own events were stored before the drain ended, and sent since; $SYS is
        // published every second
        tokio::time::sleep(Duration::from_secs(2)).await;
        let delta = |k: &str| counter(&after, k) - counter(&before, k);
        let link = |s: &Value| s["link"]["dropped_incoming"].as_u64().unwrap();
        let flood_ids = |ids: &HashSet<String>| ids.iter().filter(|i| i.starts_with('f')).count();
        let results_after = seen.lock().unwrap().results;
        let mut f = {
            let s = seen.lock().unwrap();
            Figures {
                sent,
                flood_s,
                status: latencies,
                unanswered,
                handled: delta("commands"),
                refused: delta("refused_commands"),
                dropped_incoming: link(&after) - link(&before),
                dropped_events: delta("dropped_events"),
                overloaded_events: flood_ids(&s.overloaded) as u64,
                overloaded_anonymous: s.overloaded_anonymous,
                results: results_after - results_before,
                results_made: delta("results"),
                dropped_results: delta("dropped_results"),
                errors: delta("errors"),
                broker_dropped: s.broker_dropped - broker_dropped_before,
                other_events: s.other.clone(),
                client_errors: CLIENT_ERRORS.load(Ordering::Relaxed),
                rss_before_kb,
                rss_max_kb,
                rss_after_kb,
                result_after: None,
            }
        };

        // and it still works: one more trigger gets its result
        let t0 = Instant::now();
        probe
            .publish(
                format!("takumi/{ID}/cmd"),
                QoS::AtLeastOnce,
                false,
                cmd(json!({"id": "after", "op": "trigger"})),
            )
            .await
            .unwrap();
        while t0.elapsed() < Duration::from_secs(60) {
            if seen.lock().unwrap().results > results_after {
                f.result_after = Some(t0.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(watcher);
        f
    });
    drop(station);
    Some(figures)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Checks what a flood must satisfy, after printing its figures.
fn check(f: &Figures) {
    let mut lat = f.status.clone();
    lat.sort();
    eprintln!(
        "flood: {} commands in {:.1} s ({:.0}/s); status answered {} times, max {:?}, p99 {:?}, \
         p50 {:?}, unanswered {}; handled {}, refused {}, dropped unread {}; overloaded events \
         received {} (+{} without id), events dropped {}; results {}; other events {:?}; \
         RSS {} kB before, {} kB max (+{} kB), {} kB after; a trigger after it: result in {:?}; \
         test client errors {}; messages the broker dropped {}; results made {}, not stored {}, \
         failed commands {}",
        f.sent,
        f.flood_s,
        f.sent as f64 / f.flood_s,
        lat.len(),
        lat.last().copied().unwrap_or_default(),
        percentile(&lat, 0.99),
        percentile(&lat, 0.5),
        f.unanswered,
        f.handled,
        f.refused,
        f.dropped_incoming,
        f.overloaded_events,
        f.overloaded_anonymous,
        f.dropped_events,
        f.results,
        f.other_events,
        f.rss_before_kb,
        f.rss_max_kb,
        f.rss_max_kb - f.rss_before_kb,
        f.rss_after_kb,
        f.result_after,
        f.client_errors,
        f.broker_dropped,
        f.results_made,
        f.dropped_results,
        f.errors
    );
    assert_eq!(
        f.client_errors, 0,
        "the test's own clients lost their connection"
    );
    assert!(
        f.result_after.is_some(),
        "no result for a trigger after the flood"
    );
    assert_eq!(f.unanswered, 0, "status requests went unanswered");
    assert!(lat.len() >= 2, "too few status requests were made");
    let worst = *lat.last().unwrap();
    assert!(worst <= STATUS_WITHIN, "a status took {worst:?}");
    // every command the station received was handled or refused; whatever the link could not
    // read is counted there, and nothing vanishes between the broker and the pipeline
    assert_eq!(
        f.handled + f.refused + f.dropped_incoming,
        f.sent,
        "commands unaccounted for"
    );
    assert!(f.refused > 0, "nothing was refused: not a flood");
    assert!(f.results > 0, "the station did no work during the flood");
    // accepted work is never lost to the flood: every result made was stored and delivered
    assert_eq!(f.dropped_results, 0, "results were not stored");
    assert_eq!(f.results, f.results_made, "results made but not received");
    assert_eq!(f.errors, 0, "accepted commands failed");
    // each refusal was said, by its id, in an event that reached the subscriber (refusals are
    // grouped, so the writer keeps up with any flood the link lets through)
    assert_eq!(
        f.overloaded_events, f.refused,
        "refused commands whose id no overloaded event named"
    );
    assert_eq!(f.dropped_events, 0, "events were dropped");
    assert!(
        f.other_events.is_empty(),
        "unexpected events: {:?}",
        f.other_events
    );
    assert!(
        f.rss_max_kb - f.rss_before_kb <= RSS_GROWTH_MAX_KB,
        "the station grew by {} kB",
        f.rss_max_kb - f.rss_before_kb
    );
}

#[test]
fn a_flood_of_commands_is_refused_with_events_and_status_stays_answered() {
    if let Some(f) = flood(10_000, 3) {
        check(&f);
    }
}

/// The full flood of issue 11: 10,000 commands/s for 30 s (see the module docs for the command).
#[test]
#[ignore = "30 s flood plus set-up; run by hand, see the module docs"]
fn flood_10k_per_s_for_30_s() {
    if let Some(f) = flood(10_000, 30) {
        check(&f);
    }
}
