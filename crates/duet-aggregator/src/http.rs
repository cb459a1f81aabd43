//! The HTTP layer: the only module that knows axum. Every handler checks the media type and
//! authentication headers, decodes, calls the protocol core and encodes; every error becomes an
//! RFC 9457 problem document.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use duet_messages::dap09::{media_type, AggregationJobId, CollectionJobId, TaskId};
use duet_messages::problem::{DapProblemType, PROBLEM_JSON};
use duet_messages::Encode;

use crate::error::Error;
use crate::helper::Helper;
use crate::leader::{Leader, PollResult};

/// Largest accepted collection request: a query and a Prio3 aggregation parameter (empty) take
/// a few dozen bytes.
const MAX_COLLECTION_REQ_BYTES: usize = 64 * 1024;
/// Largest accepted aggregator-to-aggregator body.
const MAX_PEER_BYTES: usize = 256 << 20;

/// An error on its way to becoming a response.
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        match self.0 {
            Error::Abort(abort) => {
                let status = StatusCode::from_u16(abort.problem.http_status())
                    .unwrap_or(StatusCode::BAD_REQUEST);
                let mut doc = serde_json::json!({
                    "type": abort.problem.type_uri(),
                    "title": abort.problem.description(),
                    "status": status.as_u16(),
                    "detail": abort.detail,
                });
                if let Some(t) = abort.task_id {
                    doc["taskid"] = serde_json::Value::String(t.to_string());
                }
                tracing::debug!(problem = abort.problem.type_uri(), detail = %doc["detail"], "request aborted");
                (
                    status,
                    [(header::CONTENT_TYPE, PROBLEM_JSON)],
                    doc.to_string(),
                )
                    .into_response()
            }
            Error::Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "the server is busy; retry later",
            )
                .into_response(),
            Error::TooLarge { limit } => {
                let doc = serde_json::json!({
                    "type": "about:blank",
                    "title": "Content Too Large",
                    "status": 413,
                    "detail": format!("the request body is over {limit} bytes"),
                });
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    [(header::CONTENT_TYPE, PROBLEM_JSON)],
                    doc.to_string(),
                )
                    .into_response()
            }
            Error::SlowBody { after } => {
                let doc = serde_json::json!({
                    "type": "about:blank",
                    "title": "Request Timeout",
                    "status": 408,
                    "detail": format!(
                        "the request body did not arrive within {} s",
                        after.as_secs()
                    ),
                });
                (
                    StatusCode::REQUEST_TIMEOUT,
                    [
                        (header::CONTENT_TYPE, PROBLEM_JSON),
                        (header::CONNECTION, "close"),
                    ],
                    doc.to_string(),
                )
                    .into_response()
            }
            e => {
                tracing::error!(error = %e, "request failed");
                let doc = serde_json::json!({
                    "type": "about:blank",
                    "title": "Internal Server Error",
                    "status": 500,
                });
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, PROBLEM_JSON)],
                    doc.to_string(),
                )
                    .into_response()
            }
        }
    }
}

type HttpResult<T> = Result<T, HttpError>;

fn invalid(detail: impl Into<String>) -> HttpError {
    HttpError(Error::abort(DapProblemType::InvalidMessage, None, detail))
}

/// `invalidMessage` about the task `task_id`.
fn invalid_for(task_id: TaskId, detail: impl Into<String>) -> HttpError {
    HttpError(Error::abort(
        DapProblemType::InvalidMessage,
        Some(task_id),
        detail,
    ))
}

fn require_media_type(task_id: TaskId, headers: &HeaderMap, expected: &str) -> HttpResult<()> {
    let got = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = got.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(invalid_for(
            task_id,
            format!("expected content type {expected}, got '{got}'"),
        ))
    }
}

/// A route's path parameters, as axum's `Path` reads them; a path whose parameters do not
/// decode (escapes that are not UTF-8) is answered with an `invalidMessage` problem document,
/// as any other malformed request, rather than axum's plain-text 400 (a route that does not
/// match its handler is a 500).
struct PathParams<T>(T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(params)) => Ok(Self(params)),
            Err(e @ PathRejection::FailedToDeserializePathParams(_)) => {
                Err(invalid(format!("the request's path: {}", e.body_text())))
            }
            Err(e) => Err(HttpError(Error::Internal(e.body_text()))),
        }
    }
}

