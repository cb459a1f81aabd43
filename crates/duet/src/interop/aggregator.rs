//! The Aggregator role: one process that becomes a task's Leader or Helper as `add_task` says.
//!
//! Both roles are served at the root of the test API's port, as Janus's interop aggregator does
//! (its runner ignores `endpoint_for_task` and builds `http://NAME:8080/`): the Leader's routes,
//! with the Helper's as the fallback. Their DAP paths differ except `/hpke_config`, so the two
//! roles are given one HPKE key ring and the Leader's answer serves for both (and knows both
//! roles' tasks).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use duet_aggregator::helper::Helper;
use duet_aggregator::http::helper_router;
use duet_aggregator::server::{run_with, RoleConfig, Roles};
use duet_aggregator::{with_first_key, AggregatorConfig, Clock};
use duet_core::{
    AggregatorRole, AuthenticationToken, QueryTypeConfig, RealClock, Task, TaskParameters,
};
use duet_store::{Datastore, StoreError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::json::{self, Decimal};
use super::{common_routes, header_safe, outcome, parse, BadRequest, ListenArgs};

/// The DAP endpoint `endpoint_for_task` answers for either role.
const DAP_ENDPOINT: &str = "/";
/// How far ahead of our clock a report may be; runner and aggregators share a host.
const TOLERABLE_CLOCK_SKEW_S: u64 = 60;

/// `duet interop aggregator` flags.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// SQLite file for tasks, reports and aggregates (default: a temporary file, removed on exit).
    #[arg(long)]
    db: Option<String>,
}

/// `/internal/test/endpoint_for_task`.
#[derive(Deserialize)]
struct EndpointForTaskRequest {
    task_id: String,
    /// Checked to be `leader` or `helper`; both get the same endpoint.
    #[serde(rename = "role")]
    _role: AggregatorRole,
    // `hostname` is not needed: the endpoint is relative.
}

/// `/internal/test/add_task` (Aggregator).
#[derive(Deserialize)]
struct AddTaskRequest {
    task_id: String,
    leader: String,
    helper: String,
    vdaf: Value,
    leader_authentication_token: String,
    #[serde(default)]
    collector_authentication_token: Option<String>,
    role: AggregatorRole,
    vdaf_verify_key: String,
    max_batch_query_count: Decimal<u64>,
    query_type: Decimal<u8>,
    min_batch_size: Decimal<u64>,
    #[serde(default)]
    max_batch_size: Option<Decimal<u64>>,
    time_precision: Decimal<u64>,
    collector_hpke_config: String,
    #[serde(default)]
    task_expiration: Option<Decimal<u64>>,
}

/// Both roles' stores, on one database.
#[derive(Clone)]
struct AggregatorState {
    leader: Arc<dyn Datastore>,
    helper: Arc<dyn Datastore>,
}

impl AggregatorState {
    fn store(&self, role: AggregatorRole) -> &Arc<dyn Datastore> {
        match role {
            AggregatorRole::Leader => &self.leader,
            AggregatorRole::Helper => &self.helper,
        }
    }
}

/// Runs the interop aggregator until interrupted.
pub async fn run(args: Args) -> Result<()> {
    let listener = args.listen.bind().await?;
    let tmp = tempfile::tempdir().context("could not create a temporary directory")?;
    let db = match &args.db {
        Some(db) => db.clone(),
        None => tmp.path().join("duet-interop.sqlite").display().to_string(),
    };
    let state = AggregatorState {
        leader: crate::db::open(&db, AggregatorRole::Leader).await?,
        helper: crate::db::open(&db, AggregatorRole::Helper).await?,
    };
    share_hpke_keys(&state).await?;
    // Test runners poll for results: look for work often.
    let config = AggregatorConfig {
        polling_interval_ms: 500,
        ..AggregatorConfig::default()
    };
    let clock: Arc<dyn Clock> = Arc::new(RealClock);
    let helper = Helper::new(
        Arc::clone(&state.helper),
        Arc::clone(&clock),
        config.clone(),
    )
    .await?;
    let roles = Roles {
        leader: Some(RoleConfig {
            store: Arc::clone(&state.leader),
            path_prefix: DAP_ENDPOINT.into(),
        }),
        helper: None,
    };

    let extra = router(state).fallback_service(helper_router(Arc::clone(&helper)));
    let server = run_with(listener, roles, config, clock, extra).await?;
    if let Some(leader) = &server.leader {
        leader.share_hpke_config_with(helper);
    }
    eprintln!("duet serving on http://{}", server.local_addr);
    super::shutdown_signal().await;
    eprintln!("shutting down");
    server.shutdown().await?;
    drop(tmp);
    Ok(())
}

/// Makes the Helper hold every key the Leader publishes (creating the Leader's first key if
/// needed), so that the one `/hpke_config` both roles answer with is right for each.
async fn share_hpke_keys(state: &AggregatorState) -> Result<()> {
    let keys = with_first_key(&*state.leader, state.leader.get_hpke_keypairs().await?).await?;
    let helper_keys = state.helper.get_hpke_keypairs().await?;
    for key in keys {
        match helper_keys.iter().find(|h| h.config.id == key.config.id) {
            Some(same) if *same == key => {}
            Some(_) => bail!(
                "the database's Leader and Helper have different HPKE keys with config ID {}; \
                 use a fresh --db",
                key.config.id
            ),
            None => state.helper.put_hpke_keypair(&key).await?,
        }
    }
    Ok(())
}

