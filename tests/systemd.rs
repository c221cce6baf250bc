//! The systemd unit, the service's readiness and watchdog notifications caught on a real
//! datagram socket at $NOTIFY_SOCKET, and every system call the real binary makes (traced with
//! strace) checked against the unit's SystemCallFilter= as systemd-analyze expands it.

mod common;

use std::collections::{BTreeSet, HashMap};
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
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=",
        "DeviceAllow=",
        "ProtectSystem=strict",
    ] {
        assert!(unit_text.contains(key), "unit lacks {key}");
    }
    // a fixed WatchdogSec= would override [station] watchdog_s; takumi sends the config's
    let fixed = unit_text
        .lines()
        .any(|l| l.trim_start().starts_with("WatchdogSec="));
    assert!(!fixed, "the unit fixes WatchdogSec=");
    let guide = std::fs::read_to_string(repo().join("board/README.md")).unwrap();
    assert!(
        guide.contains("systemctl edit takumi") && guide.contains("IPAddressAllow="),
        "board/README.md does not say how to allow the plant's broker"
    );
}

/// The synthetic test pattern as the camera.
const PATTERN: &str = "kind = \"synthetic\"\nwidth = 320\nheight = 240";

fn station_config(
    dir: &std::path::Path,
    port: u16,
    watchdog_s: u64,
    camera: &str,
) -> std::path::PathBuf {
    let cfg = format!(
        r#"
[engine]
models = "{models}"
threads = 1
[store]
dir = "{dir}/store"
[station]
id = "wd"
watchdog_s = {watchdog_s}
status_interval_s = 1
[camera]
{camera}
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
    let (sock_path, sock) = notify_socket(d.path());
    let port = free_port();
    // a camera that hangs for real: a folder whose one frame is a named pipe no one writes
    let cam = d.path().join("cam");
    std::fs::create_dir(&cam).unwrap();
    let made = Command::new("mkfifo")
        .arg(cam.join("frame.png"))
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo failed");
    let camera = format!("kind = \"dir\"\npath = \"{}\"", cam.display());
    let cfg = station_config(d.path(), port, 2, &camera);
    let mut child = run_station(&cfg, &sock_path).spawn().unwrap();
    let first = pings(&sock, 10.0);
    // with no watchdog from systemd, the config's is handed to it with READY
    assert!(
        first
            .iter()
            .any(|m| m.contains("READY=1") && m.contains("WATCHDOG_USEC=2000000")),
        "no READY with the config's watchdog: {first:?}"
    );
    assert!(
        first.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "no watchdog pings: {first:?}"
    );
    // a capture reaches the pipeline thread, which then blocks reading the pipe
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
                r#"{"id":"x","op":"capture_before"}"#,
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

/// `takumi run` with `cfg`, notifying `sock`, outside any systemd watchdog.
fn run_station(cfg: &std::path::Path, sock: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_takumi"));
    c.arg("--config")
        .arg(cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", sock)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn notify_socket(dir: &std::path::Path) -> (std::path::PathBuf, UnixDatagram) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    (path, sock)
}

#[test]
fn the_watchdog_systemd_sets_wins_over_the_config() {
    let d = tempfile::tempdir().unwrap();
    let (sock_path, sock) = notify_socket(d.path());
    // the config says 30 s (a ping every 10 s); systemd says 1.5 s (a ping every 0.5 s)
    let cfg = station_config(d.path(), free_port(), 30, PATTERN);
    let mut child = run_station(&cfg, &sock_path)
        .env("WATCHDOG_USEC", "1500000")
        .spawn()
        .unwrap();
    let msgs = pings(&sock, 6.0);
    let _ = child.kill();
    let _ = child.wait();
    let ready = msgs
        .iter()
        .position(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY: {msgs:?}"));
    assert!(
        !msgs[ready].contains("WATCHDOG_USEC"),
        "systemd's watchdog was overridden: {msgs:?}"
    );
    let after = msgs[ready..].iter().filter(|m| m.contains("WATCHDOG=1"));
    assert!(
        after.count() >= 4,
        "pings do not follow WATCHDOG_USEC: {msgs:?}"
    );
}

/// Which `systemd-analyze` and `strace` are missing, if any; under CI both must be there.
fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = ["systemd-analyze", "strace"]
        .into_iter()
        .filter(|b| !have(b))
        .collect();
    if missing.is_empty() {
        return None;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "missing under CI: {missing:?}"
    );
    Some(missing.join(", "))
}

/// Every group `systemd-analyze syscall-filter` lists, with its members (calls and groups).
fn syscall_groups() -> HashMap<String, Vec<String>> {
    let o = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current = None;
    // "@group" at the start of a line, then its members indented (and an indented "# what it
    // is"); a "#" at the start of a line begins the calls that are in no group
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let item = line.trim();
        if line.starts_with('@') {
            current = Some(item.to_string());
        } else if line.starts_with('#') {
            current = None;
        } else if let Some(g) = &current
            && !item.is_empty()
            && !item.starts_with('#')
        {
            groups.entry(g.clone()).or_default().push(item.into());
        }
    }
    groups
}

fn expand(groups: &HashMap<String, Vec<String>>, item: &str, out: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(groups, m, out)),
        None if item.starts_with('@') => panic!("systemd-analyze knows no group {item}"),
        None => {
            out.insert(item.to_string());
        }
    }
}

