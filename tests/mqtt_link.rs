//! The MQTT link against real brokers: a mosquitto started per test, and the embedded rumqttd.
//! Without mosquitto installed the mosquitto tests print SKIPPED, unless CI=true where they fail.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mosquitto, free_port, have_mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish};
use takumi::publish::broker::EmbeddedBroker;
use takumi::publish::mqtt::{
    Incoming, LinkError, MqttConfig, MqttLink, QoS, StatusMessage, TlsConfig,
};
use takumi::publish::outbox::Outbox;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---------- helpers ----------

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Payload: message id (u64 LE) then a pattern derived from it, so damage is detected.
fn payload(id: u64, len: usize) -> Vec<u8> {
    let mut p = id.to_le_bytes().to_vec();
    p.extend((0..len.saturating_sub(8)).map(|i| (id as u8).wrapping_add(i as u8)));
    p
}

fn check_payload(p: &[u8]) -> Option<u64> {
    let id = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    p[8..]
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (id as u8).wrapping_add(i as u8))
        .then_some(id)
}

/// An independent client with a persistent session at QoS 1 that counts message ids.
struct Subscriber {
    counts: Arc<Mutex<HashMap<u64, u32>>>,
    damaged: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Subscriber {
    async fn start(port: u16, client_id: &str, filter: &str) -> Subscriber {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut el) = AsyncClient::new(o, 16);
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let damaged = Arc::new(AtomicU64::new(0));
        let (ready_tx, mut ready_rx) = mpsc::channel(1);
        let (c2, d2, filter) = (counts.clone(), damaged.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) if !a.session_present => {
                        client.try_subscribe(&filter, QoS::AtLeastOnce).unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => match check_payload(&p.payload) {
                        Some(id) => *c2.lock().unwrap().entry(id).or_insert(0) += 1,
                        None => {
                            d2.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("subscriber never got its SUBACK");
        Subscriber {
            counts,
            damaged,
            task,
        }
    }

    fn distinct(&self) -> usize {
        self.counts.lock().unwrap().len()
    }

    fn total(&self) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .values()
            .map(|c| *c as u64)
            .sum()
    }

    fn missing(&self, n: u64) -> Vec<u64> {
        let c = self.counts.lock().unwrap();
        (0..n).filter(|i| !c.contains_key(i)).collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn link_config(port: u16, client_id: &str) -> MqttConfig {
    let mut cfg = MqttConfig::new("127.0.0.1", port, client_id);
    cfg.keep_alive_s = 5;
    cfg
}

fn open_outbox(dir: &Path) -> Arc<Outbox> {
    Arc::new(Outbox::open(dir, 10_000, 256 << 20).unwrap())
}

/// The outbox's files on disk.
fn entry_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "msg")
        })
        .count()
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_bulk_200_images_reach_subscriber() {
    if !have_mosquitto() {
        return;
    }
    let broker = Mosquitto::start(free_port(), false, "").unwrap();
    let sub = Subscriber::start(broker.port, "bulk-sub", "takumi/test/bulk").await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let (link, _rx) =
        MqttLink::start(link_config(broker.port, "bulk-pub"), outbox.clone()).unwrap();

    let n = 200u64;
    let t0 = Instant::now();
    for i in 0..n {
        link.publish_durable("takumi/test/bulk", payload(i, 100_000), false)
            .await
            .unwrap();
    }
    wait_until(
        "all 200 ids at the subscriber",
        Duration::from_secs(60),
        || sub.distinct() as u64 == n,
    )
    .await;
    wait_until("an empty outbox", Duration::from_secs(10), || {
        outbox.is_empty()
    })
    .await;
    let stats = link.stats();
    eprintln!(
        "bulk: {n} x 100 KB in {:?}, received {} (dups {}), {stats:?}",
        t0.elapsed(),
        sub.total(),
        sub.total() - n
    );
    assert_eq!(sub.damaged.load(Ordering::Relaxed), 0, "damaged payloads");
    assert_eq!(stats.acked, n);
    assert!(outbox.pending().is_empty());
    assert_eq!(entry_files(dir.path()), 0, "entry files left on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_twice_loses_nothing() {
    if !have_mosquitto() {
        return;
    }
    // Broker persistence keeps the subscriber's session (and so its subscription and queue)
    // across kill -9: messages the link resends before the subscriber is back are queued
    // for it instead of dropped. The link itself relies only on its outbox.
    let mut broker = Mosquitto::start(free_port(), true, "").unwrap();
    let port = broker.port;
    let sub = Subscriber::start(port, "restart-sub", "takumi/test/restart").await;
    // Let the once-a-second autosave store the subscription before the first kill.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let (link, _rx) = MqttLink::start(link_config(port, "restart-pub"), outbox.clone()).unwrap();
    let link = Arc::new(link);
    wait_until("link connected", Duration::from_secs(10), || {
        link.connected()
    })
    .await;

    let n = 300u64;
    let publisher = {
        let link = link.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for i in 0..n {
                tick.tick().await;
                link.publish_durable("takumi/test/restart", payload(i, 2048), false)
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.freeze();
        tokio::time::sleep(Duration::from_millis(300)).await;
        broker.kill9();
        tokio::time::sleep(Duration::from_millis(600)).await;
        broker.spawn();
    }
    publisher.await.unwrap();
    let deadline = Duration::from_secs(60);
    let all = tokio::time::timeout(deadline, async {
        while sub.distinct() as u64 != n || !outbox.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stats = link.stats();
    let missing = sub.missing(n);
    eprintln!(
        "restart: received {} for {n} ids: duplicates {}, lost {}, outbox left {}, {stats:?}",
        sub.total(),
        sub.total() - sub.distinct() as u64,
        missing.len(),
        outbox.len()
    );
    assert!(
        all.is_ok(),
        "lost {} ids (first {:?}), outbox left {}; broker log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        outbox.len(),
        broker.log()
    );
    assert!(stats.reconnects >= 2, "expected two reconnects: {stats:?}");
    assert_eq!(sub.damaged.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_a_crash_and_delivers_after_restart() {
    if !have_mosquitto() {
        return;
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let n = 25u64;
    {
        // Broker down: everything stays in the outbox; then the process "dies".
        let outbox = open_outbox(dir.path());
        let (link, _rx) = MqttLink::start(link_config(port, "crash-pub"), outbox.clone()).unwrap();
        for i in 0..n {
            link.publish_durable("takumi/test/crash", payload(i, 5000), true)
                .await
                .unwrap();
        }
        assert!(!link.connected());
        assert_eq!(outbox.len() as u64, n);
        assert_eq!(link.stats().acked, 0);
    }
    let broker = Mosquitto::start(port, false, "").unwrap();
    let sub = Subscriber::start(port, "crash-sub", "takumi/test/crash").await;
    let outbox = open_outbox(dir.path());
    assert_eq!(outbox.len() as u64, n, "entries lost across the restart");
    let (link, _rx) = MqttLink::start(link_config(port, "crash-pub"), outbox.clone()).unwrap();
    wait_until("all ids after restart", Duration::from_secs(30), || {
        sub.distinct() as u64 == n
    })
    .await;
    wait_until("an empty outbox", Duration::from_secs(10), || {
        outbox.is_empty()
    })
    .await;
    assert_eq!(link.stats().acked, n);
    assert_eq!(sub.damaged.load(Ordering::Relaxed), 0);
    drop(broker);
}

/// Messages can be sent before their files are written (the fsyncs are off the path to the
/// broker), and a PUBACK that comes first leaves no file behind.
#[test]
fn outbox_messages_are_readable_before_their_files_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), 100, 1 << 20).unwrap();
    let image = payload(7, 3000);
    let msgs = [
        ("t/r/image", image.as_slice(), false),
        ("t/r", b"{}".as_slice(), false),
    ];
    let mut seen = Vec::new();
    let seqs = ob
        .push_all(&msgs, true, || {
            assert_eq!(entry_files(dir.path()), 0, "nothing written yet");
            let mut cursor = 0;
            while let Some(seq) = ob.next_after(cursor) {
                let e = ob.read(seq).unwrap().unwrap();
                assert_eq!(ob.staged(seq).as_ref(), Some(&e));
                seen.push((e.topic, e.payload));
                cursor = seq;
            }
        })
        .unwrap();
    assert_eq!(
        seen,
        vec![
            ("t/r/image".to_string(), image),
            ("t/r".to_string(), b"{}".to_vec())
        ]
    );
    assert_eq!((ob.pending(), entry_files(dir.path())), (seqs.clone(), 2));
    assert_eq!(ob.staged(seqs[0]), None, "written: read from its file now");
    // acked while being written: gone from memory at once, and its file once written
    let msgs = [("t/e", b"event".as_slice(), false)];
    let seqs = ob
        .push_all(&msgs, true, || {
            let seq = ob.next_after(seqs[1]).unwrap();
            ob.ack(seq).unwrap();
            assert_eq!(ob.next_after(seqs[1]), None);
            assert_eq!(ob.read(seq).unwrap(), None);
        })
        .unwrap();
    assert_eq!((ob.len(), entry_files(dir.path())), (2, 2), "{seqs:?}");
    // the first message refused stops the rest, and what was staged before it is kept
    let small = tempfile::tempdir().unwrap();
    let ob = Outbox::open(small.path(), 100, 1_000).unwrap();
    let big = vec![0; 2_000];
    let msgs = [
        ("t/a", b"a".as_slice(), false),
        ("t/b", big.as_slice(), false),
        ("t/c", b"c".as_slice(), false),
    ];
    let refused = ob.push_all(&msgs, false, || {});
    assert!(
        matches!(refused, Err(LinkError::Full { .. })),
        "{refused:?}"
    );
    assert_eq!((ob.len(), entry_files(small.path())), (1, 1));
    assert_eq!(
        ob.read(ob.next_after(0).unwrap()).unwrap().unwrap().topic,
        "t/a"
    );
}

/// A full outbox still stores events (its reserve), up to a bound of its own, and reports
/// itself full to callers that refuse work before doing it.
#[test]
fn full_outbox_keeps_a_reserve_for_events() {
    use takumi::publish::outbox::RESERVE_ENTRIES;
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(dir.path(), 2, 1 << 20).unwrap();
    assert!(!ob.is_full());
    ob.push("t/r", b"result", false).unwrap();
    ob.push("t/r", b"result", false).unwrap();
    assert!(ob.is_full());
    assert!(matches!(
        ob.push("t/r", b"result", false),
        Err(LinkError::Full { .. })
    ));
    for _ in 0..RESERVE_ENTRIES {
        ob.push_reserved("t/e", b"event", false).unwrap();
    }
    assert!(matches!(
        ob.push_reserved("t/e", b"event", false),
        Err(LinkError::Full { .. })
    ));
    assert_eq!(ob.len(), 2 + RESERVE_ENTRIES);
    // the byte bound has its reserve too
    let small = tempfile::tempdir().unwrap();
    let ob = Outbox::open(small.path(), 100, 10_000).unwrap();
    ob.push("t/r", &[0; 9_000], false).unwrap();
    assert!(ob.push("t/r", &[0; 2_000], false).is_err());
    assert!(
        !ob.is_full(),
        "under both bounds, though a large result no longer fits"
    );
    ob.push_reserved("t/e", &[0; 2_000], false).unwrap();
    assert!(ob.is_full());
    let reserve = takumi::publish::outbox::RESERVE_BYTES as usize;
    assert!(ob.push_reserved("t/e", &vec![0; reserve], false).is_err());
}

#[test]
fn outbox_bounds_torn_entries_and_sequence() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ob = Outbox::open(dir.path(), 5, 1 << 20).unwrap();
        let seqs: Vec<u64> = (0..5)
            .map(|i| ob.push("t/a", &payload(i, 1000), i == 0).unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        match ob.push("t/a", b"x", false) {
            Err(LinkError::Full { entries: 5, bytes }) => assert!(bytes > 5000),
            other => panic!("expected Full, got {other:?}"),
        }
        let e = ob.read(1).unwrap().unwrap();
        assert_eq!((e.topic.as_str(), e.qos, e.retain), ("t/a", 1, true));
        assert_eq!(check_payload(&e.payload), Some(0));
    }
    // Byte bound.
    let small = tempfile::tempdir().unwrap();
    let ob = Outbox::open(small.path(), 100, 10_000).unwrap();
    ob.push("t/b", &[0; 4000], false).unwrap();
    ob.push("t/b", &[0; 4000], false).unwrap();
    assert!(matches!(
        ob.push("t/b", &[0; 4000], false),
        Err(LinkError::Full { entries: 2, .. })
    ));
    assert_eq!(ob.len(), 2);

    // A torn entry (crash mid-write) and a leftover temp file are discarded on open.
    let entry3 = dir.path().join(format!("{:020}.msg", 3));
    let f = fs::OpenOptions::new().write(true).open(&entry3).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);
    fs::write(dir.path().join(format!("{:020}.msg.tmp", 6)), b"half").unwrap();
    let ob = Outbox::open(dir.path(), 5, 1 << 20).unwrap();
    assert_eq!(ob.pending(), vec![1, 2, 4, 5]);
    assert!(!entry3.exists());
    assert!(!dir.path().join(format!("{:020}.msg.tmp", 6)).exists());
    // A flipped payload byte is caught by the checksum.
    let entry4 = dir.path().join(format!("{:020}.msg", 4));
    let mut bytes = fs::read(&entry4).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&entry4, bytes).unwrap();
    let ob = Outbox::open(dir.path(), 5, 1 << 20).unwrap();
    assert_eq!(ob.pending(), vec![1, 2, 5]);

    // Sequence numbers continue after a restart, also once everything was acked.
    let next = ob.push("t/a", b"after", false).unwrap();
    assert!(next > 5, "seq {next} reused");
    for s in ob.pending() {
        ob.ack(s).unwrap();
    }
    assert!(ob.is_empty());
    drop(ob);
    let ob = Outbox::open(dir.path(), 5, 1 << 20).unwrap();
    assert!(ob.is_empty());
    let again = ob.push("t/a", b"again", false).unwrap();
    assert!(again > next, "seq {again} not after {next}");

    // An I/O failure is reported with its path and leaves no file behind.
    fs::remove_dir_all(dir.path()).unwrap();
    match ob.push("t/a", b"gone", false) {
        Err(LinkError::Io { path, .. }) => assert!(path.starts_with(dir.path())),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(!dir.path().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_delivered_and_flood_dropped_without_hang() {
    if !have_mosquitto() {
        return;
    }
    let broker = Mosquitto::start(free_port(), false, "").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let mut cfg = link_config(broker.port, "in-link");
    cfg.incoming_capacity = 4;
    let (link, mut rx) = MqttLink::start(cfg, outbox.clone()).unwrap();
    link.subscribe("takumi/test/cmd/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_until("link connected", Duration::from_secs(10), || {
        link.connected()
    })
    .await;

    // Another client publishes; probes repeat until the subscription is active.
    let mut o = MqttOptions::new("in-other", "127.0.0.1", broker.port);
    o.set_keep_alive(Duration::from_secs(5));
    let (other, mut el) = AsyncClient::new(o, 100);
    let acks = Arc::new(AtomicU64::new(0));
    let acks2 = acks.clone();
    let other_task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let first: Incoming = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            other
                .publish(
                    "takumi/test/cmd/a",
                    QoS::AtLeastOnce,
                    false,
                    b"probe".to_vec(),
                )
                .await
                .unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                return m;
            }
        }
    })
    .await
    .expect("nothing arrived on the incoming channel");
    assert_eq!(first.topic, "takumi/test/cmd/a");
    assert_eq!(first.payload, b"probe");
    // Absorb late probes so the flood starts on an empty channel.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {}
    let dropped_before = link.stats().dropped_incoming;

