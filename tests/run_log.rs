//! `takumi run` as an operator meets it: what it logs (plain text when stderr is not a
//! terminal, info by default, `TAKUMI_LOG`/`RUST_LOG` override), and a taken broker port
//! refused with the config key to change. Every station here uses its own port, never 1883.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use takumi::publish::broker::EmbeddedBroker;
use takumi::publish::mqtt::LinkError;

/// A station on a synthetic camera with the embedded broker on `port`.
fn station_toml(dir: &Path, id: &str, port: u16) -> PathBuf {
    let text = format!(
        "[engine]\nmodels = \"{models}\"\nthreads = 1\n\
         [store]\ndir = \"{dir}/store\"\n\
         [station]\nid = \"{id}\"\n\
         [camera]\nkind = \"synthetic\"\nwidth = 320\nheight = 240\n\
         [mqtt]\nport = {port}\n[broker]\nembedded = true\n\
         [outbox]\ndir = \"{dir}/outbox\"\n\
         [display]\nkind = \"png\"\npath = \"{dir}/display.png\"\nwidth = 320\nheight = 240\n",
        models = models().display(),
        dir = dir.display()
    );
    let p = dir.join(format!("{id}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// `takumi`, its log settings left at their defaults.
fn quiet_env(store: &Path) -> Command {
    let mut c = takumi(store);
    c.env_remove("RUST_LOG")
        .env_remove("TAKUMI_LOG")
        .env_remove("NO_COLOR");
    c
}

/// Kills the station when the test ends, however it ends.
/// `takumi run` with `cfg`, its stderr read line by line.
fn run_station(store: &Path, cfg: &Path) -> (Child, Receiver<String>) {
    let mut child = quiet_env(store)
        .arg("--config")
        .arg(cfg)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    (child, rx)
}

struct Station(Child);

impl Drop for Station {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every stderr line, as it comes.
fn stderr_lines(child: &mut Child) -> Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines into `seen` until one satisfies `want`; panics with all of them on timeout.
fn wait_line(rx: &Receiver<String>, seen: &mut Vec<String>, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if want(&l) {
                    return l;
                }
            }
            Err(_) => break,
        }
    }
    panic!("line not logged; stderr so far:\n{}", seen.join("\n"));
}

/// The value of ` key=value` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in: {line}"));
    line[at + key.len() + 2..].split(' ').next().unwrap()
}

/// An MQTT client on `port` that has seen `takumi/<id>/available` go online (so the station
/// is subscribed to its commands).
fn line_client(port: u16, id: &str) -> Client {
    let (client, mut conn) = Client::new(MqttOptions::new("run-log-line", "127.0.0.1", port), 16);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for e in conn.iter() {
            if let Ok(Event::Incoming(Packet::Publish(p))) = e
                && tx.send(p.payload.to_vec()).is_err()
            {
                break;
            }
        }
    });
    client
        .subscribe(format!("takumi/{id}/available"), QoS::AtLeastOnce)
        .unwrap();
    let online = |p: Vec<u8>| p == b"online";
    while !online(
        rx.recv_timeout(Duration::from_secs(60))
            .expect("not online"),
    ) {}
    client
}

fn send(c: &Client, id: &str, cmd: &str) {
    c.publish(format!("takumi/{id}/cmd"), QoS::AtLeastOnce, false, cmd)
        .unwrap();
}

