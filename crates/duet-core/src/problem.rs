//! Reading RFC 9457 problem documents out of error responses, shared by every HTTP client of
//! Duet (the DAP client, the collector, the Leader talking to the Helper).

use duet_messages::problem::{DapProblemType, PROBLEM_JSON};
use serde::Deserialize;

/// `", <type URI>"` when a problem type is known, for error messages.
pub fn type_suffix(problem_type: &Option<DapProblemType>) -> String {
    match problem_type {
        Some(t) => format!(", {}", t.type_uri()),
        None => String::new(),
    }
}

/// `": <body>"` when there is a body, for error messages.
pub fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// The fields of an RFC 9457 problem document that Duet reads.
#[derive(Debug, Default, Deserialize)]
struct ProblemJson {
    #[serde(rename = "type")]
    type_uri: Option<String>,
    title: Option<String>,
    detail: Option<String>,
}

/// A parsed problem document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The DAP problem type, when the document names one Duet knows.
    pub problem_type: Option<DapProblemType>,
    /// The human-readable explanation (detail, else title; an unknown type is appended).
    pub detail: String,
}

/// Longest stretch of a non-problem body quoted in an error message.
const MAX_QUOTED_BODY: usize = 200;

/// Reads a problem document out of an error response, if it is one.
///
/// A body is taken as a problem document if its content type is `application/problem+json` or,
/// failing that, if it is a JSON object with a `type` member (some servers send plain
/// `application/json`).
pub fn parse_problem(content_type: Option<&str>, body: &[u8]) -> Option<Problem> {
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

/// The start of a non-problem error body, for an error message.
pub fn quote_body(body: &[u8]) -> String {
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
}
