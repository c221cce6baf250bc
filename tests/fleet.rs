//! Fleet trust over a real mosquitto: templates go to the fleet only by `templates.publish` on
//! the admin topic, after an approval; they carry a version and a signer, and a station refuses
//! a version not newer than the one it holds (a replay) and the unversioned `TKS1` format. With
//! the ACL of docs/mqtt.md, only the operator's account reaches the admin topic.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use takumi::config::Config;
use takumi::store::Template;

const SEED: [u8; 32] = [7; 32];
const FLEET_TOPIC: &str = "takumi/fleet/template/polish";

/// A station on `port`, camera = a folder holding the sample pair; in the fleet when `fleet`,
/// with the signing key when `signing`.
fn station_cfg(dir: &Path, id: &str, port: u16, fleet: bool, signing: bool) -> Config {
    let mut cfg = station_config(dir, id, port);
    cfg.fleet.enabled = fleet;
    if fleet {
        cfg.fleet.public_key = Some(fleet_public(SEED));
    }
    if signing {
        let key = dir.join("fleet.key");
        std::fs::write(&key, b64(&SEED)).unwrap();
        cfg.fleet.signing_key_file = Some(key);
    }
    cfg
}

/// An MQTT client that reads everything under `takumi/`: the line, the operator.
struct Client {
    client: AsyncClient,
    rx: tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
    /// Messages received but put back for the next wait, oldest first.
    back: std::collections::VecDeque<(String, Vec<u8>)>,
}

async fn client(port: u16, account: Option<(&str, &str)>) -> Client {
    let mut o = MqttOptions::new(format!("client-{}", free_port()), "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    if let Some((user, password)) = account {
        o.set_credentials(user, password);
    }
    let (client, mut ev) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec())).await;
            }
        }
    });
    client
        .subscribe("takumi/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    Client {
        client,
        rx,
        back: Default::default(),
    }
}

fn is_event(p: &[u8], f: impl Fn(&Value) -> bool) -> bool {
    serde_json::from_slice::<Value>(p).is_ok_and(|v| f(&v))
}

