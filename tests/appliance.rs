//! The station end to end over a real broker: mosquitto (started here on a free loopback port)
//! and the embedded rumqttd. An independent client plays the line controller.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use takumi::config::{Config, DisplayKind};

/// A station config on `dir` (tests/common), with a PNG display.
fn station_cfg(dir: &Path, id: &str, port: u16, embedded: bool) -> Config {
    let mut cfg = station_config(dir, id, port);
    cfg.broker.embedded = embedded;
    cfg.display.kind = DisplayKind::Png;
    cfg.display.path = dir.join(format!("display-{id}.png"));
    cfg.display.width = 480;
    cfg.display.height = 320;
    cfg
}

struct Line {
    client: AsyncClient,
    rx: tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
}

async fn line(port: u16, filter: &str) -> Line {
    let mut o = MqttOptions::new(format!("line-{}", free_port()), "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec())).await;
            }
        }
    });
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    Line { client, rx }
}

impl Line {
    async fn send(&self, station: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                format!("takumi/{station}/cmd"),
                QoS::AtLeastOnce,
                false,
                payload.into(),
            )
            .await
            .unwrap();
    }

    async fn wait(
        &mut self,
        secs: u64,
        mut f: impl FnMut(&str, &[u8]) -> bool,
    ) -> (String, Vec<u8>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .expect("timed out waiting for the station")
                .expect("client closed");
            if f(&m.0, &m.1) {
                return m;
            }
        }
    }

    async fn event(&mut self, station: &str, request: &str) -> Value {
        let t = format!("takumi/{station}/event");
        let (_, p) = self
            .wait(60, |topic, p| {
                topic == t
                    && serde_json::from_slice::<Value>(p).is_ok_and(|v| v["request_id"] == request)
            })
            .await;
        serde_json::from_slice(&p).unwrap()
    }

    /// The next event of `station` whose message contains `text`.
    async fn event_saying(&mut self, station: &str, text: &str) -> Value {
        let t = format!("takumi/{station}/event");
        let (_, p) = self
            .wait(60, |topic, p| {
                topic == t
                    && serde_json::from_slice::<Value>(p)
                        .is_ok_and(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
            })
            .await;
        serde_json::from_slice(&p).unwrap()
    }

    async fn online(&mut self, station: &str) {
        let t = format!("takumi/{station}/available");
        self.wait(30, |topic, p| topic == t && p == b"online").await;
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// command → capture → learn → apply → approve, checked by an independent subscriber.
async fn round_trip(cfg: Config, port: u16) {
    let svc = takumi::appliance::service::start(cfg.clone())
        .await
        .unwrap();
    let port = svc.broker_port.unwrap_or(port);
    let mut l = line(port, "takumi/#").await;
    l.online("s1").await;
    l.send(
        "s1",
        json!({"id": "c1", "op": "capture_before"}).to_string(),
    )
    .await;
    assert_eq!(l.event("s1", "c1").await["code"], "captured");
    l.send("s1", json!({"id": "c2", "op": "capture_after"}).to_string())
        .await;
    assert_eq!(l.event("s1", "c2").await["code"], "captured");
    l.send(
        "s1",
        json!({"id": "l1", "op": "learn", "name": "polish"}).to_string(),
    )
    .await;
    let e = l.event("s1", "l1").await;
    assert_eq!(e["code"], "learned", "{e}");
    l.send(
        "s1",
        json!({"id": "a1", "op": "apply", "template": "polish", "mode": "next"}).to_string(),
    )
    .await;
    assert_eq!(l.event("s1", "a1").await["code"], "waiting");
    l.send("s1", json!({"id": "t1", "op": "trigger"}).to_string())
        .await;
    // the camera loops: the next capture is the pair's before image again
    let (_, img) = l
        .wait(60, |t, _| {
            t.starts_with("takumi/s1/result/") && t.ends_with("/image")
        })
        .await;
    let (_, meta) = l
        .wait(60, |t, _| {
            t.starts_with("takumi/s1/result/") && !t.ends_with("/image")
        })
        .await;
    let meta: Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(meta["request_id"], "a1");
    assert!(
        matches!(meta["state"].as_str(), Some("pending" | "needs_review")),
        "{meta}"
    );
    let got = takumi::capture::file::decode_image(&img, &Default::default()).unwrap();
    let before =
        takumi::capture::load_image(&samples().join("pair_before.jpg"), &Default::default())
            .unwrap();
    // the image is the template's edit of the capture: the engine, run here on the stored
    // template, gives the same picture up to JPEG loss
    let store = takumi::store::TemplateStore::open(&cfg.store.dir).unwrap();
    let t = store
        .load(&takumi::store::TemplateName::new("polish").unwrap())
        .unwrap();
    let engine =
        takumi::engine::Engine::load(&models(), takumi::engine::Precision::Float, 1).unwrap();
    let want = engine.apply_edit(t.edit(false), &before).unwrap();
    let to_want = takumi::frame::psnr(&got, &want);
    let to_before = takumi::frame::psnr(&got, &before);
    assert!(
        to_want > 35.0,
        "result differs from the edit: {to_want:.1} dB"
    );
    assert!(
        to_before < to_want - 5.0,
        "result looks unedited: {to_before:.1} dB"
    );
    let id = meta["id"].as_str().unwrap().to_string();
    l.send(
        "s1",
        json!({"id": "ok1", "op": "approve", "result": id}).to_string(),
    )
    .await;
    let topic = format!("takumi/s1/result/{id}");
    l.wait(30, |t, p| {
        t == topic && serde_json::from_slice::<Value>(p).is_ok_and(|v| v["state"] == "approved")
    })
    .await;
    for _ in 0..50 {
        if cfg.display.path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cfg.display.path.exists(),
        "the approved result was not displayed"
    );
    svc.stop().await.unwrap();
}

#[test]
fn round_trip_over_mosquitto() {
    let Some(m) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    rt().block_on(round_trip(
        station_cfg(d.path(), "s1", m.port, false),
        m.port,
    ));
}

#[test]
fn round_trip_over_the_embedded_broker() {
    let d = tempfile::tempdir().unwrap();
    rt().block_on(round_trip(station_cfg(d.path(), "s1", 0, true), 0));
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn bad_payloads_give_error_events_and_change_nothing() {
    let Some(m) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let cfg = station_cfg(d.path(), "s1", m.port, false);
    rt().block_on(async {
        let svc = takumi::appliance::service::start(cfg.clone()).await.unwrap();
        let mut l = line(m.port, "takumi/#").await;
        l.online("s1").await;
        learn_over_mqtt(&mut l).await;
        let store_before = listing(&cfg.store.dir);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json at all".to_vec(), "bad_command"),
            (json!({"id": "b1", "op": "explode"}).to_string().into_bytes(), "bad_command"),
            (json!({"id": "b2", "op": "apply", "template": 42}).to_string().into_bytes(), "bad_command"),
            (json!({"id": "b3", "op": "learn", "name": "x", "extra": 1}).to_string().into_bytes(), "bad_command"),
            (json!({"id": "b4", "op": "apply", "template": "nosuch", "mode": "next"}).to_string().into_bytes(), "unknown_template"),
            (json!({"id": "b5", "op": "approve", "result": "r-does-not-exist"}).to_string().into_bytes(), "unknown_result"),
            (json!({"id": "b6", "op": "learn", "name": "../evil"}).to_string().into_bytes(), "bad_name"),
            (json!({"id": "b7", "op": "apply", "template": "polish", "mode": "image", "image_jpeg_b64": "AAAA"}).to_string().into_bytes(), "bad_image"),
            (vec![b'x'; (1 << 20) + 10], "bad_command"),
        ];
        for (payload, code) in cases {
            l.send("s1", payload.clone()).await;
            let (_, p) = l
                .wait(30, |t, p| t == "takumi/s1/event" && serde_json::from_slice::<Value>(p).is_ok_and(|v| v["level"] == "error"))
                .await;
            let v: Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["code"], code, "payload {:?}: {v}", String::from_utf8_lossy(&payload[..payload.len().min(80)]));
        }
        assert_eq!(listing(&cfg.store.dir), store_before, "a bad command changed the store");
        // the station still works
        l.send("s1", json!({"id": "s", "op": "templates.list"}).to_string()).await;
        let (_, p) = l.wait(30, |t, _| t == "takumi/s1/templates").await;
        assert!(String::from_utf8_lossy(&p).contains("polish"));
        svc.stop().await.unwrap();
    });
}

/// Learns the sample pair as `polish` over MQTT and arms it on station s1.
async fn learn_and_arm(l: &mut Line) {
    learn_over_mqtt(l).await;
    l.send(
        "s1",
        json!({"id": "arm", "op": "apply", "template": "polish", "mode": "armed"}).to_string(),
    )
    .await;
    assert_eq!(l.event("s1", "arm").await["code"], "armed");
}

async fn learn_over_mqtt(l: &mut Line) {
    let b64 =
        |p: PathBuf| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
    l.send(
        "s1",
        json!({"id": "learn", "op": "learn", "name": "polish",
            "before_jpeg_b64": b64(samples().join("pair_before.jpg")),
            "after_jpeg_b64": b64(samples().join("pair_after.jpg"))})
        .to_string(),
    )
    .await;
    let e = l.event("s1", "learn").await;
    assert_eq!(e["code"], "learned", "{e}");
}

const FLEET_SEED: [u8; 32] = [7; 32];

#[test]
fn board_profiles_parse() {
    for p in ["host", "rpi4", "rpi5", "jetson-orin-nano"] {
        Config::load(&repo().join(format!("board/{p}.toml")))
            .unwrap_or_else(|e| panic!("{p}: {e}"));
    }
}

#[test]
fn overload_is_refused_with_events_and_status_stays_responsive() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = station_cfg(d.path(), "s1", 0, true);
    cfg.station.queue = 2;
    rt().block_on(async {
        let svc = takumi::appliance::service::start(cfg.clone()).await.unwrap();
        let port = svc.broker_port.unwrap();
        let mut l = line(port, "takumi/#").await;
        l.online("s1").await;
        learn_over_mqtt(&mut l).await;
        let img = base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(samples().join("captures/rocket.jpg")).unwrap());
        // a burst of expensive applies: far more than the queue of 2 holds
        for i in 0..40 {
            let cmd = json!({"id": format!("f{i}"), "op": "apply", "template": "polish", "mode": "image", "image_jpeg_b64": img});
            l.send("s1", cmd.to_string()).await;
        }
        l.send("s1", json!({"id": "st", "op": "status"}).to_string()).await;
        let mut overloaded = 0;
        let mut results = 0;
        let mut status_seen = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while results + overloaded < 40 || !status_seen {
            let Ok(Some((t, p))) = tokio::time::timeout_at(deadline, l.rx.recv()).await else {
                break;
            };
            if t == "takumi/s1/status" {
                status_seen = true;
            } else if t == "takumi/s1/event" {
                let v: Value = serde_json::from_slice(&p).unwrap();
                // one refused command per event, or several grouped in `request_ids`
                if v["code"] == "overloaded" {
                    overloaded += v["request_ids"].as_array().map_or(1, Vec::len);
                }
            } else if t.starts_with("takumi/s1/result/") && t.ends_with("/image") {
                results += 1;
            }
        }
        assert!(status_seen, "no status while overloaded");
        assert!(overloaded > 0, "nothing was refused ({results} results)");
        assert!(results >= 2, "the station stopped working ({results} results)");
        assert_eq!(results + overloaded, 40, "some commands got neither a result nor an event");
        // each refusal is counted once
        l.send("s1", json!({"id": "st2", "op": "status"}).to_string()).await;
        l.wait(30, |t, p| {
            t == "takumi/s1/status"
                && serde_json::from_slice::<Value>(p)
                    .is_ok_and(|v| v["counters"]["refused_commands"] == overloaded)
        })
        .await;
        svc.stop().await.unwrap();
    });
}