/// The calls the unit's `SystemCallFilter=` lines allow, read as systemd reads them: the
/// first (an allow list) starts from `@default`, a later line adds, a `~` line takes away.
fn allowed_syscalls(unit: &str, groups: &HashMap<String, Vec<String>>) -> BTreeSet<String> {
    let mut allowed = BTreeSet::new();
    expand(groups, "@default", &mut allowed);
    let lines = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SystemCallFilter="));
    for (i, line) in lines.enumerate() {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        assert!(
            i > 0 || !deny,
            "the first SystemCallFilter= must be an allow list"
        );
        let mut set = BTreeSet::new();
        // an entry may carry its own errno (`name:EPERM`)
        for item in list
            .split_whitespace()
            .map(|e| e.split(':').next().unwrap_or(e))
        {
            expand(groups, item, &mut set);
        }
        if deny {
            allowed.retain(|c| !set.contains(c));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

/// The calls named in an `strace -c` summary.
fn traced_calls(summary: &std::path::Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(summary).unwrap();
    text.lines()
        .skip_while(|l| !l.starts_with("------"))
        .skip(1)
        .take_while(|l| !l.starts_with("------"))
        .filter_map(|l| l.split_whitespace().last().map(String::from))
        .collect()
}

fn strace(out: &std::path::Path) -> Command {
    let mut c = Command::new("strace");
    c.args(["-f", "-c", "-o"])
        .arg(out)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_takumi"));
    c
}

/// `takumi demo` under strace: learn, apply, the embedded broker, MQTT, store, outbox, display.
fn trace_demo(dir: &std::path::Path, sock: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("demo.toml");
    let text = format!(
        "[engine]\nmodels = \"{}\"\nthreads = 2\n[station]\nid = \"sc\"\n\
         [camera]\nkind = \"dir\"\npath = \"{}\"\nlooping = true\n\
         [mqtt]\nport = 0\n[broker]\nembedded = true\n\
         [display]\nkind = \"png\"\npath = \"{}\"\nwidth = 320\nheight = 240\n",
        models().display(),
        samples().join("captures").display(),
        dir.join("display.png").display()
    );
    std::fs::write(&cfg, text).unwrap();
    let summary = dir.join("demo.strace");
    let o = strace(&summary)
        .arg("--config")
        .arg(&cfg)
        .arg("demo")
        .arg("--samples")
        .arg(samples())
        .arg("--out")
        .arg(dir.join("demo-out"))
        .current_dir(dir)
        .env("NOTIFY_SOCKET", sock)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "takumi demo under strace failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    summary
}

/// `takumi run` under strace from start-up to a SIGTERM: the service's own paths (signals,
/// readiness and watchdog notifications, shutdown).
fn trace_run(
    dir: &std::path::Path,
    sock_path: &std::path::Path,
    sock: &UnixDatagram,
) -> std::path::PathBuf {
    let summary = dir.join("run.strace");
    let cfg = station_config(dir, free_port(), 2, PATTERN);
    let child = strace(&summary)
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("NOTIFY_SOCKET", sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // up and pinging (start-up under strace takes a few seconds), then stopped as systemd would
    let mut msgs = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !msgs.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        msgs.extend(pings(sock, 0.5));
    }
    msgs.extend(pings(sock, 1.5));
    // strace's only child is takumi
    let children = format!("/proc/{0}/task/{0}/children", child.id());
    let pid = std::fs::read_to_string(children).unwrap_or_default();
    let pid = pid.split_whitespace().next().map(String::from);
    let _ = Command::new("kill")
        .arg("-TERM")
        .args(pid.as_deref())
        .status();
    let o = child.wait_with_output().unwrap();
    assert!(
        msgs.iter().any(|m| m.contains("READY=1")) && o.status.success(),
        "takumi run under strace: {:?} {msgs:?} {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    summary
}

#[test]
fn every_syscall_takumi_makes_is_allowed_by_the_units_filter() {
    if let Some(missing) = missing_tools() {
        eprintln!("SKIPPED: {missing} not installed");
        return;
    }
    let unit = std::fs::read_to_string(repo().join("systemd/takumi.service")).unwrap();
    let allowed = allowed_syscalls(&unit, &syscall_groups());
    // the expansion is what systemd does: privileged and resource calls are gone
    assert!(allowed.contains("openat") && allowed.contains("connect"));
    assert!(!allowed.contains("setrlimit") && !allowed.contains("mount"));
    let d = tempfile::tempdir().unwrap();
    let (sock_path, sock) = notify_socket(d.path());
    let mut refused = Vec::new();
    for summary in [
        trace_demo(d.path(), &sock_path),
        trace_run(d.path(), &sock_path, &sock),
    ] {
        let calls = traced_calls(&summary);
        assert!(calls.len() > 20 && calls.contains("execve"), "{calls:?}");
        for c in calls.difference(&allowed) {
            refused.push(format!("{c} ({})", summary.display()));
        }
    }
    assert!(
        refused.is_empty(),
        "takumi makes system calls the unit's SystemCallFilter= would kill it for: {refused:?}"
    );
}
