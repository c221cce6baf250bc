#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