#[test]
fn armed_station_captures_on_its_interval() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = station_cfg(d.path(), "s1", 0, true);
    cfg.station.capture_interval_ms = 150;
    rt().block_on(async {
        let svc = takumi::appliance::service::start(cfg.clone())
            .await
            .unwrap();
        let mut l = line(svc.broker_port.unwrap(), "takumi/#").await;
        l.online("s1").await;
        learn_and_arm(&mut l).await;
        // no trigger is sent: the interval alone makes results
        for _ in 0..3 {
            l.wait(30, |t, _| {
                t.starts_with("takumi/s1/result/") && t.ends_with("/image")
            })
            .await;
        }
        l.send("s1", json!({"id": "off", "op": "disarm"}).to_string())
            .await;
        assert_eq!(l.event("s1", "off").await["code"], "disarmed");
        svc.stop().await.unwrap();
    });
}

/// One oversized QoS 1 command, and one oversized retained fleet message, on a mosquitto with
/// its default limits: each is dropped with an event, and the connection and later commands
/// survive (before, the client dropped the connection and the broker redelivered forever).
#[test]
fn oversized_messages_are_dropped_with_events_and_the_station_survives() {
    let Some(m) = mosquitto_with("") else { return };
    let d = tempfile::tempdir().unwrap();
    let mut cfg = station_cfg(d.path(), "s1", m.port, false);
    cfg.fleet.enabled = true;
    cfg.fleet.public_key = Some(fleet_public(FLEET_SEED));
    let big = vec![b'x'; 10 << 20];
    rt().block_on(async {
        let svc = takumi::appliance::service::start(cfg.clone())
            .await
            .unwrap();
        let mut l = line(m.port, "takumi/s1/#").await;
        l.online("s1").await;
        l.send("s1", big.clone()).await;
        let v = l.event_saying("s1", "dropped").await;
        assert_eq!(v["code"], "bad_command", "{v}");
        l.client
            .publish("takumi/fleet/template/big", QoS::AtLeastOnce, true, big)
            .await
            .unwrap();
        let v = l.event_saying("s1", "fleet template").await;
        assert_eq!(v["code"], "bad_template", "{v}");
        // later commands are answered, on the same connection
        l.send(
            "s1",
            json!({"id": "after", "op": "templates.list"}).to_string(),
        )
        .await;
        l.wait(30, |t, _| t == "takumi/s1/templates").await;
        l.send("s1", json!({"id": "st", "op": "status"}).to_string())
            .await;
        let (_, p) = l
            .wait(30, |t, p| {
                t == "takumi/s1/status"
                    && serde_json::from_slice::<Value>(p)
                        .is_ok_and(|v| v["link"]["oversized_incoming"] == 2)
            })
            .await;
        let st: Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(st["link"]["reconnects"], 0, "{st}");
        // clear the retained message so it does not outlive the test's broker state
        l.client
            .publish(
                "takumi/fleet/template/big",
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await
            .unwrap();
        svc.stop().await.unwrap();
    });
}

/// A TCP relay between the station and the broker, to fail the link in ways a broker restart
/// cannot: muted, it drops what the station sends (commands still arrive, no PUBACK ever comes
/// back, so the outbox fills); cut, it closes every connection and its port.
struct Relay {
    port: u16,
    to: u16,
    mute: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let mut r = Relay {
            port: free_port(),
            to,
            mute: Arc::new(AtomicBool::new(false)),
            task: None,
        };
        r.restore().await;
        r
    }

    fn mute(&self) {
        self.mute.store(true, Ordering::Relaxed);
    }

    /// Aborting the accept task drops its connections (a JoinSet) and the listener.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restore(&mut self) {
        self.mute.store(false, Ordering::Relaxed);
        let mut bound = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => {
                    bound = Some(l);
                    break;
                }
                // the cut listener is closed by its task's cancellation, shortly after `cut`
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let listener = bound.expect("relay port stays taken");
        let (to, mute) = (self.to, self.mute.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                conns.spawn(relay_conn(down, to, mute.clone()));
            }
        }));
    }
}

