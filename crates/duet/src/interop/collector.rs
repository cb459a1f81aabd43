//! The Collector role: `add_task` makes a fresh HPKE keypair for the task, `collection_start`
//! creates a collection job at the Leader with `duet-collector`, and each `collection_poll` polls
//! it once, decrypting and unsharding when it is done. A runner takes an `error` as final, so a
//! failure that may pass (a lost connection, 429, 502–504) is not reported at once: a job's
//! creation is sent again under its ID, a few times, and a poll so failed is reported in
//! progress, up to [`PASSING_POLL_FAILURES`] in a row. A 500 is the Leader's answer for a job
//! that failed, and is reported.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use duet_collector::{
    CollectionResult, Collector, CollectorError, CollectorParameters, PollOutcome,
};
use duet_core::hpke::HpkeKeypair;
use duet_core::task::parse_endpoint;
use duet_core::AuthenticationToken;
use duet_messages::dap09::{CollectionJobId, HpkeConfigId, Query, TaskId};
use duet_messages::Encode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json::{self, Decimal, QueryObject};
use super::{common_routes, header_safe, outcome, parse, reply, BadRequest};

/// `/internal/test/add_task` (Collector).
#[derive(Deserialize)]
struct AddTaskRequest {
    task_id: String,
    leader: String,
    vdaf: Value,
    collector_authentication_token: String,
    query_type: Decimal<u8>,
}

/// `/internal/test/collection_start`.
#[derive(Deserialize)]
struct CollectionStartRequest {
    task_id: String,
    #[serde(default)]
    agg_param: String,
    query: QueryObject,
}

/// `/internal/test/collection_poll`.
#[derive(Deserialize)]
struct CollectionPollRequest {
    handle: String,
}

struct CollectorTask {
    collector: Collector,
    query_type: u8,
}

/// A started collection job; the handle is its collection job ID.
struct Job {
    collector: Collector,
    id: CollectionJobId,
    query: Query,
    /// Kept once ready, so that later polls answer the same.
    result: Option<CollectionResult>,
    /// Polls in a row that failed in a way that may pass, reported as still in progress.
    passing_failures: u32,
}

/// Attempts at creating a collection job whose failures may pass, about 3 s in all.
const START_ATTEMPTS: u32 = 5;
/// The pause after a first attempt at creating a collection job failed; doubled after each.
const FIRST_START_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
/// Polls in a row whose failures may pass (the runner polls about once a second) before a poll
/// reports its error.
const PASSING_POLL_FAILURES: u32 = 30;

/// Whether a request that failed so may succeed when sent again: its connection or its answer
/// was lost, or the Leader was busy (429), or a gateway or the Leader was briefly unavailable
/// (502–504). Not a 500: the answer a Leader gives for a collection job that failed.
fn may_pass(e: &CollectorError) -> bool {
    match e {
        CollectorError::Http { .. } => true,
        CollectorError::Problem { status, .. }
        | CollectorError::UnexpectedStatus { status, .. } => {
            matches!(*status, 429 | 502..=504)
        }
        _ => false,
    }
}

