//! The Collector role: `add_task` makes a fresh HPKE keypair for the task, `collection_start`
//! creates a collection job at the Leader with `duet-collector`, and each `collection_poll` polls
//! it once, decrypting and unsharding when it is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use duet_collector::{CollectionResult, Collector, CollectorParameters, PollOutcome};
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
        let id = collector
            .start_collection(query)
            .await
            .map_err(|e| e.to_string())?;
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
        match collector
            .poll_once(&id, &query)
            .await
            .map_err(|e| e.to_string())?
        {
            PollOutcome::Pending { .. } => Ok(None),
            PollOutcome::Ready(result) => {
                if let Some(job) = self
                    .jobs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_mut(handle)
                {
                    job.result = Some(result.clone());
                }
                Ok(Some(result))
            }
        }
    }
}