fn parse_task_id(s: &str) -> HttpResult<TaskId> {
    s.parse()
        .map_err(|_| invalid(format!("'{s}' is not a task ID")))
}

fn auth(headers: &HeaderMap) -> (Option<&[u8]>, Option<&[u8]>) {
    (
        headers
            .get(duet_core::auth::DAP_AUTH_HEADER)
            .map(HeaderValue::as_bytes),
        headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    )
}

/// Reads a request's body, up to `limit` bytes and for at most `deadline`. Handlers read it only
/// once the request has passed the checks that need no body (the task, the media type, the
/// Helper's token), so that no stranger makes the server hold a body it would refuse.
async fn read_body(body: Body, limit: usize, deadline: std::time::Duration) -> HttpResult<Bytes> {
    // A declared length over the limit is refused before anything is read.
    let declared = axum::body::HttpBody::size_hint(&body).lower();
    if usize::try_from(declared).map_or(true, |n| n > limit) {
        return Err(HttpError(Error::TooLarge { limit }));
    }
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| HttpError(Error::SlowBody { after: deadline }))?;
    read.map_err(|e| {
        // A body over the limit, or a connection that failed while sending it.
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError(Error::TooLarge { limit })
        } else {
            invalid(format!("could not read the request body: {e}"))
        }
    })
}

fn message(status: StatusCode, media_type: &'static str, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, media_type)], body).into_response()
}

fn hpke_config_response(list: duet_messages::dap09::HpkeConfigList) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, media_type::HPKE_CONFIG_LIST),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        list.get_encoded(),
    )
        .into_response()
}

/// The Leader's DAP routes.
pub fn leader_router(leader: Arc<Leader>) -> Router {
    Router::new()
        .route("/hpke_config", get(leader_hpke_config))
        .route("/tasks/{task_id}/reports", put(upload))
        .route(
            "/tasks/{task_id}/collection_jobs/{job_id}",
            put(create_collection_job)
                .post(poll_collection_job)
                .delete(delete_collection_job),
        )
        .with_state(leader)
}

/// The Helper's DAP routes.
pub fn helper_router(helper: Arc<Helper>) -> Router {
    Router::new()
        .route("/hpke_config", get(helper_hpke_config))
        .route(
            "/tasks/{task_id}/aggregation_jobs/{job_id}",
            put(aggregation_job_init)
                .post(aggregation_job_continue)
                .delete(aggregation_job_delete),
        )
        .route("/tasks/{task_id}/aggregate_shares", post(aggregate_share))
        .with_state(helper)
}

async fn leader_hpke_config(
    State(leader): State<Arc<Leader>>,
    RawQuery(query): RawQuery,
) -> HttpResult<Response> {
    let task_id = query_task_id(query.as_deref())?;
    Ok(hpke_config_response(
        leader.hpke_config_list(task_id).await?,
    ))
}

async fn helper_hpke_config(
    State(helper): State<Arc<Helper>>,
    RawQuery(query): RawQuery,
) -> HttpResult<Response> {
    let task_id = query_task_id(query.as_deref())?;
    Ok(hpke_config_response(
        helper.hpke_config_list(task_id).await?,
    ))
}

/// The `task_id` query parameter of `/hpke_config`, which a client may send to name the task
/// whose configs it wants.
fn query_task_id(query: Option<&str>) -> HttpResult<Option<TaskId>> {
    let Some(query) = query else {
        return Ok(None);
    };
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "task_id")
        .map(|(_, value)| parse_task_id(&value))
        .transpose()
}

