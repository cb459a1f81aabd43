//! The DAP-09 Leader and Helper: protocol logic, job drivers and the HTTP layer.
//!
//! The protocol core (`leader`, `helper`) takes decoded requests, a [`Datastore`] and a
//! [`Clock`]; the `http` module is the only one that knows axum. A process may run the Leader,
//! the Helper or both; see [`server::run`].
#![forbid(unsafe_code)]

pub mod batch;
pub mod config;
mod connections;
pub mod error;
pub mod helper;
pub mod http;
pub mod leader;
pub mod metrics;
mod peer;
pub mod server;
mod shared;

pub use config::AggregatorConfig;
pub use error::Error;
pub use server::{run, Roles};
pub use shared::with_first_key;

pub use duet_core::Clock;
pub use duet_store::Datastore;