#[derive(Clone, Default)]
struct CollectorState {
    tasks: Arc<Mutex<HashMap<TaskId, CollectorTask>>>,
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

/// The Collector's routes.
pub fn router() -> Router {
    Router::new()
        .route("/internal/test/add_task", post(add_task))
        .route("/internal/test/collection_start", post(collection_start))
        .route("/internal/test/collection_poll", post(collection_poll))
        .with_state(CollectorState::default())
        .merge(common_routes(|| async { Ok(()) }))
}

async fn add_task(
    State(state): State<CollectorState>,
    body: Bytes,
) -> Result<Response, BadRequest> {
    let request = parse::<AddTaskRequest>("add_task", &body)?;
    Ok(outcome("add_task", state.add_task(request)))
}

async fn collection_start(
    State(state): State<CollectorState>,
    body: Bytes,
) -> Result<Response, BadRequest> {
    let request = parse::<CollectionStartRequest>("collection_start", &body)?;
    Ok(outcome("collection_start", state.start(request).await))
}

async fn collection_poll(
    State(state): State<CollectorState>,
    body: Bytes,
) -> Result<Response, BadRequest> {
    let request = parse::<CollectionPollRequest>("collection_poll", &body)?;
    Ok(match state.poll(&request.handle).await {
        Ok(Some(result)) => {
            tracing::info!(handle = request.handle, "collection complete");
            reply(complete(&result))
        }
        Ok(None) => reply(json!({"status": "in progress"})),
        Err(e) => outcome("collection_poll", Err(e)),
    })
}

/// A finished collection as the draft reports it: counts and times as numbers, the aggregate as
/// decimal strings, the batch ID for fixed_size.
fn complete(result: &CollectionResult) -> Value {
    let mut body = json!({
        "status": "complete",
        "report_count": result.report_count,
        "interval_start": result.interval.start.0,
        "interval_duration": result.interval.duration.0,
        "result": json::result(&result.aggregate),
    });
    if let Some(batch_id) = &result.batch_id {
        body["batch_id"] = json::b64(batch_id.as_bytes()).into();
    }
    body
}

impl CollectorState {
    fn add_task(&self, request: AddTaskRequest) -> Result<Value, String> {
        let task_id = json::task_id(&request.task_id)?;
        json::check_query_type(request.query_type.0)?;
        let vdaf = json::vdaf(&request.vdaf)?;
        header_safe(
            "collector_authentication_token",
            &request.collector_authentication_token,
        )?;
        let hpke_keypair = HpkeKeypair::generate(HpkeConfigId(rand::random()));
        let config = hpke_keypair.config.get_encoded();
        let params = CollectorParameters {
            task_id,
            leader_endpoint: parse_endpoint(&request.leader)
                .map_err(|e| format!("bad \"leader\": {e}"))?,
            // Janus 0.7's collector and the draft both send it as `DAP-Auth-Token`.
            auth_token: AuthenticationToken::DapAuth(request.collector_authentication_token),
            hpke_keypair,
        };
        let collector =
            Collector::new(params, vdaf, super::http_client()?).map_err(|e| e.to_string())?;
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        if tasks.contains_key(&task_id) {
            return Err(format!("task {task_id} was already added"));
        }
        tasks.insert(
            task_id,
            CollectorTask {
                collector,
                query_type: request.query_type.0,
            },
        );
        Ok(json!({"collector_hpke_config": json::b64(&config)}))
    }

