//! The collector's error type, and the reading of error responses (RFC 9457 problem documents).

use duet_core::http::{read_at_most, ERROR_BODY_LIMIT};
use duet_core::problem::{body_suffix, parse_problem, quote_body, type_suffix};
use duet_messages::dap09::CollectionJobId;
use duet_messages::problem::DapProblemType;

/// Everything that can go wrong while collecting.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The request could not be sent, or its response could not be read.
    #[error("could not {action}: {message}")]
    Http {
        /// What was being attempted, e.g. "start a collection job at the Leader at http://…".
        action: String,
        /// The HTTP library's explanation.
        message: String,
    },
    /// The Leader answered with a problem document.
    #[error("{context}: {detail} (HTTP {status}{})", type_suffix(.problem_type))]
    Problem {
        /// Who refused what, e.g. "the Leader at http://… refused the collection job".
        context: String,
        /// The HTTP status code.
        status: u16,
        /// The DAP problem type, if the document names one.
        problem_type: Option<DapProblemType>,
        /// The document's `detail` (or `title`, or `type`).
        detail: String,
    },
    /// The Leader answered with a status this collector does not expect and no problem document.
    #[error("{context}: unexpected HTTP status {status}{}", body_suffix(.body))]
    UnexpectedStatus {
        /// Who answered what.
        context: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body, as text.
        body: String,
    },
    /// The Leader says the collection job's results have been deleted (HTTP 204).
    #[error("the Leader has deleted collection job {0}")]
    JobDeleted(CollectionJobId),
    /// The collection job was not ready in time.
    #[error("{}", timeout_message(.job, .timeout, .last_error))]
    Timeout {
        /// The job, if it was created before time ran out (it can still be polled).
        job: Option<CollectionJobId>,
        /// How long the collector waited.
        timeout: std::time::Duration,
        /// The error the Leader answered the last poll with, if it did (other than 429): what a
        /// job the Leader gave up on answers. `None` if the job was pending, or the Leader was
        /// busy or out of reach.
        last_error: Option<String>,
    },
    /// A VDAF could not be set up, or unsharding failed.
    #[error("VDAF error: {0}")]
    Vdaf(String),
    /// The collector's HPKE key is unusable, or an aggregate share did not decrypt.
    #[error("HPKE error: {0}")]
    Hpke(String),
    /// A response body did not decode.
    #[error("{0}")]
    Codec(String),
    /// The Collection does not fit the query it answers.
    #[error("the Leader's collection does not match the query: {0}")]
    InvalidCollection(String),
}

impl CollectorError {
    /// The DAP problem type, if the Leader answered with a problem document naming one.
    pub fn problem_type(&self) -> Option<DapProblemType> {
        match self {
            Self::Problem { problem_type, .. } => *problem_type,
            _ => None,
        }
    }

    /// Whether the same request may succeed if sent again later: the request or its answer was
    /// lost, or the Leader was busy (429) or failing (5xx), as while it restarts.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http { .. } => true,
            Self::Problem { status, .. } | Self::UnexpectedStatus { status, .. } => {
                *status == 429 || *status >= 500
            }
            _ => false,
        }
    }
}

fn timeout_message(
    job: &Option<CollectionJobId>,
    timeout: &std::time::Duration,
    last_error: &Option<String>,
) -> String {
    let waited = match job {
        Some(job) => format!("collection job {job} was not ready after {timeout:?}"),
        None => format!("could not start a collection job within {timeout:?}"),
    };
    match last_error {
        Some(e) => format!("{waited}; the Leader answered its last poll with an error: {e}"),
        None => waited,
    }
}

/// Turns an error response into a [`CollectorError`]: a `Problem` when the body is a problem
/// document, else `UnexpectedStatus` quoting the start of the body.
pub(crate) async fn error_from_response(
    response: reqwest::Response,
    context: String,
) -> CollectorError {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // An unreadable body still leaves the status to report, and a cut one is still worth
    // quoting.
    let body = read_at_most(response, ERROR_BODY_LIMIT)
        .await
        .map(|(body, _)| body)
        .unwrap_or_default();
    error_from_parts(context, status, content_type.as_deref(), &body)
}

/// The pure part of [`error_from_response`].
pub(crate) fn error_from_parts(
    context: String,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> CollectorError {
    match parse_problem(content_type, body) {
        Some(p) => CollectorError::Problem {
            context,
            status,
            problem_type: p.problem_type,
            detail: p.detail,
        },
        None => CollectorError::UnexpectedStatus {
            context,
            status,
            body: quote_body(body),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_bodies_are_quoted_briefly() {
        let e = error_from_parts(
            "the Leader at http://l/ answered the poll".into(),
            500,
            None,
            "é".repeat(300).as_bytes(),
        );
        assert!(matches!(
            e,
            CollectorError::UnexpectedStatus { status: 500, .. }
        ));
        assert!(e.to_string().ends_with("é…"), "{e}");
        let e = error_from_parts("ctx".into(), 404, None, b"");
        assert_eq!(e.to_string(), "ctx: unexpected HTTP status 404");
    }
}