async fn relay_conn(down: tokio::net::TcpStream, to: u16, mute: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
        return;
    };
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    let upstream = async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = down_r.read(&mut buf).await {
            if !mute.load(Ordering::Relaxed) && up_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

fn outbox_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        })
        .unwrap_or(0)
}

async fn until_entries(dir: &Path, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while outbox_entries(dir) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox holds {} entries, waited for {n}",
            outbox_entries(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The broker never acks (the station's packets are dropped on the way; commands still reach it),
/// so a 4-entry outbox fills with armed interval results (2 entries each). Then captures pause with exactly one
/// `overloaded` event, a command is refused with its own, both are counted, and both events are
/// on disk in the outbox and arrive once the link is back.
#[test]
fn a_full_outbox_refuses_work_with_events_that_outlive_the_outage() {
    let Some(m) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut relay = Relay::start(m.port).await;
        let mut cfg = station_cfg(d.path(), "s1", relay.port, false);
        cfg.station.capture_interval_ms = 200;
        cfg.outbox.max_entries = 4;
        let outbox = cfg.outbox.dir.clone();
        let svc = takumi::appliance::service::start(cfg).await.unwrap();
        let mut l = line(m.port, "takumi/s1/#").await;
        l.online("s1").await;
        learn_and_arm(&mut l).await;
        l.wait(60, |t, _| {
            t.starts_with("takumi/s1/result/") && t.ends_with("/image")
        })
        .await;

        relay.mute();
        // 2 results unacked, then the captures-paused event in the reserve
        until_entries(&outbox, 5).await;
        tokio::time::sleep(Duration::from_secs(1)).await; // several more ticks, all refused
        let before = outbox_entries(&outbox);
        l.send(
            "s1",
            json!({"id": "late", "op": "templates.list"}).to_string(),
        )
        .await;
        until_entries(&outbox, before + 1).await; // its refusal, stored although the outbox is full
        relay.cut();
        relay.restore().await;

        let mut paused = 0;
        let mut late = None;
        while late.is_none() || paused == 0 {
            let (t, p) = l.wait(60, |t, _| t == "takumi/s1/event").await;
            let v: Value = serde_json::from_slice(&p).unwrap();
            if v["message"]
                .as_str()
                .is_some_and(|m| m.contains("captures paused"))
            {
                assert_eq!(v["code"], "overloaded", "{t}: {v}");
                paused += 1;
            }
            if v["request_id"] == "late" && late.is_none() {
                late = Some(v);
            }
        }
        let late = late.unwrap();
        assert_eq!(late["code"], "overloaded", "{late}");
        assert!(
            late["message"].as_str().unwrap().contains("outbox is full"),
            "{late}"
        );

        l.send("s1", json!({"id": "off", "op": "disarm"}).to_string())
            .await;
        l.send("s1", json!({"id": "st", "op": "status"}).to_string())
            .await;
        let mut status = None;
        while status.is_none() {
            let (t, p) = l
                .wait(60, |t, _| t == "takumi/s1/event" || t == "takumi/s1/status")
                .await;
            let v: Value = serde_json::from_slice(&p).unwrap();
            if t.ends_with("/status") && v["counters"]["refused_captures"].as_u64() > Some(1) {
                status = Some(v);
            } else if v["message"]
                .as_str()
                .is_some_and(|m| m.contains("captures paused"))
            {
                paused += 1;
            }
        }
        assert_eq!(paused, 1, "captures paused more than once");
        let c = &status.unwrap()["counters"];
        assert!(c["refused_commands"].as_u64() >= Some(1), "{c}");
        assert_eq!(c["dropped_events"], 0, "{c}");
        assert_eq!(c["dropped_results"], 0, "{c}");
        svc.stop().await.unwrap();
    });
}

/// A 4K pair sent over MQTT to a station on a board's memory budget (`memory_mb = 480` under
/// `MemoryMax=512M`): learn works downscaled and says so; applying to a 4K frame would need
/// more than the budget, so it is refused up front with an event, and the station goes on.
#[test]
fn four_k_work_on_a_board_budget_is_learned_downscaled_or_refused_with_an_event() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = station_cfg(d.path(), "s1", 0, true);
    cfg.engine.memory_mb = 480;
    cfg.station.max_payload_bytes = 12 << 20;
    let jpeg_4k = |name: &str| {
        let img = image::open(samples().join(name)).unwrap().to_rgb8();
        let big = image::imageops::resize(&img, 3840, 2160, image::imageops::FilterType::Triangle);
        let mut out = std::io::Cursor::new(Vec::new());
        big.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        b64(out.get_ref())
    };
    let (before, after) = (jpeg_4k("pair_before.jpg"), jpeg_4k("pair_after.jpg"));
    rt().block_on(async {
        let svc = takumi::appliance::service::start(cfg.clone())
            .await
            .unwrap();
        let mut l = line(svc.broker_port.unwrap(), "takumi/#").await;
        l.online("s1").await;
        let learn = json!({"id": "learn", "op": "learn", "name": "big",
            "before_jpeg_b64": before, "after_jpeg_b64": after});
        l.send("s1", learn.to_string()).await;
        let e = l.event("s1", "learn").await;
        assert_eq!(e["code"], "learned", "{e}");
        let said = e["message"].as_str().unwrap();
        assert!(said.contains("(downscaled from 3840x2160)"), "{said}");
        let apply = json!({"id": "apply", "op": "apply", "template": "big", "mode": "image",
            "image_jpeg_b64": before});
        l.send("s1", apply.to_string()).await;
        let e = l.event("s1", "apply").await;
        assert_eq!(e["code"], "apply_failed", "{e}");
        assert!(e["message"].as_str().unwrap().contains("memory_mb"), "{e}");
        // the station goes on: it answers, and the template is still listed
        l.send(
            "s1",
            json!({"id": "ls", "op": "templates.list"}).to_string(),
        )
        .await;
        l.wait(30, |t, p| {
            t == "takumi/s1/templates" && String::from_utf8_lossy(p).contains("\"big\"")
        })
        .await;
        svc.stop().await.unwrap();
    });
}
