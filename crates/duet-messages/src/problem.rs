//! DAP problem types (§3.2): the `type` URIs of RFC 9457 problem documents.

use std::fmt;
use std::str::FromStr;

/// Media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Prefix shared by every DAP problem type URI.
pub const TYPE_URI_PREFIX: &str = "urn:ietf:params:ppm:dap:error:";

/// A DAP error condition, named by a problem type URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DapProblemType {
    /// `invalidMessage`: a message could not be parsed or is otherwise invalid.
    InvalidMessage,
    /// `unrecognizedTask`: the task ID is unknown.
    UnrecognizedTask,
    /// `unrecognizedAggregationJob`: the aggregation job ID is unknown.
    UnrecognizedAggregationJob,
    /// `outdatedConfig`: the report was sealed to an HPKE config the Leader no longer has.
    OutdatedConfig,
    /// `reportRejected`: the report will not be processed.
    ReportRejected,
    /// `reportTooEarly`: the report's timestamp is too far in the future.
    ReportTooEarly,
    /// `batchInvalid`: the query names an invalid batch.
    BatchInvalid,
    /// `invalidBatchSize`: the batch holds too few or too many reports.
    InvalidBatchSize,
    /// `batchQueriedTooManyTimes`: the batch's query budget is spent.
    BatchQueriedTooManyTimes,
    /// `batchMismatch`: the Aggregators disagree on the batch's reports.
    BatchMismatch,
    /// `unauthorizedRequest`: authentication failed.
    UnauthorizedRequest,
    /// `missingTaskID`: an HPKE config was requested without the required task ID.
    MissingTaskId,
    /// `stepMismatch`: the Leader and Helper are at different aggregation steps.
    StepMismatch,
    /// `batchOverlap`: the batch overlaps one already collected.
    BatchOverlap,
    /// `invalidTask` (taskprov): the Aggregator opted out of the task.
    InvalidTask,
}

impl DapProblemType {
    /// Every problem type.
    pub const ALL: [DapProblemType; 15] = [
        Self::InvalidMessage,
        Self::UnrecognizedTask,
        Self::UnrecognizedAggregationJob,
        Self::OutdatedConfig,
        Self::ReportRejected,
        Self::ReportTooEarly,
        Self::BatchInvalid,
        Self::InvalidBatchSize,
        Self::BatchQueriedTooManyTimes,
        Self::BatchMismatch,
        Self::UnauthorizedRequest,
        Self::MissingTaskId,
        Self::StepMismatch,
        Self::BatchOverlap,
        Self::InvalidTask,
    ];

    /// The URI for the problem document's `type` member.
    pub fn type_uri(&self) -> &'static str {
        match self {
            Self::InvalidMessage => "urn:ietf:params:ppm:dap:error:invalidMessage",
            Self::UnrecognizedTask => "urn:ietf:params:ppm:dap:error:unrecognizedTask",
            Self::UnrecognizedAggregationJob => {
                "urn:ietf:params:ppm:dap:error:unrecognizedAggregationJob"
            }
            Self::OutdatedConfig => "urn:ietf:params:ppm:dap:error:outdatedConfig",
            Self::ReportRejected => "urn:ietf:params:ppm:dap:error:reportRejected",
            Self::ReportTooEarly => "urn:ietf:params:ppm:dap:error:reportTooEarly",
            Self::BatchInvalid => "urn:ietf:params:ppm:dap:error:batchInvalid",
            Self::InvalidBatchSize => "urn:ietf:params:ppm:dap:error:invalidBatchSize",
            Self::BatchQueriedTooManyTimes => {
                "urn:ietf:params:ppm:dap:error:batchQueriedTooManyTimes"
            }
            Self::BatchMismatch => "urn:ietf:params:ppm:dap:error:batchMismatch",
            Self::UnauthorizedRequest => "urn:ietf:params:ppm:dap:error:unauthorizedRequest",
            // The spec capitalises "ID" here, unlike in every Rust name.
            Self::MissingTaskId => "urn:ietf:params:ppm:dap:error:missingTaskID",
            Self::StepMismatch => "urn:ietf:params:ppm:dap:error:stepMismatch",
            Self::BatchOverlap => "urn:ietf:params:ppm:dap:error:batchOverlap",
            Self::InvalidTask => "urn:ietf:params:ppm:dap:error:invalidTask",
        }
    }

    /// A sentence for the problem document's `title` member.
    pub fn description(&self) -> &'static str {
        match self {
            Self::InvalidMessage => "The message is malformed or of the wrong type.",
            Self::UnrecognizedTask => "The request names a task this server does not know.",
            Self::UnrecognizedAggregationJob => {
                "The request names an aggregation job this server does not know."
            }
            Self::OutdatedConfig => "The report was encrypted with an outdated HPKE configuration.",
            Self::ReportRejected => "The report was rejected and will not be processed.",
            Self::ReportTooEarly => "The report's timestamp is too far in the future.",
            Self::BatchInvalid => "The batch implied by the query is invalid.",
            Self::InvalidBatchSize => "The batch does not contain an acceptable number of reports.",
            Self::BatchQueriedTooManyTimes => "The batch has already been queried too many times.",
            Self::BatchMismatch => "The aggregators disagree on which reports are in the batch.",
            Self::UnauthorizedRequest => "The request is not properly authorized.",
            Self::MissingTaskId => "The HPKE configuration request must name a task.",
            Self::StepMismatch => "The leader and helper are not on the same aggregation step.",
            Self::BatchOverlap => "The batch overlaps a batch that was already collected.",
            Self::InvalidTask => "The aggregator has opted out of this task.",
        }
    }

    /// The HTTP status to answer with: 400, or 403 for `unauthorizedRequest` (as Janus does).
    pub fn http_status(&self) -> u16 {
        match self {
            Self::UnauthorizedRequest => 403,
            _ => 400,
        }
    }

    /// The problem type with this `type` URI, if it is one of ours.
    pub fn from_type_uri(uri: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.type_uri() == uri)
    }
}

impl fmt::Display for DapProblemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_uri())
    }
}

/// A `type` URI that is not a known DAP problem type.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("unknown DAP problem type {0:?}")]
pub struct UnknownProblemType(pub String);

impl FromStr for DapProblemType {
    type Err = UnknownProblemType;

    fn from_str(s: &str) -> Result<Self, UnknownProblemType> {
        Self::from_type_uri(s).ok_or_else(|| UnknownProblemType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for p in DapProblemType::ALL {
            assert!(p.type_uri().starts_with(TYPE_URI_PREFIX));
            assert!(seen.insert(p.type_uri()));
            assert_eq!(p.type_uri().parse(), Ok(p));
            assert!(p.description().ends_with('.'));
        }
    }

    #[test]
    fn spellings_and_statuses() {
        assert_eq!(
            DapProblemType::MissingTaskId.type_uri(),
            "urn:ietf:params:ppm:dap:error:missingTaskID"
        );
        assert_eq!(DapProblemType::UnauthorizedRequest.http_status(), 403);
        assert_eq!(DapProblemType::BatchMismatch.http_status(), 400);
        assert!("urn:ietf:params:ppm:dap:error:missingTaskId"
            .parse::<DapProblemType>()
            .is_err());
    }
}
