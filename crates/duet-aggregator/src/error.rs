//! Errors of the aggregator: aborts (the peer's fault) and failures of ours.

use duet_core::{Abort, CoreError};
use duet_messages::dap09::TaskId;
use duet_messages::problem::DapProblemType;
use duet_store::StoreError;

/// An aggregator error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; answered with a problem document.
    #[error(transparent)]
    Abort(#[from] Abort),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    /// A core operation failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The server is saturated; the client should retry later (429).
    #[error("the server is busy; retry later")]
    Overloaded,
    /// The request's body is longer than the route takes (413).
    #[error("the request body is over {limit} bytes")]
    TooLarge {
        /// The route's limit, in bytes.
        limit: usize,
    },
    /// The request's body did not arrive in time (408).
    #[error("the request body did not arrive within {after:?}")]
    SlowBody {
        /// How long the route waits for a body.
        after: std::time::Duration,
    },
    /// Something else of ours failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for an abort.
    pub fn abort(
        problem: DapProblemType,
        task_id: Option<TaskId>,
        detail: impl Into<String>,
    ) -> Self {
        Self::Abort(Abort::new(problem, task_id, detail))
    }
}