async fn upload(
    State(leader): State<Arc<Leader>>,
    PathParams(task_id): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<StatusCode> {
    let result = async {
        let task_id = parse_task_id(&task_id)?;
        // The task first (DAP-09 §4.4.2), then the media type; the body no longer than a report
        // of this task can be, and read only for a task this Leader has.
        let (task, limit) = leader.upload_limit(task_id).await?;
        require_media_type(task_id, &headers, media_type::REPORT)?;
        let body = read_body(body, limit, leader.body_timeout()).await?;
        leader.upload_to(&task, &body).await?;
        Ok(())
    }
    .await;
    leader
        .metrics()
        .upload(result.as_ref().map(|_| ()).map_err(|e: &HttpError| &e.0));
    result.map(|()| StatusCode::CREATED)
}

fn parse_collection_job(task_id: &str, job_id: &str) -> HttpResult<(TaskId, CollectionJobId)> {
    let task_id = parse_task_id(task_id)?;
    let job: CollectionJobId = job_id
        .parse()
        .map_err(|_| invalid_for(task_id, format!("'{job_id}' is not a collection job ID")))?;
    Ok((task_id, job))
}

async fn create_collection_job(
    State(leader): State<Arc<Leader>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<StatusCode> {
    let (task_id, job_id) = parse_collection_job(&task_id, &job_id)?;
    // The task and the collector's token first, so that no stranger's body is read.
    leader.authorize_collector(task_id, auth(&headers)).await?;
    require_media_type(task_id, &headers, media_type::COLLECTION_REQ)?;
    let body = read_body(body, MAX_COLLECTION_REQ_BYTES, leader.body_timeout()).await?;
    leader
        .create_collection_job(task_id, job_id, auth(&headers), &body)
        .await?;
    Ok(StatusCode::CREATED)
}

async fn poll_collection_job(
    State(leader): State<Arc<Leader>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> HttpResult<Response> {
    let (task_id, job_id) = parse_collection_job(&task_id, &job_id)?;
    Ok(
        match leader
            .poll_collection_job(task_id, job_id, auth(&headers))
            .await?
        {
            None => StatusCode::NOT_FOUND.into_response(),
            Some(PollResult::Pending) => StatusCode::ACCEPTED.into_response(),
            Some(PollResult::Ready(c)) => {
                message(StatusCode::OK, media_type::COLLECTION, c.get_encoded())
            }
            Some(PollResult::Deleted) => StatusCode::NO_CONTENT.into_response(),
            // The reason itself stays in the Leader's log: it quotes the Helper, whose
            // words may count the reports of a batch too small to collect, or name the
            // aggregators' internals.
            Some(PollResult::Failed(reason)) => match batch_refusal(&reason) {
                Some(problem) => HttpError(Error::abort(
                    problem,
                    Some(task_id),
                    "the collection job failed: the Helper refused the batch",
                ))
                .into_response(),
                None => {
                    let doc = serde_json::json!({
                        "type": "about:blank",
                        "title": "The collection job failed",
                        "status": 500,
                        "detail": "the collection job failed; the Leader's log has the reason",
                        "taskid": task_id.to_string(),
                    });
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, PROBLEM_JSON)],
                        doc.to_string(),
                    )
                        .into_response()
                }
            },
        },
    )
}

/// The batch-validation problem a failed collection job's reason names, if the Helper refused
/// its aggregate-share request with one (the reason quotes the Helper's problem type): the
/// collector then gets that problem, as DAP-09 has the Leader answer a failed job's polls, rather
/// than a server error. Other problems (a wrong token between the aggregators, say) are the
/// aggregators' to fix, and stay server errors.
fn batch_refusal(reason: &str) -> Option<DapProblemType> {
    let at = reason.rfind(duet_messages::problem::TYPE_URI_PREFIX)?;
    let uri = &reason[at..];
    let name_len = uri[duet_messages::problem::TYPE_URI_PREFIX.len()..]
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(uri.len() - duet_messages::problem::TYPE_URI_PREFIX.len());
    let uri = &uri[..duet_messages::problem::TYPE_URI_PREFIX.len() + name_len];
    DapProblemType::from_type_uri(uri).filter(|p| {
        matches!(
            p,
            DapProblemType::BatchInvalid
                | DapProblemType::InvalidBatchSize
                | DapProblemType::BatchQueriedTooManyTimes
                | DapProblemType::BatchMismatch
                | DapProblemType::BatchOverlap
        )
    })
}

