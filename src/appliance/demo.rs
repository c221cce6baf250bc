//! `takumi demo`: starts the host profile and drives it over MQTT as a line client would: learn
//! from the shipped sample pair, arm the template, trigger the (folder) camera, approve every
//! result. Results and the display PNG land in the output folder.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::line_client::LineClient;
use super::service;
use crate::capture::file::decode_image;
use crate::config::Config;
use crate::frame::psnr;
use crate::{Error, Result};

fn err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("demo: {e}"))
}

pub async fn run(mut cfg: Config, samples: &Path, out: &Path) -> Result<()> {
    let t0 = Instant::now();
    cfg.store.dir = out.join("store");
    cfg.outbox.dir = out.join("outbox");
    cfg.display.path = out.join("display.png");
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let svc = service::start(cfg.clone()).await?;
    let port = svc.broker_port.unwrap_or(cfg.mqtt.port);
    let started_ms = t0.elapsed().as_secs_f64() * 1e3;
    let root = cfg.topic_root();

    let mut c =
        LineClient::connect("takumi-demo", port, root.clone(), Duration::from_secs(60)).await?;

    let b64 = |p: &Path| -> Result<String> {
        Ok(base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(p).map_err(|e| Error::io(p, e))?))
    };
    let t = Instant::now();
    c.send(json!({"id": "learn-1", "op": "learn", "name": "sample",
        "before_jpeg_b64": b64(&samples.join("pair_before.jpg"))?,
        "after_jpeg_b64": b64(&samples.join("pair_after.jpg"))?}))
        .await?;
    let learned = c.ack("learn-1", "learned").await?;
    let learn_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "station up in {started_ms:.0} ms (broker 127.0.0.1:{port}); {} in {learn_ms:.0} ms round trip",
        learned["message"].as_str().unwrap_or("")
    );

    c.send(json!({"id": "arm-1", "op": "apply", "template": "sample", "mode": "armed"}))
        .await?;
    c.ack("arm-1", "armed").await?;
    let mut captures: Vec<_> = std::fs::read_dir(samples.join("captures"))
        .map_err(|e| Error::io(samples.join("captures"), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    captures.sort();
    let mut results: Vec<(Value, Vec<u8>, f64)> = Vec::new();
    for (i, _) in captures.iter().enumerate() {
        let t = Instant::now();
        c.send(json!({"id": format!("trig-{i}"), "op": "trigger"}))
            .await?;
        let (meta, image) = c.result().await?;
        results.push((meta, image, t.elapsed().as_secs_f64() * 1e3));
    }
    c.send(json!({"id": "disarm-1", "op": "disarm"})).await?;
    c.ack("disarm-1", "disarmed").await?;
    let mut states: HashMap<String, String> = HashMap::new();
    for (i, (meta, _, _)) in results.iter().enumerate() {
        let id = meta["id"].as_str().unwrap_or_default().to_string();
        c.send(json!({"id": format!("ok-{i}"), "op": "approve", "result": id}))
            .await?;
        let topic = format!("{root}/result/{id}");
        let (_, p) = c
            .wait(|t, p| {
                t == topic
                    && serde_json::from_slice::<Value>(p).is_ok_and(|v| v["state"] == "approved")
            })
            .await?;
        let v: Value = serde_json::from_slice(&p).map_err(err)?;
        states.insert(id, v["state"].as_str().unwrap_or("").into());
    }
    // the display is redrawn on each approval; give the last one a moment to land
    let display = cfg.display.path.clone();
    for _ in 0..50 {
        if display.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for ((meta, jpeg, ms), cap) in results.iter().zip(&captures) {
        let name = cap.file_name().unwrap_or_default();
        let dst = out.join(name);
        std::fs::write(&dst, jpeg).map_err(|e| Error::io(&dst, e))?;
        let got = decode_image(jpeg, &cfg.limits)?;
        let truth = samples.join("expected").join(name);
        let vs = match std::fs::read(&truth)
            .ok()
            .and_then(|b| decode_image(&b, &cfg.limits).ok())
        {
            Some(t) => format!(", PSNR {:.2} dB vs ground truth", psnr(&got, &t)),
            None => String::new(),
        };
        println!(
            "{}: {} {}x{} score {:.2} {} -> {}, apply {:.1} ms, trigger-to-result {ms:.0} ms{vs}",
            dst.display(),
            meta["id"].as_str().unwrap_or(""),
            meta["width"],
            meta["height"],
            meta["score"].as_f64().unwrap_or(0.0),
            meta["state"].as_str().unwrap_or(""),
            states
                .get(meta["id"].as_str().unwrap_or(""))
                .map_or("?", |s| s.as_str()),
            meta["latency_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "display: {} ({})",
        display.display(),
        if display.exists() {
            "written"
        } else {
            "missing"
        }
    );
    svc.stop().await?;
    println!("demo done in {:.2} s", t0.elapsed().as_secs_f64());
    Ok(())
}
