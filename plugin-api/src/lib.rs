//! The contract between the profile router and its consumer plugins.
//!
//! - [`model`]: the [`ProfileBatch`] data model, interned like pprof/OTLP dictionaries, with
//!   read-side accessors that make a conversion a linear walk.
//! - [`builder`]: [`BatchBuilder`], which interns strings, mappings, frames and stacks.
//! - [`consumer`]: the [`ConsumerPlugin`] trait a plugin implements, and its ABI-stable form.
//! - [`module`]: the root module a plugin exports and the [`export_consumer!`] macro.
//! - [`settings`]: parsing a plugin's TOML settings with errors that name key and value.
//! - [`log`]: the `info!`/`warn!`/`error!`/`debug!` macros, which write into the router's log.
//! - [`fixtures`]: deterministic synthetic batches, for plugins' tests and benchmarks.
//! - [`delivery`]: a bounded queue with retries for plugins that send to a backend (a helper
//!   compiled into the plugin, not part of the contract).
//!
//! A plugin depends on this crate only. Nothing async crosses the boundary; a panic inside a
//! plugin call becomes an error for the router, never an abort.

pub mod builder;
pub mod consumer;
pub mod delivery;
pub mod fixtures;
pub mod log;
pub mod model;
pub mod module;
pub mod settings;

pub use abi_stable;
pub use builder::BatchBuilder;
pub use consumer::{ConsumerPlugin, Health, MetricKind, PluginError, PluginMetric};
pub use model::*;
pub use module::{PluginModule, PluginModuleRef, CONTRACT_VERSION};
