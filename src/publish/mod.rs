//! Results out: image files, MQTT (with the on-disk outbox) and the embedded broker.

pub mod broker;
pub mod file;
pub mod jpeg;
pub mod mqtt;
pub mod outbox;
