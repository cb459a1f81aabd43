//! Requests from the Leader to the Helper.

use duet_core::http::{read_at_most, ERROR_BODY_LIMIT};
use duet_core::AuthenticationToken;
use duet_messages::problem::DapProblemType;

/// Why a request to the peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// Worth retrying: the network failed, or the peer is overloaded or broken (5xx, 429), or
    /// it gave up on this request for reasons of the moment (408, a body that came too slowly;
    /// 421, 425), which say nothing of the request itself.
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
    /// The peer answered with a body larger than its request allows, which no Helper sends:
    /// not read beyond the limit, and handled as a malformed answer.
    #[error("{0}")]
    Oversized(String),
}

impl PeerError {
    /// Whether the Helper refused the request for how it is set up rather than for what the
    /// request says: it does not know the task (yet), takes no token of this Leader, serves
    /// nothing at the URL, redirects it elsewhere (never followed: the request carries the
    /// token), or takes no body this long (413: a proxy in front of it, say, with a limit below
    /// the jobs' size). An operator fixes those, so a job's attempts wait for the fix rather
    /// than its reports being dropped at once.
    pub(crate) fn is_configuration(&self) -> bool {
        matches!(
            self,
            PeerError::Rejected {
                status: 300..=399 | 401 | 403 | 404 | 413,
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

/// Sends one request and returns the successful response body, which may be at most `limit`
/// bytes long (the peer's answers are bounded by what was asked; a larger one is `Oversized`,
/// and no more of it is read).
pub(crate) async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: url::Url,
    media_type: &str,
    body: Vec<u8>,
    token: &AuthenticationToken,
    limit: usize,
) -> Result<Vec<u8>, PeerError> {
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
    let read_limit = if status.is_success() {
        limit
    } else {
        ERROR_BODY_LIMIT
    };
    let (bytes, whole) = read_at_most(resp, read_limit).await.map_err(|e| {
        PeerError::Transient(format!("reading the response from {url} failed: {e}"))
    })?;
    if status.is_success() {
        if !whole {
            return Err(PeerError::Oversized(format!(
                "{url} answered with more than the {limit} bytes its request allows"
            )));
        }
        return Ok(bytes);
    }
    // A cut error body is still worth quoting.
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
    if status.is_server_error()
        || matches!(
            status,
            reqwest::StatusCode::TOO_MANY_REQUESTS
                | reqwest::StatusCode::REQUEST_TIMEOUT
                | reqwest::StatusCode::MISDIRECTED_REQUEST
        )
        || status.as_u16() == 425
    {
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

#[cfg(test)]
mod tests {
    use duet_core::http::testing::answer_once;

    use super::*;

    async fn request(url: url::Url) -> Result<usize, PeerError> {
        let token = AuthenticationToken::DapAuth("token".into());
        send(
            &reqwest::Client::new(),
            reqwest::Method::POST,
            url,
            "application/octet-stream",
            b"request".to_vec(),
            &token,
            1 << 20,
        )
        .await
        .map(|body| body.len())
    }

    #[tokio::test]
    async fn answers_longer_than_the_request_allows_are_oversized() {
        let url = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 10000000000\r\n\r\nxxxx").await;
        let result = request(url).await;
        assert!(matches!(result, Err(PeerError::Oversized(_))), "{result:?}");
        let url = answer_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!(request(url).await.expect("answer"), 5);
    }

    #[tokio::test]
    async fn a_long_error_is_not_read() {
        let url = answer_once(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 10000000000\r\n\r\nxxxx",
        )
        .await;
        match request(url).await {
            Err(PeerError::Transient(m)) => assert!(m.contains("answered 503"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    /// A request the Helper gave up on for the moment (408: its body came too slowly) is tried
    /// again; one too large for it (413: a proxy's limit, say) waits for its operator; other
    /// refusals are final.
    #[tokio::test]
    async fn refusals_of_the_moment_and_of_set_up_are_retried() {
        for (answer, retried, configuration) in [
            (
                "HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n",
                true,
                false,
            ),
            (
                "HTTP/1.1 425 Too Early\r\ncontent-length: 0\r\n\r\n",
                true,
                false,
            ),
            (
                "HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
                true,
                false,
            ),
            (
                "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
                false,
                true,
            ),
            (
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
                false,
                true,
            ),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
                false,
                false,
            ),
        ] {
            let status = &answer[9..12];
            let url = answer_once(answer).await;
            let result = request(url).await;
            match result {
                Err(PeerError::Transient(_)) => assert!(retried, "{status}"),
                Err(ref e @ PeerError::Rejected { .. }) => {
                    assert!(!retried, "{status}");
                    assert_eq!(e.is_configuration(), configuration, "{status}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }
}