impl Client {
    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        let p = payload.into();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, p)
            .await
            .unwrap();
    }

    async fn cmd(&self, station: &str, cmd: Value) {
        let topic = format!("takumi/{station}/cmd");
        self.publish(&topic, cmd.to_string(), false).await;
    }

    async fn admin(&self, station: &str, cmd: Value) {
        let topic = format!("takumi/{station}/admin");
        self.publish(&topic, cmd.to_string(), false).await;
    }

    /// Every message up to and including the first that `f` takes.
    async fn until(&mut self, mut f: impl FnMut(&str, &[u8]) -> bool) -> Vec<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let next = match self.back.pop_front() {
                Some(m) => Ok(Some(m)),
                None => tokio::time::timeout_at(deadline, self.rx.recv()).await,
            };
            let Ok(m) = next else {
                let said: Vec<String> = seen
                    .iter()
                    .map(|(t, p): &(String, Vec<u8>)| {
                        let p = &p[..p.len().min(300)];
                        format!("{t}: {}", String::from_utf8_lossy(p))
                    })
                    .collect();
                panic!(
                    "timed out waiting for the station; seen:\n{}",
                    said.join("\n")
                );
            };
            let m = m.expect("client closed");
            let done = f(&m.0, &m.1);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    async fn wait(&mut self, f: impl FnMut(&str, &[u8]) -> bool) -> Vec<u8> {
        self.until(f).await.pop().map(|m| m.1).unwrap_or_default()
    }

    /// The next event of `station` for `request`.
    async fn event(&mut self, station: &str, request: &str) -> Value {
        let t = format!("takumi/{station}/event");
        let p = self
            .wait(|topic, p| topic == t && is_event(p, |v| v["request_id"] == request))
            .await;
        serde_json::from_slice(&p).unwrap()
    }

    /// The next event of `station` with `code`.
    async fn coded(&mut self, station: &str, code: &str) -> Value {
        let t = format!("takumi/{station}/event");
        let p = self
            .wait(|topic, p| topic == t && is_event(p, |v| v["code"] == code))
            .await;
        serde_json::from_slice(&p).unwrap()
    }

    async fn online(&mut self, station: &str) {
        let t = format!("takumi/{station}/available");
        self.wait(|topic, p| topic == t && p == b"online").await;
    }

    /// The code of the event that `cmd` (with `id`) on the admin topic of `station` gets.
    async fn admin_code(&mut self, station: &str, cmd: Value) -> Value {
        let id = cmd["id"].as_str().unwrap().to_string();
        self.admin(station, cmd).await;
        self.event(station, &id).await
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn sample_b64(name: &str) -> String {
    b64(&std::fs::read(samples().join(name)).unwrap())
}

/// Learns `polish` on `station` from the sample pair (swapped: the reverse edit).
async fn learn(c: &mut Client, station: &str, swapped: bool) {
    let (b, a) = match swapped {
        false => ("pair_before.jpg", "pair_after.jpg"),
        true => ("pair_after.jpg", "pair_before.jpg"),
    };
    let id = format!("learn-{swapped}");
    let cmd = json!({"id": id, "op": "learn", "name": "polish",
        "before_jpeg_b64": sample_b64(b), "after_jpeg_b64": sample_b64(a)});
    c.cmd(station, cmd).await;
    let e = c.event(station, &id).await;
    assert_eq!(e["code"], "learned", "{e}");
}

/// Applies `polish` on `station` to a sent image and approves the result (as the line does).
async fn approve_a_result(c: &mut Client, station: &str, n: u32) {
    let id = format!("apply-{n}");
    let cmd = json!({"id": id, "op": "apply", "template": "polish", "mode": "image",
        "image_jpeg_b64": sample_b64("pair_before.jpg")});
    c.cmd(station, cmd).await;
    let prefix = format!("takumi/{station}/result/");
    let meta = c
        .wait(|t, p| {
            t.starts_with(&prefix)
                && !t.ends_with("/image")
                && is_event(p, |v| v["request_id"] == id)
        })
        .await;
    let result = serde_json::from_slice::<Value>(&meta).unwrap()["id"].clone();
    c.cmd(
        station,
        json!({"id": format!("ok-{n}"), "op": "approve", "result": result}),
    )
    .await;
    c.wait(|t, p| t.starts_with(&prefix) && is_event(p, |v| v["state"] == "approved"))
        .await;
}

fn publish(id: &str) -> Value {
    json!({"id": id, "op": "templates.publish", "name": "polish"})
}

/// The version and signer in a `TKS2` payload's body.
fn version_and_signer(p: &[u8]) -> (u64, String) {
    assert_eq!(&p[..4], b"TKS2");
    let version = u64::from_le_bytes(p[68..76].try_into().unwrap());
    let len = usize::from(u16::from_le_bytes([p[76], p[77]]));
    (
        version,
        String::from_utf8(p[78..78 + len].to_vec()).unwrap(),
    )
}

/// After `templates.publish` of `polish` with `id` on s1: its `published` event, and its
/// payload on the fleet topic (stored before the event, so it may arrive first). What else
/// came meanwhile (the receivers' events) is put back for the next wait.
async fn published(c: &mut Client, id: &str) -> (Value, Vec<u8>) {
    let (mut event, mut payload, mut other) = (None, None, Vec::new());
    while event.is_none() || payload.is_none() {
        let (t, p) = c.until(|_, _| true).await.remove(0);
        if t == FLEET_TOPIC && !p.is_empty() && payload.is_none() {
            payload = Some(p);
        } else if t == "takumi/s1/event" && is_event(&p, |v| v["request_id"] == id) {
            let v: Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(v["code"], "published", "{v}");
            event = Some(v);
        } else {
            other.push((t, p));
        }
    }
    c.back.extend(other);
    (event.unwrap_or_default(), payload.unwrap_or_default())
}

fn stored(cfg: &Config) -> Vec<u8> {
    std::fs::read(cfg.store.dir.join("polish.tkt")).unwrap()
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

/// s1 teaches (signing key), s2 learns from the fleet, s3 is local-only. Publishing waits for
/// the admin topic and an approval; versions advance, and an old or unversioned payload is
/// refused; approvals and versions survive a restart; a new learn needs a new approval.
#[test]
fn publish_needs_the_admin_topic_and_an_approval_and_replays_are_refused() {
    let Some(m) = mosquitto() else { return };
    let d = tempfile::tempdir().unwrap();
    let c1 = station_cfg(d.path(), "s1", m.port, true, true);
    let c2 = station_cfg(d.path(), "s2", m.port, true, false);
    let c3 = station_cfg(d.path(), "s3", m.port, false, false);
    rt().block_on(async {
        let s1 = takumi::appliance::service::start(c1.clone()).await.unwrap();
        let s2 = takumi::appliance::service::start(c2.clone()).await.unwrap();
        let s3 = takumi::appliance::service::start(c3.clone()).await.unwrap();
        let mut c = client(m.port, None).await;
        for s in ["s1", "s2", "s3"] {
            c.online(s).await;
        }
        learn(&mut c, "s1", false).await;
        let v1 = refusals_then_version_1(&mut c, &c2).await;
        let v2 = version_2_replaces_the_armed_template(&mut c, &c1, &c2).await;
        replays_are_refused(&mut c, &c2, &v1, &v2).await;
        s1.stop().await.unwrap();
        // approvals and versions were kept in the store folder
        let s1 = takumi::appliance::service::start(c1.clone()).await.unwrap();
        c.online("s1").await;
        c.admin("s1", publish("p3")).await;
        assert_eq!(version_and_signer(&published(&mut c, "p3").await.1).0, 3);
        assert!(message(&c.coded("s2", "installed").await).contains("version 3 from s1"));
        // a template learned again has no approval yet
        learn(&mut c, "s1", true).await;
        assert_eq!(
            c.admin_code("s1", publish("p4")).await["code"],
            "not_approved"
        );
        // the local-only station ignored the fleet topic
        assert!(!c3.store.dir.join("polish.tkt").exists());
        for s in [s1, s2, s3] {
            s.stop().await.unwrap();
        }
    });
}

/// Refused on cmd, on a station without the key, and before an approval; then version 1.
async fn refusals_then_version_1(c: &mut Client, c2: &Config) -> Vec<u8> {
    c.cmd("s1", publish("p-cmd")).await;
    let e = c.event("s1", "p-cmd").await;
    assert_eq!(e["code"], "admin_only", "{e}");
    assert!(message(&e).contains("takumi/s1/admin"), "{e}");
    let e = c.admin_code("s2", publish("p-nokey")).await;
    assert_eq!(e["code"], "no_signing_key", "{e}");
    let e = c.admin_code("s1", publish("p0")).await;
    assert_eq!(e["code"], "not_approved", "{e}");
    // learn published nothing
    assert!(!c2.store.dir.join("polish.tkt").exists());

    approve_a_result(c, "s1", 1).await;
    c.admin("s1", publish("p1")).await;
    let (e, v1) = published(c, "p1").await;
    assert!(message(&e).contains("version 1"), "{e}");
    assert_eq!(version_and_signer(&v1), (1, "s1".to_string()));
    let e = c.coded("s2", "installed").await;
    assert!(message(&e).contains("version 1 from s1"), "{e}");
    v1
}

/// Version 2 over the template s2 has armed: said with a warning, and the next capture uses it.
async fn version_2_replaces_the_armed_template(
    c: &mut Client,
    c1: &Config,
    c2: &Config,
) -> Vec<u8> {
    let arm = json!({"id": "arm", "op": "apply", "template": "polish", "mode": "armed"});
    c.cmd("s2", arm).await;
    assert_eq!(c.event("s2", "arm").await["code"], "armed");
    c.admin("s1", publish("p2")).await;
    let v2 = published(c, "p2").await.1;
    assert_eq!(version_and_signer(&v2), (2, "s1".to_string()));
    // said after the `installed` event, in the order the station made them
    let seen = c
        .until(|t, p| {
            t == "takumi/s2/event" && is_event(p, |v| v["code"] == "armed_template_replaced")
        })
        .await;
    let e: Value = serde_json::from_slice(&seen[seen.len() - 1].1).unwrap();
    assert_eq!(e["level"], "warning", "{e}");
    for part in ["polish", "version 1 -> 2", "s1"] {
        assert!(message(&e).contains(part), "{e}");
    }
    let installed = seen.iter().any(|(t, p)| {
        t == "takumi/s2/event"
            && is_event(p, |v| {
                v["code"] == "installed" && message(v).contains("version 2 from s1")
            })
    });
    assert!(installed, "no installed event for version 2");
    let ours = Template::from_bytes(&stored(c2)).unwrap();
    assert!(ours == Template::from_bytes(&stored(c1)).unwrap());
    c.cmd("s2", json!({"id": "t2", "op": "trigger"})).await;
    c.wait(|t, p| t.starts_with("takumi/s2/result/") && is_event(p, |v| v["template"] == "polish"))
        .await;
    v2
}

/// The version-1 payload again (retained), a `TKS1` payload and forgeries: each refused with
/// its event, the template unchanged; `templates.install` follows the same rules.
async fn replays_are_refused(c: &mut Client, c2: &Config, v1: &[u8], v2: &[u8]) {
    let before = stored(c2);
    c.publish(FLEET_TOPIC, v1.to_vec(), true).await;
    let e = c.coded("s2", "stale_template").await;
    for part in ["version 1", "version 2", "s1"] {
        assert!(message(&e).contains(part), "{e}");
    }
    assert_eq!(stored(c2), before, "the replay changed the template");
    let file = &v2[78 + "s1".len()..]; // the template file after the signer
    let old = {
        use ed25519_dalek::Signer;
        let sig = ed25519_dalek::SigningKey::from_bytes(&SEED).sign(file);
        [b"TKS1".as_slice(), &sig.to_bytes(), file].concat()
    };
    let mut tampered = v2.to_vec();
    tampered[70] ^= 1; // the version
    let forged = "takumi/fleet/template/forged";
    for (payload, code) in [
        (old.clone(), "unversioned_template"),
        (tampered, "forged_template"),
        (file.to_vec(), "forged_template"),
    ] {
        c.publish(forged, payload, true).await;
        let e = c.coded("s2", code).await;
        assert!(message(&e).contains("refused"), "{e}");
    }
    c.publish(forged, Vec::new(), true).await;
    for (id, payload, code) in [
        ("i1", v1, "stale_template"),
        ("i2", &old, "unversioned_template"),
    ] {
        let cmd = json!({"id": id, "op": "templates.install", "template_b64": b64(payload)});
        c.cmd("s2", cmd).await;
        assert_eq!(c.event("s2", id).await["code"], code);
    }
    assert_eq!(stored(c2), before);
    // the retained version 2 again (a reconnect) is no event; clear the replay off the topic
    c.publish(FLEET_TOPIC, v2.to_vec(), true).await;
}

/// With the password file and ACL of docs/mqtt.md, the line's `templates.publish` on admin is
/// dropped by the broker (no event, nothing on the fleet topic), as is its write to the fleet
/// topic; the operator's publish goes through.
#[test]
fn acl_lets_only_the_operator_publish() {
    let d = tempfile::tempdir().unwrap();
    let Some(m) = secured_broker(d.path()) else {
        return;
    };
    let mut cfg = station_cfg(d.path(), "s1", m.port, true, true);
    cfg.mqtt.username = Some("s1".into());
    let pw = d.path().join("s1.pw");
    std::fs::write(&pw, "pw-s1\n").unwrap();
    cfg.mqtt.password_file = Some(pw);
    rt().block_on(async {
        let s1 = takumi::appliance::service::start(cfg).await.unwrap();
        let mut line = client(m.port, Some(("line", "pw-line"))).await;
        line.online("s1").await;
        learn(&mut line, "s1", false).await;
        approve_a_result(&mut line, "s1", 1).await;
        line.admin("s1", publish("line-pub")).await;
        line.publish("takumi/fleet/template/x", b"TKS2 forged".to_vec(), true)
            .await;
        // the station takes messages in order: once it answers this, it would have said
        // something about the two before it, had the broker let them through
        line.cmd("s1", json!({"id": "after", "op": "templates.list"}))
            .await;
        let seen = line
            .until(|t, p| t == "takumi/s1/templates" && is_event(p, |v| v["request_id"] == "after"))
            .await;
        for (t, p) in &seen {
            assert!(
                !t.starts_with("takumi/fleet/"),
                "the line wrote the fleet topic"
            );
            let said = is_event(p, |v| {
                v["request_id"] == "line-pub" || v["code"] == "forged_template"
            });
            assert!(!said, "{t}: {}", String::from_utf8_lossy(p));
        }
        // the broker's doing, not the station's: it says it denied them
        let log = m.log();
        for topic in ["'takumi/s1/admin'", "'takumi/fleet/template/x'"] {
            let denied = log
                .lines()
                .any(|l| l.contains("Denied PUBLISH") && l.contains(topic));
            assert!(denied, "no denial of {topic}:\n{log}");
        }
        let op = client(m.port, Some(("operator", "pw-operator"))).await;
        op.admin("s1", publish("op-pub")).await;
        let (_, payload) = published(&mut line, "op-pub").await;
        assert_eq!(version_and_signer(&payload), (1, "s1".to_string()));
        s1.stop().await.unwrap();
    });
}

/// mosquitto with accounts s1, line and operator (password `pw-<account>`) and the ACL of
/// docs/mqtt.md; None (the test skips) without mosquitto or mosquitto_passwd.
fn secured_broker(dir: &Path) -> Option<Mosquitto> {
    let passwd_bin = mosquitto_passwd()?;
    let (passwd, acl) = (dir.join("takumi.passwd"), dir.join("takumi.acl"));
    for (i, user) in ["s1", "line", "operator"].into_iter().enumerate() {
        let mut cmd = std::process::Command::new(&passwd_bin);
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let ok = cmd
            .arg(&passwd)
            .args([user, &format!("pw-{user}")])
            .status();
        assert!(ok.unwrap().success(), "mosquitto_passwd {user}");
    }
    std::fs::write(&acl, docs_acl()).unwrap();
    let conf = format!(
        "password_file {}\nacl_file {}",
        passwd.display(),
        acl.display()
    );
    Mosquitto::start_secured(&conf)
}

/// The ACL file of docs/mqtt.md, as an operator would copy it.
fn docs_acl() -> String {
    let text = std::fs::read_to_string(repo().join("docs/mqtt.md")).unwrap();
    let after = text
        .split_once("`/etc/mosquitto/takumi.acl`:")
        .expect("docs/mqtt.md shows the ACL file")
        .1;
    let block = after.split_once("```text\n").unwrap().1;
    block.split_once("```").unwrap().0.to_string()
}
