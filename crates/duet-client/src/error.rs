//! The client's error type, and the reading of error responses (RFC 9457 problem documents).

use duet_core::http::{read_at_most, ERROR_BODY_LIMIT};
use duet_core::problem::{body_suffix, parse_problem, quote_body, type_suffix};
use duet_messages::problem::DapProblemType;

/// Everything that can go wrong while preparing or uploading a report.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request could not be sent, or its response could not be read.
    #[error("could not {action}: {message}")]
    Http {
        /// What was being attempted, e.g. "upload the report to the Leader at http://…".
        action: String,
        /// The HTTP library's explanation.
        message: String,
    },
    /// The server answered with a problem document.
    #[error("{context}: {detail} (HTTP {status}{})", type_suffix(.problem_type))]
    Problem {
        /// Who refused what, e.g. "the Leader at http://… rejected the report".
        context: String,
        /// The HTTP status code.
        status: u16,
        /// The DAP problem type, if the document names one.
        problem_type: Option<DapProblemType>,
        /// The document's `detail` (or `title`, or `type`).
        detail: String,
    },
    /// The server answered with an error status and no problem document.
    #[error("{context}: unexpected HTTP status {status}{}", body_suffix(.body))]
    UnexpectedStatus {
        /// Who answered what, e.g. "the Leader at http://… answered the report upload".
        context: String,
        /// The HTTP status code.
        status: u16,
        /// The start of the response body, as text.
        body: String,
    },
    /// Sharding the measurement failed (for example, it does not fit the task's VDAF).
    #[error("could not shard the measurement: {0}")]
    Vdaf(String),
    /// Encrypting an input share failed.
    #[error("HPKE error: {0}")]
    Hpke(String),
    /// A response body did not decode.
    #[error("{0}")]
    Codec(String),
    /// None of an aggregator's HPKE configurations uses a suite Duet supports.
    #[error(
        "{aggregator} offers no HPKE configuration Duet can use (offered: {offered}); Duet \
         supports KEM 0x0020 (X25519-HKDF-SHA256), KDF 0x0001 (HKDF-SHA256), AEAD 0x0001 (AES-128-GCM)"
    )]
    NoSupportedHpkeConfig {
        /// The aggregator, e.g. "the Helper at http://…".
        aggregator: String,
        /// The offered suites, as `id:kem/kdf/aead`.
        offered: String,
    },
    /// An upload failed, but an earlier attempt at it may have been stored: its request was
    /// sent and its answer lost (or was a server error). Sending the measurement again, as a
    /// new report, could count it twice.
    #[error("{0} (an attempt may have been stored: its answer was lost, or was a server error)")]
    OutcomeUnknown(Box<ClientError>),
}

impl ClientError {
    /// The DAP problem type, if the server answered with a problem document naming one.
    pub fn problem_type(&self) -> Option<DapProblemType> {
        match self {
            Self::Problem { problem_type, .. } => *problem_type,
            Self::OutcomeUnknown(e) => e.problem_type(),
            _ => None,
        }
    }

    /// Whether the same request may succeed if sent again later: the request or its answer was
    /// lost, or the server was busy (429) or failing (5xx).
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

/// Turns an error response into a [`ClientError`]: a `Problem` when the body is a problem
/// document, else `UnexpectedStatus` quoting the start of the body.
pub(crate) async fn error_from_response(
    response: reqwest::Response,
    context: String,
) -> ClientError {
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
) -> ClientError {
    match parse_problem(content_type, body) {
        Some(p) => ClientError::Problem {
            context,
            status,
            problem_type: p.problem_type,
            detail: p.detail,
        },
        None => ClientError::UnexpectedStatus {
            context,
            status,
            body: quote_body(body),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duet_messages::problem::PROBLEM_JSON;

    #[test]
    fn error_messages_read_as_sentences() {
        let e = error_from_parts(
            "the Leader at http://leader.test/ rejected the report".into(),
            400,
            Some(PROBLEM_JSON),
            br#"{"type":"urn:ietf:params:ppm:dap:error:reportTooEarly","detail":"report is from the future"}"#,
        );
        assert_eq!(e.problem_type(), Some(DapProblemType::ReportTooEarly));
        assert_eq!(
            e.to_string(),
            "the Leader at http://leader.test/ rejected the report: report is from the future \
             (HTTP 400, urn:ietf:params:ppm:dap:error:reportTooEarly)"
        );

        let long = "x".repeat(500);
        let e = error_from_parts(
            "the Leader at http://l/ answered".into(),
            502,
            Some("text/html"),
            long.as_bytes(),
        );
        assert!(matches!(
            e,
            ClientError::UnexpectedStatus { status: 502, .. }
        ));
        let text = e.to_string();
        assert!(
            text.starts_with("the Leader at http://l/ answered: unexpected HTTP status 502: xxx"),
            "{text}"
        );
        assert!(text.len() < 300, "{text}");
    }
}
