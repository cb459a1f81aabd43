//! The client's error type, and the reading of error responses (RFC 9457 problem documents).

use duet_messages::problem::{DapProblemType, PROBLEM_JSON};
use serde::Deserialize;

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
}

impl ClientError {
    /// The DAP problem type, if the server answered with a problem document naming one.
    pub fn problem_type(&self) -> Option<DapProblemType> {
        match self {
            Self::Problem { problem_type, .. } => *problem_type,
            _ => None,
        }
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

/// The fields of an RFC 9457 problem document that the client reads.
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

/// Reads a problem document out of an error response, if it is one.
///
/// A body is taken as a problem document if its content type is `application/problem+json` or,
/// failing that, if it is a JSON object with a `type` member (some servers send plain
/// `application/json`).
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
        let body = br#"{"type":"urn:ietf:params:ppm:dap:error:outdatedConfig","title":"The message was generated using an outdated configuration.","status":400,"detail":"unknown HPKE config 7","taskid":"AAAA"}"#;
        let p = parse_problem(Some("application/problem+json"), body).expect("a problem");
        assert_eq!(p.problem_type, Some(DapProblemType::OutdatedConfig));
        assert_eq!(p.detail, "unknown HPKE config 7");
    }

    #[test]
    fn title_stands_in_for_a_missing_detail() {
        let body = br#"{"type":"urn:ietf:params:ppm:dap:error:reportRejected","title":"Report rejected."}"#;
        let p = parse_problem(Some("application/problem+json; charset=utf-8"), body)
            .expect("a problem");
        assert_eq!(p.problem_type, Some(DapProblemType::ReportRejected));
        assert_eq!(p.detail, "Report rejected.");
    }

    #[test]
    fn unknown_types_are_kept_in_the_detail() {
        let body = br#"{"type":"https://example.com/oops","detail":"went wrong"}"#;
        let p = parse_problem(Some("application/json"), body).expect("a problem");
        assert_eq!(p.problem_type, None);
        assert_eq!(p.detail, "went wrong [https://example.com/oops]");
    }

    #[test]
    fn non_problem_bodies_are_not_problems() {
        assert_eq!(
            parse_problem(Some("text/plain"), b"Internal Server Error"),
            None
        );
        assert_eq!(
            parse_problem(Some("application/json"), br#"{"error":"x"}"#),
            None
        );
        assert_eq!(parse_problem(None, b""), None);
        // A declared problem document that is not JSON is still a (vague) problem.
        let p = parse_problem(Some("application/problem+json"), b"garbage").expect("a problem");
        assert_eq!(
            p,
            Problem {
                problem_type: None,
                detail: "no detail given".into()
            }
        );
    }

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
