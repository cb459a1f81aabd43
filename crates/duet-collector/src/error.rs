//! The collector's error type, and the reading of error responses (RFC 9457 problem documents).

use duet_messages::dap09::CollectionJobId;
use duet_messages::problem::{DapProblemType, PROBLEM_JSON};
use serde::Deserialize;

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
    #[error("{}", timeout_message(.job, .timeout))]
    Timeout {
        /// The job, if it was created before time ran out (it can still be polled).
        job: Option<CollectionJobId>,
        /// How long the collector waited.
        timeout: std::time::Duration,
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
}

fn timeout_message(job: &Option<CollectionJobId>, timeout: &std::time::Duration) -> String {
    match job {
        Some(job) => format!("collection job {job} was not ready after {timeout:?}"),
        None => format!("could not start a collection job within {timeout:?}"),
    }
}

fn type_suffix(problem_type: &Option<DapProblemType>) -> String {
    match problem_type {
        Some(t) => format!(", {}", t.type_uri()),
        None => String::new(),
    }
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// The fields of an RFC 9457 problem document that the collector reads.
#[derive(Debug, Default, Deserialize)]
struct ProblemJson {
    #[serde(rename = "type")]
    type_uri: Option<String>,
    title: Option<String>,
    detail: Option<String>,
}

/// A parsed problem document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) problem_type: Option<DapProblemType>,
    pub(crate) detail: String,
}

/// Longest stretch of a non-problem body quoted in an error message.
const MAX_QUOTED_BODY: usize = 200;

/// Reads a problem document out of an error response, if it is one: the content type says
/// `application/problem+json`, or the body is a JSON object with a `type` member.
pub(crate) fn parse_problem(content_type: Option<&str>, body: &[u8]) -> Option<Problem> {
    let declared = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case(PROBLEM_JSON)
    });
    let doc: ProblemJson = match serde_json::from_slice(body) {
        Ok(doc) => doc,
        Err(_) if declared => ProblemJson::default(),
        Err(_) => return None,
    };
    if !declared && doc.type_uri.is_none() {
        return None;
    }
    let problem_type = doc
        .type_uri
        .as_deref()
        .and_then(DapProblemType::from_type_uri);
    let mut detail = doc
        .detail
        .filter(|d| !d.trim().is_empty())
        .or(doc.title.filter(|t| !t.trim().is_empty()))
        .unwrap_or_else(|| "no detail given".to_owned());
    // A type we do not know says more than nothing, so keep it.
    if problem_type.is_none() {
        if let Some(t) = doc.type_uri.filter(|t| !t.is_empty() && t != "about:blank") {
            detail = format!("{detail} [{t}]");
        }
    }
    Some(Problem {
        problem_type,
        detail,
    })
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
    // An unreadable body still leaves the status to report.
    let body = response.bytes().await.unwrap_or_default();
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

fn quote_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dap_problem_document_is_parsed() {
        let body = br#"{"type":"urn:ietf:params:ppm:dap:error:batchInvalid","title":"The batch implied by the query is invalid.","status":400,"detail":"interval is not aligned"}"#;
        let e = error_from_parts(
            "the Leader at http://l/ refused the collection job".into(),
            400,
            Some(PROBLEM_JSON),
            body,
        );
        assert_eq!(e.problem_type(), Some(DapProblemType::BatchInvalid));
        assert_eq!(
            e.to_string(),
            "the Leader at http://l/ refused the collection job: interval is not aligned \
             (HTTP 400, urn:ietf:params:ppm:dap:error:batchInvalid)"
        );
    }

    #[test]
    fn title_and_unknown_types() {
        let body = br#"{"type":"urn:ietf:params:ppm:dap:error:unauthorizedRequest","title":"Unauthorized."}"#;
        let p =
            parse_problem(Some("application/problem+json; charset=utf-8"), body).expect("problem");
        assert_eq!(
            p,
            Problem {
                problem_type: Some(DapProblemType::UnauthorizedRequest),
                detail: "Unauthorized.".into()
            }
        );
        let p = parse_problem(None, br#"{"type":"tag:x","detail":"d"}"#).expect("problem");
        assert_eq!(
            p,
            Problem {
                problem_type: None,
                detail: "d [tag:x]".into()
            }
        );
        assert_eq!(parse_problem(Some("text/plain"), b"nope"), None);
        assert_eq!(parse_problem(Some("application/json"), b"{}"), None);
    }

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
