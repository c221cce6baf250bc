//! The systemd unit, and the service's readiness and watchdog notifications caught on a real
//! datagram socket at $NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The unit with ExecStart pointing at a binary that exists here (the real path is only on boards).
fn unit_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo().join("systemd/takumi.service")).unwrap();
    let p = dir.join("takumi.service");
    std::fs::write(&p, text.replace("/usr/bin/takumi", "/bin/true")).unwrap();
    p
}

#[test]
fn unit_verifies_and_is_hardened() {
    if !have("systemd-analyze") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze missing under CI"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let unit = unit_copy(d.path());
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    let score: f32 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(score <= 3.0, "exposure {score} > 3.0");
    let unit_text = std::fs::read_to_string(repo().join("systemd/takumi.service")).unwrap();
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=",
        "DeviceAllow=",
        "ProtectSystem=strict",
    ] {
        assert!(unit_text.contains(key), "unit lacks {key}");
    }
}

fn station_config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let cfg = format!(
        r#"
[engine]
models = "{models}"
threads = 1
[store]
dir = "{dir}/store"
[station]
id = "wd"
watchdog_s = 2
status_interval_s = 1
[camera]
kind = "synthetic"
width = 320
height = 240
[mqtt]
port = {port}
[broker]
embedded = true
[outbox]
dir = "{dir}/outbox"
"#,
        models = models().display(),
        dir = dir.display()
    );
    let p = dir.join("wd.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn pings(sock: &UnixDatagram, secs: f32) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs_f32(secs);
    let mut out = vec![];
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

#[test]
fn ready_then_watchdog_pings_stop_when_the_pipeline_stalls() {
    let d = tempfile::tempdir().unwrap();
    let sock_path = d.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = station_config(d.path(), port);
    let mut child = Command::new(env!("CARGO_BIN_EXE_takumi"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("TAKUMI_TEST_STALL", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = pings(&sock, 10.0);
    assert!(
        first.iter().any(|m| m.contains("READY=1")),
        "no READY: {first:?}"
    );
    assert!(
        first.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "no watchdog pings: {first:?}"
    );
    // any command reaches the pipeline thread, which the test hook then blocks
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = rumqttc::MqttOptions::new("wd-test", "127.0.0.1", port);
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 8);
        client
            .publish(
                "takumi/wd/cmd",
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"id":"x","op":"templates.list"}"#,
            )
            .await
            .unwrap();
        // drive the connection until the broker acknowledges the command
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, ev.poll()).await {
            if matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) {
                break;
            }
        }
    });
    // within the watchdog interval the pings stop (systemd would then restart the service)
    let _ = pings(&sock, 2.0);
    let after = pings(&sock, 3.0);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !after.iter().any(|m| m.contains("WATCHDOG=1")),
        "pings went on while stalled: {after:?}"
    );
}
