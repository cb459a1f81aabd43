//! Version-agnostic core of Duet: the task model, VDAF dispatch over `prio`, HPKE, the clock,
//! authentication tokens and the error taxonomy shared by every server-side crate.
#![forbid(unsafe_code)]

pub mod auth;
pub mod clock;
pub mod error;
pub mod hpke;
#[cfg(feature = "http")]
pub mod http;
pub mod problem;
pub mod task;
pub mod vdaf;

pub use auth::AuthenticationToken;
pub use clock::{Clock, MockClock, RealClock};
pub use error::{Abort, CoreError};
pub use task::{AggregatorRole, QueryTypeConfig, Task, TaskParameters};
pub use vdaf::{AggregateResult, Measurement, VdafInstance};
