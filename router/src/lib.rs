//! The profile router: a producer of CPU profiles, a pub/sub bus, and consumer plugins
//! loaded at run time. [`agent`] wires them together; everything else is one piece each.

pub mod agent;
pub mod bus;
pub mod cli;
pub mod logging;
pub mod plugin_host;
pub mod process;
pub mod producer;
pub mod python;
pub mod recording;
pub mod shutdown;
pub mod symbolize;
pub mod telemetry;
pub mod untrusted;
pub mod unwind_tables;
