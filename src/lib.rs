//! takumi: learn a visual edit from one before/after pair and replay it on a production line.
//!
//! Data flows through the modules in this order: `capture` (frames in) → `engine` (learn and
//! apply templates) → `store` (templates on disk) → publish/display (the appliance).

pub mod appliance;
pub mod apply;
pub mod atomic_write;
pub mod bench;
pub mod capture;
pub mod config;
pub mod display;
pub mod engine;
pub mod error;
pub mod frame;
pub mod publish;
pub mod store;

pub use error::{Error, Result};
pub use frame::Frame;