    // Flood without consuming.
    let flood = 50u64;
    let acked_before = acks.load(Ordering::Relaxed);
    for i in 0..flood {
        other
            .publish(
                "takumi/test/cmd/b",
                QoS::AtLeastOnce,
                false,
                i.to_le_bytes().to_vec(),
            )
            .await
            .unwrap();
    }
    wait_until("broker acks for the flood", Duration::from_secs(10), || {
        acks.load(Ordering::Relaxed) >= acked_before + flood
    })
    .await;
    wait_until("flood counted", Duration::from_secs(10), || {
        link.stats().dropped_incoming - dropped_before + rx.len() as u64 >= flood
    })
    .await;
    // The event loop is still alive: a durable message goes through while the channel is full.
    link.publish_durable("takumi/test/other", b"still alive".to_vec(), false)
        .await
        .unwrap();
    wait_until("durable ack while flooded", Duration::from_secs(10), || {
        outbox.is_empty()
    })
    .await;
    let dropped = link.stats().dropped_incoming - dropped_before;
    let mut buffered = 0u64;
    while let Ok(m) = rx.try_recv() {
        assert_eq!(m.topic, "takumi/test/cmd/b");
        buffered += 1;
    }
    eprintln!("flood: {flood} sent, {buffered} buffered, {dropped} dropped");
    assert_eq!(buffered, 4, "channel capacity");
    assert_eq!(dropped + buffered, flood);
    other_task.abort();
}

