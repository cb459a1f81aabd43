//! Requests from the Leader to the Helper.

use duet_core::AuthenticationToken;
use duet_messages::problem::DapProblemType;

/// Why a request to the peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// Worth retrying: the network failed, or the peer is overloaded or broken (5xx, 429).
    #[error("{0}")]
    Transient(String),
    /// The peer refused the request (4xx); retrying the same request won't help, unless the
    /// refusal depends on state that changes (`batchMismatch` while a job is merging).
    #[error("the Helper refused the request with status {status}: {detail}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The problem type or body text.
        detail: String,
        /// The DAP problem type, if the answer was a problem document of one.
        problem: Option<DapProblemType>,
    },
}

impl PeerError {
    /// Whether the Helper refused the request for how it is set up rather than for what the
    /// request says: it does not know the task (yet), takes no token of this Leader, serves
    /// nothing at the URL, or redirects it elsewhere (never followed: the request carries the
    /// token). An operator fixes those, so a job's attempts wait for the fix rather than its
    /// reports being dropped at once.
    pub(crate) fn is_configuration(&self) -> bool {
        matches!(
            self,
            PeerError::Rejected {
                status: 300..=399 | 401 | 403 | 404,
                ..
            } | PeerError::Rejected {
                problem: Some(
                    DapProblemType::UnrecognizedTask | DapProblemType::UnauthorizedRequest
                ),
                ..
            }
        )
    }
}

/// Sends one request and returns the successful response body.
pub(crate) async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: url::Url,
    media_type: &str,
    body: Vec<u8>,
    token: &AuthenticationToken,
) -> Result<bytes::Bytes, PeerError> {
    let (name, value) = token.request_header();
    let resp = http
        .request(method, url.clone())
        .header(reqwest::header::CONTENT_TYPE, media_type)
        .header(name, value)
        .body(body)
        .send()
        .await
        .map_err(|e| PeerError::Transient(format!("request to {url} failed: {e}")))?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = resp.bytes().await.map_err(|e| {
        PeerError::Transient(format!("reading the response from {url} failed: {e}"))
    })?;
    if status.is_success() {
        return Ok(bytes);
    }
    let parsed = duet_core::problem::parse_problem(content_type.as_deref(), &bytes);
    let problem = parsed.as_ref().and_then(|p| p.problem_type);
    let text = match parsed {
        Some(p) => format!(
            "{}{}",
            p.detail,
            duet_core::problem::type_suffix(&p.problem_type)
        ),
        None => duet_core::problem::quote_body(&bytes),
    };
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Err(PeerError::Transient(format!(
            "{url} answered {status}: {text}"
        )))
    } else {
        Err(PeerError::Rejected {
            status: status.as_u16(),
            detail: text,
            problem,
        })
    }
}
