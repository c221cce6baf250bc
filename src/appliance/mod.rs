//! The appliance: the station pipeline driven by MQTT commands.

pub mod copies;
pub mod demo;
pub mod events;
pub mod fleet;
pub mod journal;
pub mod line_client;
pub mod protocol;
pub mod router;
pub mod service;
pub mod station;
pub mod watchdog;