/// A consumer that lags behind a flood still gets the messages its urgent check picks (a
/// station's status requests): the flood fills the channel only up to the slots kept for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_messages_pass_a_flood_that_is_dropped() {
    let Some(broker) = Mosquitto::start(free_port(), false, "") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = link_config(broker.port, "urgent-link");
    cfg.incoming_capacity = 4;
    let urgent = Box::new(|topic: &str, payload: &[u8]| {
        topic == "takumi/test/cmd" && payload.starts_with(b"urgent")
    });
    let (link, mut rx) = MqttLink::start_with_urgent(cfg, open_outbox(dir.path()), urgent).unwrap();
    link.subscribe("takumi/test/cmd", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut o = MqttOptions::new("urgent-other", "127.0.0.1", broker.port);
    o.set_keep_alive(Duration::from_secs(5));
    let (other, mut el) = AsyncClient::new(o, 1000);
    let other_task = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let send = |p: Vec<u8>| {
        let other = other.clone();
        async move {
            other
                .publish("takumi/test/cmd", QoS::AtLeastOnce, false, p)
                .await
                .unwrap()
        }
    };
    // probes until the subscription is active, then an empty channel
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            send(b"probe".to_vec()).await;
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                return;
            }
        }
    })
    .await
    .expect("nothing arrived on the incoming channel");
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {}
    let dropped_before = link.stats().dropped_incoming;

    // a flood nobody reads, an urgent message in its midst, and more flood
    let flood = 100u64;
    for i in 0..flood {
        if i == flood / 2 {
            send(b"urgent 1".to_vec()).await;
        }
        send(format!("flood {i}").into_bytes()).await;
    }
    send(b"urgent 2".to_vec()).await;
    wait_until("every message seen", Duration::from_secs(10), || {
        link.stats().dropped_incoming - dropped_before + rx.len() as u64 >= flood + 2
    })
    .await;
    let mut got = Vec::new();
    while let Ok(m) = rx.try_recv() {
        got.push(String::from_utf8(m.payload).unwrap());
    }
    let urgent: Vec<&String> = got.iter().filter(|p| p.starts_with("urgent")).collect();
    assert_eq!(urgent, ["urgent 1", "urgent 2"], "received: {got:?}");
    // the flood took the channel's own capacity, and the rest was dropped and counted
    assert_eq!(got.len(), 4 + 2, "received: {got:?}");
    assert_eq!(link.stats().dropped_incoming - dropped_before, flood - 4);
    other_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_round_trip() {
    let broker = EmbeddedBroker::start(0).unwrap();
    assert_ne!(broker.port(), 0);
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let (link, mut rx) =
        MqttLink::start(link_config(broker.port(), "emb-link"), outbox.clone()).unwrap();
    link.subscribe("takumi/test/emb", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_until("link connected", Duration::from_secs(10), || {
        link.connected()
    })
    .await;
    // Bigger than rumqttc's 10 KiB default and rumqttd's sample 20 KiB limit.
    let big = payload(7, 3 << 20);
    let seq = link
        .publish_durable("takumi/test/emb", big.clone(), false)
        .await
        .unwrap();
    assert!(seq >= 1);
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("round trip timed out")
        .expect("channel closed");
    assert_eq!(got.topic, "takumi/test/emb");
    assert!(got.payload == big, "payload changed in transit");
    wait_until("an empty outbox", Duration::from_secs(10), || {
        outbox.is_empty()
    })
    .await;
    assert_eq!(link.stats().acked, 1);
}

/// A line client that publishes `go` on `cmd` the moment it sees `online` on `status`; returns
/// once its subscription is acknowledged.
async fn sends_on_birth(port: u16, id: &str, status: &str, cmd: &str) -> JoinHandle<()> {
    let cmd = cmd.to_string();
    subscriber(port, id, status, move |client, p| {
        if &p.payload[..] == b"online" {
            client
                .try_publish(&cmd, QoS::AtLeastOnce, false, "go")
                .unwrap();
        }
    })
    .await
}

/// A station is subscribed before it says "online": a command sent on its birth message reaches
/// it. Ten fresh stations: the race this guards against (the station subscribing after the
/// start, so that the birth could go out first) lost such a command only under load
/// (tests/run_log.rs, once in a loaded run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_on_the_birth_message_is_received() {
    let broker = EmbeddedBroker::start(0).unwrap();
    for round in 0..10 {
        let (status, cmd) = (format!("t/b{round}/available"), format!("t/b{round}/cmd"));
        let line = sends_on_birth(broker.port(), &format!("line-{round}"), &status, &cmd).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = link_config(broker.port(), &format!("station-{round}"));
        cfg.birth = Some(StatusMessage {
            topic: status,
            payload: "online".into(),
            retain: false,
        });
        let filters = [(cmd.clone(), QoS::AtLeastOnce)];
        let (link, mut rx) = MqttLink::start_subscribed(
            cfg,
            open_outbox(dir.path()),
            Box::new(|_, _| false),
            &filters,
        )
        .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the command sent on \"online\" was lost"))
            .unwrap();
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            (cmd.as_str(), &b"go"[..])
        );
        link.shutdown().await;
        line.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bad_messages_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let mut cfg = link_config(free_port(), "bad");
    cfg.max_packet_bytes = 64 * 1024;
    let (link, _rx) = MqttLink::start(cfg, outbox.clone()).unwrap();
    assert!(matches!(
        link.publish_durable("a/+/b", vec![1], false).await,
        Err(LinkError::Topic { .. })
    ));
    assert!(matches!(
        link.publish_durable("a/b", vec![0; 64 * 1024], false).await,
        Err(LinkError::TooLarge { .. })
    ));
    assert!(matches!(
        link.publish_volatile("a/b", b"x".to_vec(), false, QoS::AtMostOnce),
        Err(LinkError::NotConnected)
    ));
    assert!(outbox.is_empty());

    let mut no_id = link_config(1883, "");
    no_id.client_id.clear();
    assert!(matches!(
        MqttLink::start(no_id, outbox.clone()),
        Err(LinkError::Config { .. })
    ));
    let cfg: Result<MqttConfig, _> =
        serde_json::from_str(r#"{"host":"h","client_id":"c","session_expiry_s":60}"#);
    assert!(cfg.is_err(), "unknown fields must be rejected");
    let cfg: MqttConfig = serde_json::from_str(r#"{"host":"h","client_id":"c"}"#).unwrap();
    assert_eq!((cfg.port, cfg.max_packet_bytes), (1883, 8 << 20));
}

/// A throwaway CA with a server certificate for 127.0.0.1 and a client certificate.
fn make_certs(dir: &Path) -> bool {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if Command::new("openssl").arg("version").output().is_err() {
        return false;
    }
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=takumi test CA",
        ],
    ]
    .concat());
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "subjectAltName=DNS:station-1\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .unwrap();
        let (key, csr, pem, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extf,
        ]);
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate() {
    if !have_mosquitto() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    if !make_certs(certs.path()) {
        assert!(!in_ci(), "openssl is not installed but CI=true");
        eprintln!("SKIP tls_with_client_certificate: openssl is not installed");
        return;
    }
    let c = |f: &str| certs.path().join(f);
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        c("ca.pem").display(),
        c("server.pem").display(),
        c("server.key").display()
    );
    let broker = Mosquitto::start(free_port(), false, &extra).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());

    // Missing files fail at start, not at connect time.
    let mut cfg = link_config(broker.port, "tls-link");
    cfg.tls = Some(TlsConfig {
        ca_file: c("nope.pem"),
        client_cert_file: None,
        client_key_file: None,
    });
    assert!(matches!(
        MqttLink::start(cfg.clone(), outbox.clone()),
        Err(LinkError::Io { .. })
    ));

    // Without a client certificate the broker refuses the handshake.
    cfg.tls = Some(TlsConfig {
        ca_file: c("ca.pem"),
        client_cert_file: None,
        client_key_file: None,
    });
    let (link, _rx) = MqttLink::start(cfg.clone(), outbox.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!link.connected(), "connected without a client certificate");
    drop(link);

    cfg.tls = Some(TlsConfig {
        ca_file: c("ca.pem"),
        client_cert_file: Some(c("client.pem")),
        client_key_file: Some(c("client.key")),
    });
    let (link, mut rx) = MqttLink::start(cfg, outbox.clone()).unwrap();
    link.subscribe("takumi/test/tls", QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_until("TLS link connected", Duration::from_secs(10), || {
        link.connected()
    })
    .await;
    link.publish_durable("takumi/test/tls", payload(3, 200_000), false)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("TLS round trip timed out")
        .unwrap();
    assert_eq!(check_payload(&got.payload), Some(3));
    wait_until("an empty outbox", Duration::from_secs(10), || {
        outbox.is_empty()
    })
    .await;
}