    async fn start(&self, request: CollectionStartRequest) -> Result<Value, String> {
        let task_id = json::task_id(&request.task_id)?;
        let query = request.query.to_query()?;
        if !json::unb64("agg_param", &request.agg_param)?.is_empty() {
            return Err("Prio3 takes an empty aggregation parameter".into());
        }
        let collector = {
            let tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
            let task = tasks
                .get(&task_id)
                .ok_or_else(|| format!("task {task_id} was not added to this collector"))?;
            if query.query_type().as_u8() != task.query_type {
                return Err(format!(
                    "the query is of type {}, the task's query type is {}",
                    query.query_type().as_u8(),
                    task.query_type
                ));
            }
            task.collector.clone()
        };
        // The Leader takes the same request for a job again, so a job whose creation may have
        // failed on the way is created again under its ID.
        let id = CollectionJobId::random();
        let mut pause = FIRST_START_PAUSE;
        for attempt in 1.. {
            match collector.start_collection_as(id, query).await {
                Ok(()) => break,
                Err(e) if may_pass(&e) && attempt < START_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "creating the collection job failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let handle = id.to_string();
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                handle.clone(),
                Job {
                    collector,
                    id,
                    query,
                    result: None,
                    passing_failures: 0,
                },
            );
        Ok(json!({ "handle": handle }))
    }

    /// Polls a job once: `None` while the Leader is still working on it.
    async fn poll(&self, handle: &str) -> Result<Option<CollectionResult>, String> {
        let (collector, id, query) = {
            let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let job = jobs
                .get(handle)
                .ok_or_else(|| format!("no collection job has the handle '{handle}'"))?;
            if let Some(result) = &job.result {
                return Ok(Some(result.clone()));
            }
            (job.collector.clone(), job.id, job.query)
        };
        let polled = collector.poll_once(&id, &query).await;
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let job = jobs
            .get_mut(handle)
            .ok_or_else(|| format!("no collection job has the handle '{handle}'"))?;
        match polled {
            Ok(PollOutcome::Pending { .. }) => {
                job.passing_failures = 0;
                Ok(None)
            }
            Ok(PollOutcome::Ready(result)) => {
                job.result = Some(result.clone());
                Ok(Some(result))
            }
            // Still in progress as far as the runner can tell: the next poll may get through.
            Err(e) if may_pass(&e) && job.passing_failures < PASSING_POLL_FAILURES => {
                job.passing_failures += 1;
                tracing::debug!(error = %e, "polling the collection job failed; reported in progress");
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const UNAVAILABLE: &str =
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
    const FAILED: &str = "HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\n\
                          content-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}";

    /// A Leader that answers the `i`-th request with `answers[i]` (the last one for all after
    /// it); returns its URL and the count of requests it answered.
    async fn scripted_leader(answers: &'static [&'static str]) -> (String, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&seen);
        let url = duet_core::http::testing::answer_each(move |_| {
            let i = count.fetch_add(1, Ordering::SeqCst);
            answers[i.min(answers.len() - 1)].as_bytes().to_vec()
        })
        .await;
        (url.to_string(), seen)
    }

    /// A collector with a Prio3Count task at `leader`; returns it and the task's ID.
    fn collector_of(leader: &str) -> (CollectorState, &'static str) {
        let task_id = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";
        let state = CollectorState::default();
        let request: AddTaskRequest = serde_json::from_value(json!({
            "task_id": task_id,
            "leader": leader,
            "vdaf": {"type": "Prio3Count"},
            "collector_authentication_token": "token",
            "query_type": 1,
        }))
        .expect("request");
        state.add_task(request).expect("added");
        (state, task_id)
    }

    fn start_request(task_id: &str) -> CollectionStartRequest {
        serde_json::from_value(json!({
            "task_id": task_id,
            "agg_param": "",
            "query": {"type": 1, "batch_interval_start": 1_699_999_200, "batch_interval_duration": 3600},
        }))
        .expect("request")
    }

    /// A Leader briefly unavailable (503) does not fail the run: the job's creation is sent
    /// again under its ID, and a poll it fails is still in progress. A 500, the answer for a
    /// job that failed, is an error at once.
    #[tokio::test]
    async fn a_leader_briefly_unavailable_does_not_fail_a_collection() {
        // Creation: 503, then 201. Polls: 503, 503, then 500.
        let answers: &'static [&'static str] = &[
            UNAVAILABLE,
            "HTTP/1.1 201 Created\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            UNAVAILABLE,
            UNAVAILABLE,
            FAILED,
        ];
        let (url, seen) = scripted_leader(answers).await;
        let (state, task_id) = collector_of(&url);
        let started = state.start(start_request(task_id)).await.expect("started");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        let handle = started["handle"].as_str().expect("handle").to_owned();
        assert_eq!(state.poll(&handle).await, Ok(None));
        assert_eq!(state.poll(&handle).await, Ok(None));
        let e = state.poll(&handle).await.expect_err("failed job");
        assert!(e.contains("HTTP 500"), "{e}");
    }

    /// A Leader that stays unavailable fails the poll after a bounded number of polls.
    #[tokio::test]
    async fn a_leader_that_stays_unavailable_fails_the_poll() {
        let answers: &'static [&'static str] = &[
            "HTTP/1.1 201 Created\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            UNAVAILABLE,
        ];
        let (url, _) = scripted_leader(answers).await;
        let (state, task_id) = collector_of(&url);
        let started = state.start(start_request(task_id)).await.expect("started");
        let handle = started["handle"].as_str().expect("handle").to_owned();
        for _ in 0..PASSING_POLL_FAILURES {
            assert_eq!(state.poll(&handle).await, Ok(None));
        }
        let e = state.poll(&handle).await.expect_err("unavailable too long");
        assert!(e.contains("503"), "{e}");
    }
}