#[test]
fn run_logs_start_up_commands_and_results_in_plain_text() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    learn_sample(&store, "warm");
    let t = takumi::store::TemplateStore::open(&store).unwrap();
    let model = t
        .load(&takumi::store::TemplateName::new("warm").unwrap())
        .unwrap()
        .model_hash;
    let cfg = station_toml(d.path(), "logs", 0);
    let (child, rx) = run_station(&store, &cfg);
    let _station = Station(child);
    let mut seen = Vec::new();

    let first = wait_line(&rx, &mut seen, |l| l.contains("station starting"));
    assert_eq!(field(&first, "version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field(&first, "model"), model);
    assert_eq!(field(&first, "precision"), "float");
    assert_eq!(field(&first, "station"), "logs");
    let broker = wait_line(&rx, &mut seen, |l| l.contains("broker: embedded"));
    let port: u16 = field(&broker, "addr")
        .strip_prefix("127.0.0.1:")
        .expect("a loopback address")
        .parse()
        .unwrap();
    let topics = wait_line(&rx, &mut seen, |l| l.contains(" topics "));
    assert_eq!(field(&topics, "cmd"), "takumi/logs/cmd");
    assert_eq!(field(&topics, "results"), "takumi/logs/result/<id>");
    let camera = wait_line(&rx, &mut seen, |l| l.contains(" camera "));
    assert!(camera.ends_with("source=synthetic 320x240"), "{camera}");
    let display = wait_line(&rx, &mut seen, |l| l.contains(" display "));
    let png = d.path().join("display.png");
    assert!(display.ends_with(&format!("output=png {} 320x240", png.display())));

    // the logged address is the broker's: commands sent there are logged, and so is the result
    let c = line_client(port, "logs");
    send(&c, "logs", r#"{"id":"a1","op":"apply","template":"warm"}"#);
    send(&c, "logs", r#"{"id":"t1","op":"trigger"}"#);
    let apply = wait_line(&rx, &mut seen, |l| l.contains(" command id=a1"));
    assert!(
        apply.ends_with("command id=a1 op=apply template=warm"),
        "{apply}"
    );
    wait_line(&rx, &mut seen, |l| l.ends_with("command id=t1 op=trigger"));
    let result = wait_line(&rx, &mut seen, |l| l.contains(" result id="));
    assert_eq!(field(&result, "template"), "warm");
    assert_eq!(field(&result, "request"), "a1");
    assert!(field(&result, "latency_ms").parse::<f32>().unwrap() > 0.0);
    let score: f32 = field(&result, "score").parse().unwrap();
    assert!((0.0..=1.0).contains(&score), "{result}");
    let state = field(&result, "state");
    assert!(["pending", "needs_review"].contains(&state), "{result}");

    assert!(
        seen.iter().all(|l| !l.contains('\x1b')),
        "colour codes on a pipe:\n{}",
        seen.join("\n")
    );
    assert!(
        seen.iter()
            .all(|l| l.contains(" INFO ") || l.contains(" WARN "))
    );
}

#[test]
fn run_names_the_port_key_when_the_broker_port_is_taken() {
    let d = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = station_toml(d.path(), "busy", port);
    let (child, rx) = run_station(&d.path().join("store"), &cfg);
    let mut station = Station(child);
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(s) = station.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "takumi run did not give up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let err: Vec<String> = rx.iter().collect();
    assert!(!status.success());
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].starts_with("error: config mqtt.port: "),
        "{}",
        err[0]
    );
    assert!(err[0].contains(&format!("127.0.0.1:{port} is already in use")));
    drop(taken);
}

#[test]
fn embedded_broker_refuses_a_port_already_listened_on() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    match EmbeddedBroker::start(addr.port()) {
        Err(LinkError::PortInUse { addr: a }) => assert_eq!(a, addr),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started a broker on a taken port"),
    }
}

/// The log level: info by default, `RUST_LOG` overrides it, `TAKUMI_LOG` overrides both.
#[test]
fn log_level_follows_takumi_log_then_rust_log() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let stderr = |vars: &[(&str, &str)]| {
        let mut c = quiet_env(&store);
        c.args(["templates", "list"]).envs(vars.iter().copied());
        let o = c.output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // takumi logs its matrix kernels at debug level on every command
    let kernels = "tract-linalg kernels";
    assert!(!stderr(&[]).contains(kernels));
    assert!(stderr(&[("RUST_LOG", "takumi=debug")]).contains(kernels));
    assert!(!stderr(&[("TAKUMI_LOG", "warn"), ("RUST_LOG", "debug")]).contains(kernels));
}

/// The host profile's broker is on the documented fixed port, and the README says how to reach it.
#[test]
fn host_profile_broker_is_on_1883_and_documented() {
    let host = takumi::config::Config::load(&repo().join("board/host.toml")).unwrap();
    assert!(host.broker.embedded);
    assert_eq!(host.mqtt.port, 1883);
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for s in [
        "mosquitto_sub -p 1883",
        "mosquitto_pub -p 1883 -t takumi/host/cmd",
        "embedded = false",
    ] {
        assert!(readme.contains(s), "README lacks {s:?}");
    }
}
