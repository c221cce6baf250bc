//! A line client over MQTT, as a production line's controller drives the station: send a
//! command, wait for the event that answers it, collect a result. `takumi demo` and the
//! bench's trigger-to-result figure both use it.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc::Receiver;

use crate::{Error, Result};

fn err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("line client: {e}"))
}

pub struct LineClient {
    client: AsyncClient,
    rx: Receiver<(String, Vec<u8>)>,
    root: String,
    /// How long one answer may take.
    timeout: Duration,
}

impl LineClient {
    /// Connects to the station's broker on 127.0.0.1:`port` as `name`, subscribes to all of
    /// the station's topics under `root` and waits until the station says it is online.
    pub async fn connect(name: &str, port: u16, root: String, timeout: Duration) -> Result<Self> {
        let mut opts =
            MqttOptions::new(format!("{name}-{}", std::process::id()), "127.0.0.1", port);
        // results carry whole JPEGs: up to 4K frames
        opts.set_max_packet_size(64 << 20, 64 << 20);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = AsyncClient::new(opts, 64);
        crate::publish::mqtt::no_delay(&mut ev);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(e) = ev.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = e
                    && tx
                        .send((p.topic.clone(), p.payload.to_vec()))
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
        client
            .subscribe(format!("{root}/#"), QoS::AtLeastOnce)
            .await
            .map_err(err)?;
        let mut c = LineClient {
            client,
            rx,
            root,
            timeout,
        };
        // the station announces itself (retained) once it is connected
        let online = format!("{}/available", c.root);
        c.wait(|t, p| t == online && p == b"online").await?;
        Ok(c)
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub async fn send(&self, cmd: Value) -> Result<()> {
        let topic = format!("{}/cmd", self.root);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, cmd.to_string())
            .await
            .map_err(err)
    }

    /// The next message that `want` takes, within the client's timeout.
    pub async fn wait(
        &mut self,
        mut want: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| err("timed out waiting for the station"))?
                .ok_or_else(|| err("connection closed"))?;
            if want(&m.0, &m.1) {
                return Ok(m);
            }
        }
    }

    /// The event answering `request`; one with another code than `code` is an error.
    pub async fn ack(&mut self, request: &str, code: &str) -> Result<Value> {
        let topic = format!("{}/event", self.root);
        let (_, p) = self
            .wait(|t, p| {
                t == topic && serde_json::from_slice::<Value>(p).is_ok_and(|v| answers(&v, request))
            })
            .await?;
        let v: Value = serde_json::from_slice(&p).map_err(err)?;
        if v["code"] != code {
            return Err(err(format!("{request}: {}", v["message"])));
        }
        Ok(v)
    }

    /// The next result: its metadata and its JPEG; an error event on the way is an error.
    pub async fn result(&mut self) -> Result<(Value, Vec<u8>)> {
        let (res, event) = (
            format!("{}/result/", self.root),
            format!("{}/event", self.root),
        );
        let (mut meta, mut image) = (None, None);
        while meta.is_none() || image.is_none() {
            let (topic, p) = self.wait(|t, _| t.starts_with(&res) || t == event).await?;
            if topic.ends_with("/image") {
                image = Some(p);
            } else if topic.starts_with(&res) {
                meta = Some(serde_json::from_slice(&p).map_err(err)?);
            } else if serde_json::from_slice::<Value>(&p).is_ok_and(|v| v["level"] == "error") {
                return Err(err(String::from_utf8_lossy(&p)));
            }
        }
        meta.zip(image).ok_or_else(|| err("no result"))
    }
}

/// Whether an event answers `request`: by its `request_id`, or among the `request_ids` of a
/// grouped `overloaded` event.
pub fn answers(event: &Value, request: &str) -> bool {
    event["request_id"] == request
        || event["request_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i == request))
}
