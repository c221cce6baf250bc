//! Trigger to result, end to end: the station as `takumi run` runs it (embedded broker, folder
//! camera, outbox), driven over MQTT as a line client drives it. Each figure runs from the
//! trigger's publish to the result's arrival at a subscriber: the station's QoS 1 publish of
//! the result JPEG, which the broker has taken (acknowledged) by the time it forwards it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::appliance::line_client::LineClient;
use crate::appliance::service;
use crate::capture::SourceConfig;
use crate::config::{Config, DisplayKind};
use crate::publish::file::{ImageKind, encode};
use crate::store::{Template, TemplateStore};
use crate::{Error, Frame, Result};

/// Triggers before the timed ones: the first captures pay for page faults and the plan's
/// first run.
const WARM_UP: usize = 5;
/// Seconds one answer may take before the run is called failed.
const TIMEOUT_S: u64 = 120;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("bench station: {e}"))
}

/// The station's config for the run: `cfg`'s engine and limits, a folder camera of `frames`
/// as JPEG files, an embedded broker on a free port, everything it writes under `dir`.
fn station_config(cfg: &Config, dir: &Path, frames: &[Frame]) -> Result<Config> {
    let cams = dir.join("captures");
    std::fs::create_dir_all(&cams).map_err(|e| Error::io(&cams, e))?;
    for (i, f) in frames.iter().enumerate() {
        let p = cams.join(format!("{i}.jpg"));
        std::fs::write(&p, encode(f, ImageKind::Jpeg)?).map_err(|e| Error::io(&p, e))?;
    }
    let mut c = cfg.clone();
    c.camera = SourceConfig::Dir {
        path: cams,
        looping: true,
    };
    c.station.id = "bench".into();
    c.station.capture_interval_ms = 0;
    c.mqtt.host = "127.0.0.1".into();
    c.mqtt.port = 0;
    c.broker.embedded = true;
    c.store.dir = dir.join("store");
    c.outbox.dir = dir.join("outbox");
    c.display.kind = DisplayKind::None;
    Ok(c)
}

/// Trigger-to-result ms of `n` captures of `frames`, in order, with `t` armed.
pub fn run(cfg: &Config, dir: &Path, frames: &[Frame], t: &Template, n: usize) -> Result<Vec<f64>> {
    let cfg = station_config(cfg, dir, frames)?;
    TemplateStore::open(&cfg.store.dir)
        .and_then(|s| s.save(t))
        .map_err(err)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(err)?;
    rt.block_on(drive(cfg, t.name.to_string(), n))
}

async fn drive(cfg: Config, template: String, n: usize) -> Result<Vec<f64>> {
    let svc = service::start(cfg.clone()).await?;
    let port = svc.broker_port.unwrap_or(cfg.mqtt.port);
    let res = async {
        let timeout = Duration::from_secs(TIMEOUT_S);
        let mut c = LineClient::connect("takumi-bench", port, cfg.topic_root(), timeout).await?;
        c.send(json!({"id": "arm", "op": "apply", "template": template, "mode": "armed"}))
            .await?;
        c.ack("arm", "armed").await?;
        for i in 0..WARM_UP {
            trigger(&mut c, &format!("warm-{i}")).await?;
        }
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(trigger(&mut c, &format!("trig-{i}")).await?);
        }
        Ok(v)
    }
    .await;
    svc.stop().await?;
    res
}

/// One capture: ms from the trigger's publish until both the result JPEG and its metadata
/// arrived; an error event on the way fails the run.
async fn trigger(c: &mut LineClient, id: &str) -> Result<f64> {
    let t0 = Instant::now();
    c.send(json!({"id": id, "op": "trigger"})).await?;
    c.result().await?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}
