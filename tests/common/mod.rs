#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A station config on `dir`, camera = a folder holding the sample pair (before, then after),
/// talking to a broker on `port`: what every station test starts from.
pub fn station_config(dir: &Path, id: &str, port: u16) -> takumi::config::Config {
    let cam = dir.join(format!("cam-{id}"));
    std::fs::create_dir_all(&cam).unwrap();
    std::fs::copy(samples().join("pair_before.jpg"), cam.join("0_before.jpg")).unwrap();
    std::fs::copy(samples().join("pair_after.jpg"), cam.join("1_after.jpg")).unwrap();
    let mut cfg = takumi::config::Config::default();
    cfg.engine.models = models();
    cfg.engine.threads = 2;
    cfg.store.dir = dir.join(format!("store-{id}"));
    cfg.outbox.dir = dir.join(format!("outbox-{id}"));
    cfg.station.id = id.into();
    cfg.station.max_payload_bytes = 1 << 20;
    cfg.camera = takumi::capture::SourceConfig::Dir {
        path: cam,
        looping: true,
    };
    cfg.mqtt.port = port;
    cfg
}

pub fn b64(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The fleet's public key (base64) for the signing key made from `seed`.
pub fn fleet_public(seed: [u8; 32]) -> String {
    b64(ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .as_bytes())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models() -> PathBuf {
    repo().join("models")
}

pub fn samples() -> PathBuf {
    repo().join("models/samples")
}

/// All f32 tensors of a safetensors file, flattened.
pub fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn takumi(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_takumi"));
    c.current_dir(repo())
        .env("TAKUMI_STORE", store)
        .env_remove("TAKUMI_CONFIG");
    c
}

pub fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail; returns its stderr, which must be one line.
pub fn run_err(c: &mut Command) -> String {
    let o: Output = c.output().unwrap();
    assert!(!o.status.success(), "command should have failed: {:?}", c);
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(
        err.lines().count(),
        1,
        "expected one error line, got: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

pub fn learn_sample(store: &Path, name: &str) {
    let s = samples();
    run_ok(
        takumi(store)
            .args(["learn", "--name", name, "--before"])
            .arg(s.join("pair_before.jpg"))
            .arg("--after")
            .arg(s.join("pair_after.jpg")),
    );
}

/// A TCP port that was free a moment ago (for a broker or a station under test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mosquitto of its own for one test, on a loopback port, with its log in its folder.
pub struct Mosquitto {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn mosquitto_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Whether mosquitto is installed; false (the test skips, saying so) outside CI, a failure
/// under CI=true, where .ci/run installs it.
pub fn have_mosquitto() -> bool {
    if mosquitto_bin().is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "mosquitto is not installed, and CI=true: .ci/run must install it"
    );
    eprintln!("SKIPPED: mosquitto is not installed (apt-get install mosquitto)");
    false
}

impl Mosquitto {
    /// mosquitto on `port`; `persistence`: sessions kept on disk (saved every second) across
    /// kill -9 and restart; `extra`: more configuration lines for the listener (TLS, limits).
    /// None (the test skips) when mosquitto is not installed, except under CI=true.
    pub fn start(port: u16, persistence: bool, extra: &str) -> Option<Mosquitto> {
        let bin = mosquitto_bin().filter(|_| have_mosquitto())?;
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "listener {port} 127.0.0.1\n{extra}\nallow_anonymous true\npersistence {persistence}\n\
             persistence_location {}/\nautosave_interval 1\nuser root\nset_tcp_nodelay true\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
            dir.path().display()
        );
        Some(Self::with_conf(bin, port, dir, &conf))
    }

    /// Writes `conf` into `dir` and starts the broker on it.
    fn with_conf(bin: PathBuf, port: u16, dir: tempfile::TempDir, conf: &str) -> Mosquitto {
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut m = Mosquitto {
            port,
            bin,
            dir,
            child: None,
        };
        m.spawn();
        m
    }

    /// Starts (or restarts) the broker and waits until it listens.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("mosquitto exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto not listening:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and waits for the exit: a clean stop, in which mosquitto saves its persistence
    /// file (the sessions and their queued messages), unlike `kill9`.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            assert!(sent.success());
            c.wait().unwrap();
        }
    }

    /// SIGSTOP: messages sent meanwhile sit unread and unacked in the broker's socket
    /// buffers; a kill -9 after that loses them, so they must come from the outbox.
    pub fn freeze(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let stopped = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        assert!(stopped.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// mosquitto on a free port with room for the station's largest commands.
pub fn mosquitto() -> Option<Mosquitto> {
    mosquitto_with("max_packet_size 16777216")
}

/// mosquitto on a free port with `extra` configuration lines; "" keeps its defaults (no packet
/// size limit).
pub fn mosquitto_with(extra: &str) -> Option<Mosquitto> {
    Mosquitto::start(free_port(), false, extra)
}

/// `mosquitto_passwd`, when installed (it comes with mosquitto); None (the test skips, saying
/// so) otherwise, except under CI=true, where .ci/run installs it.
pub fn mosquitto_passwd() -> Option<PathBuf> {
    let found = mosquitto_bin()
        .and_then(|m| Some(m.parent()?.parent()?.to_path_buf()))
        .into_iter()
        .chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .flat_map(|d| [d.join("mosquitto_passwd"), d.join("bin/mosquitto_passwd")])
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "mosquitto_passwd is not installed, and CI=true: .ci/run must install mosquitto"
        );
        eprintln!("SKIPPED: mosquitto_passwd is not installed (apt-get install mosquitto)");
    }
    found
}

impl Mosquitto {
    /// mosquitto on a free port that takes no anonymous client: `conf` names its password and
    /// ACL files (`start` allows anonymous clients, which a test of the ACL must not).
    pub fn start_secured(conf: &str) -> Option<Mosquitto> {
        let bin = mosquitto_bin().filter(|_| have_mosquitto())?;
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "listener {port} 127.0.0.1\nmax_packet_size 16777216\n{conf}\nallow_anonymous false\n\
             persistence false\nuser root\nlog_dest stderr\nlog_type all\n"
        );
        Some(Self::with_conf(bin, port, dir, &conf))
    }
}
