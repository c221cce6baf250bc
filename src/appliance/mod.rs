//! The appliance: the station pipeline driven by MQTT commands.

pub mod protocol;
pub mod station;
