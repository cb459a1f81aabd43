//! The error taxonomy: an [`Abort`] is the peer's fault and becomes a DAP problem document; a
//! [`CoreError`] is a failure of ours.

use duet_messages::dap09::TaskId;
use duet_messages::problem::DapProblemType;

/// A protocol abort: the request was wrong, the peer is told why with a problem document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", problem.type_uri())]
pub struct Abort {
    /// The DAP problem type.
    pub problem: DapProblemType,
    /// The task the request was about, when known.
    pub task_id: Option<TaskId>,
    /// A human-readable explanation.
    pub detail: String,
}

impl Abort {
    /// An abort of the given type.
    pub fn new(
        problem: DapProblemType,
        task_id: Option<TaskId>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            problem,
            task_id,
            detail: detail.into(),
        }
    }
}

/// Errors of the core crate.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A VDAF operation failed.
    #[error("VDAF error: {0}")]
    Vdaf(String),
    /// An HPKE operation failed.
    #[error("HPKE error: {0}")]
    Hpke(String),
    /// A parameter is out of range or inconsistent.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// Encoding or decoding failed.
    #[error("codec error: {0}")]
    Codec(#[from] duet_messages::CodecError),
}