/// The Aggregator's test routes (DAP itself is added by `run`).
fn router(state: AggregatorState) -> Router {
    let ready_state = state.clone();
    let ready = move || {
        let state = ready_state.clone();
        async move {
            for store in [&state.leader, &state.helper] {
                store
                    .health_check()
                    .await
                    .map_err(|e| format!("database: {e}"))?;
            }
            Ok(())
        }
    };
    Router::new()
        .route("/internal/test/endpoint_for_task", post(endpoint_for_task))
        .route("/internal/test/add_task", post(add_task))
        .with_state(state)
        .merge(common_routes(ready))
}

async fn endpoint_for_task(body: Bytes) -> Result<Response, BadRequest> {
    let request = parse::<EndpointForTaskRequest>("endpoint_for_task", &body)?;
    let result = json::task_id(&request.task_id).map(|_| json!({ "endpoint": DAP_ENDPOINT }));
    Ok(outcome("endpoint_for_task", result))
}

async fn add_task(
    State(state): State<AggregatorState>,
    body: Bytes,
) -> Result<Response, BadRequest> {
    let request = parse::<AddTaskRequest>("add_task", &body)?;
    let role = request.role;
    let result = match task(request) {
        Ok(task) => match state.store(role).put_task(&task).await {
            Ok(()) => {
                tracing::info!(task_id = %task.id, ?role, vdaf = %task.vdaf, "task added");
                Ok(json!({}))
            }
            Err(StoreError::AlreadyExists) => Err(format!(
                "a different task with ID {} already exists",
                task.id
            )),
            Err(e) => Err(format!("could not store the task: {e}")),
        },
        Err(e) => Err(e),
    };
    Ok(outcome("add_task", result))
}

/// The task an `add_task` request describes, validated.
fn task(request: AddTaskRequest) -> Result<Task, String> {
    let task_id = json::task_id(&request.task_id)?;
    let vdaf = json::vdaf(&request.vdaf)?;
    let query_type = match request.query_type.0 {
        1 => QueryTypeConfig::TimeInterval,
        2 => {
            let max_batch_size = request.max_batch_size.map(|m| m.0);
            return Err(format!(
                "query type 2 (fixed_size, max_batch_size {max_batch_size:?}) is not supported by \
                 Duet's aggregators yet: Leader-selected batches are not implemented; use query \
                 type 1 (time_interval)"
            ));
        }
        other => {
            return Err(format!(
                "unknown query type {other} (1 is time_interval, 2 is fixed_size)"
            ))
        }
    };
    header_safe(
        "leader_authentication_token",
        &request.leader_authentication_token,
    )?;
    let collector_auth_token = match request.role {
        AggregatorRole::Leader => {
            let token = request
                .collector_authentication_token
                .ok_or("a Leader needs \"collector_authentication_token\"")?;
            header_safe("collector_authentication_token", &token)?;
            Some(AuthenticationToken::DapAuth(token))
        }
        AggregatorRole::Helper => None,
    };
    let params = TaskParameters {
        task_id: task_id.to_string(),
        leader_endpoint: request.leader,
        helper_endpoint: request.helper,
        query_type,
        vdaf,
        vdaf_verify_key: request.vdaf_verify_key,
        max_batch_query_count: request.max_batch_query_count.0,
        task_expiration: request.task_expiration.map(|t| t.0),
        report_expiry_age: None,
        min_batch_size: request.min_batch_size.0,
        time_precision: request.time_precision.0,
        tolerable_clock_skew: TOLERABLE_CLOCK_SKEW_S,
        collector_hpke_config: request.collector_hpke_config,
        aggregator_auth_token: AuthenticationToken::DapAuth(request.leader_authentication_token),
        collector_auth_token,
    };
    let task = Task::from_parameters(&params).map_err(|e| e.to_string())?;
    task.check_new().map_err(|e| e.to_string())?;
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query_type: u8, role: &str) -> AddTaskRequest {
        let config =
            duet_core::hpke::HpkeKeypair::generate(duet_messages::dap09::HpkeConfigId(1)).config;
        serde_json::from_value(json!({
            "task_id": json::b64(&[1; 32]),
            "leader": "http://leader:8080/",
            "helper": "http://helper:8080/",
            "vdaf": {"type": "Prio3Sum", "bits": "8"},
            "leader_authentication_token": "aggregator-token",
            "collector_authentication_token": "collector-token",
            "role": role,
            "vdaf_verify_key": json::b64(&[2; 16]),
            "max_batch_query_count": 1,
            "query_type": query_type,
            "min_batch_size": "10",
            "max_batch_size": null,
            "time_precision": 3600,
            "collector_hpke_config": json::b64(&duet_messages::Encode::get_encoded(&config)),
        }))
        .expect("parses")
    }

    #[test]
    fn add_task_builds_a_task_per_role() {
        let leader = task(request(1, "leader")).expect("valid");
        assert_eq!(leader.min_batch_size, 10);
        assert!(leader.collector_auth_token.is_some());
        assert_eq!(leader.helper_endpoint.as_str(), "http://helper:8080/");
        let helper = task(request(1, "helper")).expect("valid");
        assert!(helper.collector_auth_token.is_none());
        let e = task(request(2, "leader")).expect_err("refused");
        assert!(e.contains("fixed_size"), "{e}");
        let e = task(request(7, "leader")).expect_err("refused");
        assert!(e.contains("unknown query type 7"), "{e}");
    }
}