/// A plain client that forwards everything on `filter` to a channel.
async fn watcher(
    port: u16,
    client_id: &str,
    filter: &str,
) -> (mpsc::UnboundedReceiver<Incoming>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = subscriber(port, client_id, filter, move |_, p| {
        let _ = tx.send(Incoming::new(p.topic, p.payload.to_vec()));
    })
    .await;
    (rx, task)
}

/// A client subscribed to `filter` (again on every CONNACK) that hands each PUBLISH to
/// `on_publish`; returns once its first SUBACK has come back.
async fn subscriber(
    port: u16,
    client_id: &str,
    filter: &str,
    mut on_publish: impl FnMut(&AsyncClient, Publish) + Send + 'static,
) -> JoinHandle<()> {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 16);
    let (ready_tx, mut ready_rx) = mpsc::channel(1);
    let filter = filter.to_string();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe(&filter, QoS::AtLeastOnce).unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.try_send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&client, p),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
        .await
        .expect("the subscriber never got its SUBACK");
    task
}

async fn next_payload(rx: &mut mpsc::UnboundedReceiver<Incoming>, topic: &str) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing on {topic}"))
            .unwrap();
        if m.topic == topic {
            return String::from_utf8(m.payload).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_birth_volatile_and_clean_shutdown() {
    if !have_mosquitto() {
        return;
    }
    let broker = Mosquitto::start(free_port(), false, "").unwrap();
    let (mut rx, watch_task) = watcher(broker.port, "status-watch", "takumi/test/st/#").await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = open_outbox(dir.path());
    let status = "takumi/test/st/availability";
    let mut cfg = link_config(broker.port, "status-link");
    cfg.will = Some(StatusMessage {
        topic: status.into(),
        payload: "offline".into(),
        retain: true,
    });
    cfg.birth = Some(StatusMessage {
        topic: status.into(),
        payload: "online".into(),
        retain: true,
    });

    let (link, _in) = MqttLink::start(cfg.clone(), outbox.clone()).unwrap();
    assert_eq!(next_payload(&mut rx, status).await, "online");
    link.publish_volatile("takumi/test/st/hello", "hi", false, QoS::AtMostOnce)
        .unwrap();
    assert_eq!(next_payload(&mut rx, "takumi/test/st/hello").await, "hi");
    // Abrupt stop (as in a crash): the broker publishes the will.
    drop(link);
    assert_eq!(next_payload(&mut rx, status).await, "offline");

    let (link, _in) = MqttLink::start(cfg, outbox.clone()).unwrap();
    assert_eq!(next_payload(&mut rx, status).await, "online");
    // Clean shutdown: DISCONNECT, so no will.
    link.shutdown().await;
    let late = tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await;
    assert!(
        late.is_err(),
        "unexpected message after clean shutdown: {late:?}"
    );
    watch_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_backoff_doubles() {
    // A "broker" that accepts TCP and hangs up at once: every attempt fails after connect.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a2 = attempts.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            a2.lock().unwrap().push(Instant::now());
            drop(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (link, _rx) =
        MqttLink::start(link_config(port, "backoff"), open_outbox(dir.path())).unwrap();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    drop(link);
    let at = attempts.lock().unwrap().clone();
    let gaps: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    eprintln!("backoff gaps: {gaps:?}");
    // Expected: attempts at 0, 0.5, 1.5, 3.5 s.
    assert!(
        (3..=5).contains(&at.len()),
        "{} attempts in 4.2 s",
        at.len()
    );
    assert!(
        (0.4..0.9).contains(&gaps[0]),
        "first retry after {} s",
        gaps[0]
    );
    for w in gaps.windows(2) {
        assert!(w[1] > 1.6 * w[0], "backoff did not double: {gaps:?}");
    }
}