async fn delete_collection_job(
    State(leader): State<Arc<Leader>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> HttpResult<StatusCode> {
    let (task_id, job_id) = parse_collection_job(&task_id, &job_id)?;
    Ok(
        if leader
            .delete_collection_job(task_id, job_id, auth(&headers))
            .await?
        {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::NOT_FOUND
        },
    )
}

fn parse_aggregation_job(task_id: &str, job_id: &str) -> HttpResult<(TaskId, AggregationJobId)> {
    let task_id = parse_task_id(task_id)?;
    let job: AggregationJobId = job_id
        .parse()
        .map_err(|_| invalid_for(task_id, format!("'{job_id}' is not an aggregation job ID")))?;
    Ok((task_id, job))
}

async fn aggregation_job_init(
    State(helper): State<Arc<Helper>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    let (task_id, job_id) = parse_aggregation_job(&task_id, &job_id)?;
    helper.authorize(task_id, auth(&headers)).await?;
    require_media_type(task_id, &headers, media_type::AGGREGATION_JOB_INIT_REQ)?;
    let body = read_body(body, MAX_PEER_BYTES, helper.body_timeout()).await?;
    let resp = helper
        .aggregation_job_init(task_id, job_id, auth(&headers), &body)
        .await?;
    Ok(message(
        StatusCode::CREATED,
        media_type::AGGREGATION_JOB_RESP,
        resp,
    ))
}

async fn aggregation_job_continue(
    State(helper): State<Arc<Helper>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    let (task_id, job_id) = parse_aggregation_job(&task_id, &job_id)?;
    helper.authorize(task_id, auth(&headers)).await?;
    require_media_type(task_id, &headers, media_type::AGGREGATION_JOB_CONTINUE_REQ)?;
    let body = read_body(body, MAX_PEER_BYTES, helper.body_timeout()).await?;
    let resp = helper
        .aggregation_job_continue(task_id, job_id, auth(&headers), &body)
        .await?;
    Ok(message(
        StatusCode::OK,
        media_type::AGGREGATION_JOB_RESP,
        resp,
    ))
}

async fn aggregation_job_delete(
    State(helper): State<Arc<Helper>>,
    PathParams((task_id, job_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> HttpResult<StatusCode> {
    let (task_id, _) = parse_aggregation_job(&task_id, &job_id)?;
    helper
        .aggregation_job_delete(task_id, auth(&headers))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn aggregate_share(
    State(helper): State<Arc<Helper>>,
    PathParams(task_id): PathParams<String>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Response> {
    let task_id = parse_task_id(&task_id)?;
    helper.authorize(task_id, auth(&headers)).await?;
    require_media_type(task_id, &headers, media_type::AGGREGATE_SHARE_REQ)?;
    let body = read_body(body, MAX_PEER_BYTES, helper.body_timeout()).await?;
    let resp = helper
        .aggregate_share(task_id, auth(&headers), &body)
        .await?;
    Ok(message(StatusCode::OK, media_type::AGGREGATE_SHARE, resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed collection job whose reason quotes a batch problem of the Helper's is that
    /// problem; any other reason is not.
    #[test]
    fn batch_refusals_are_found_in_reasons() {
        let uri = |p: DapProblemType| p.type_uri();
        let reason = format!(
            "http://helper/tasks/x/aggregate_shares answered 400 Bad Request: the batch has 2 \
             reports; the minimum is 100, {}",
            uri(DapProblemType::InvalidBatchSize)
        );
        assert_eq!(
            batch_refusal(&reason),
            Some(DapProblemType::InvalidBatchSize)
        );
        let quoted = format!("({}).", uri(DapProblemType::BatchMismatch));
        assert_eq!(batch_refusal(&quoted), Some(DapProblemType::BatchMismatch));
        for other in [
            format!("refused: {}", uri(DapProblemType::UnauthorizedRequest)),
            "request to http://helper failed: connection refused".to_string(),
            format!("{}nosuchProblem", duet_messages::problem::TYPE_URI_PREFIX),
        ] {
            assert_eq!(batch_refusal(&other), None, "{other}");
        }
    }

    /// A body over the limit is a 413 problem document; one within it is read whole.
    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let second = std::time::Duration::from_secs(1);
        let read = read_body(Body::from(vec![7u8; 10]), 10, second).await;
        assert_eq!(read.ok().as_deref(), Some(&[7u8; 10][..]));
        let Err(HttpError(Error::TooLarge { limit: 10 })) =
            read_body(Body::from(vec![7u8; 11]), 10, second).await
        else {
            panic!("an 11-byte body passed a 10-byte limit");
        };
        let response = HttpError(Error::TooLarge { limit: 10 }).into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(PROBLEM_JSON.as_bytes())
        );
    }
}
