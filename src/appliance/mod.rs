//! The appliance: the station pipeline driven by MQTT commands.

pub mod demo;
pub mod fleet;
pub mod protocol;
pub mod service;
pub mod station;
pub mod watchdog;
