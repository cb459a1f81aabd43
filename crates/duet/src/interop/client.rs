//! The Client role: `/internal/test/upload` shards, encrypts and uploads one measurement with
//! `duet-client`, and answers once the Leader has accepted or refused it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use duet_client::{Client, ClientParameters};
use duet_core::task::parse_endpoint;
use duet_core::VdafInstance;
use duet_messages::dap09::{Duration, TaskId, Time};
use duet_messages::problem::DapProblemType;
use serde::Deserialize;
use serde_json::{json, Value};

use super::json::{self, Decimal};
use super::{common_routes, outcome, parse, BadRequest};

/// `/internal/test/upload`.
#[derive(Deserialize)]
struct UploadRequest {
    task_id: String,
    leader: String,
    helper: String,
    vdaf: Value,
    measurement: Value,
    #[serde(default)]
    time: Option<Decimal<u64>>,
    time_precision: Decimal<u64>,
}

/// What identifies a client: everything in an upload request but the measurement and time.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    task_id: TaskId,
    leader: String,
    helper: String,
    vdaf: VdafInstance,
    time_precision: u64,
}

/// Clients already built, so that each task's HPKE configs are fetched once (a client refetches
/// them itself when the Leader says they are outdated).
#[derive(Clone, Default)]
struct ClientState {
    clients: Arc<Mutex<HashMap<ClientKey, Arc<Client>>>>,
}

/// The Client's routes.
pub fn router() -> Router {
    Router::new()
        .route("/internal/test/upload", post(upload))
        .with_state(ClientState::default())
        .merge(common_routes(|| async { Ok(()) }))
}

async fn upload(State(state): State<ClientState>, body: Bytes) -> Result<Response, BadRequest> {
    let request = parse::<UploadRequest>("upload", &body)?;
    Ok(outcome(
        "upload",
        state.upload(request).await.map(|()| json!({})),
    ))
}

impl ClientState {
    async fn upload(&self, request: UploadRequest) -> Result<(), String> {
        let vdaf = json::vdaf(&request.vdaf)?;
        let measurement = json::measurement(&vdaf, &request.measurement)?;
        if request.time_precision.0 == 0 {
            return Err("\"time_precision\" must be at least 1 second".into());
        }
        let key = ClientKey {
            task_id: json::task_id(&request.task_id)?,
            leader: request.leader,
            helper: request.helper,
            vdaf,
            time_precision: request.time_precision.0,
        };
        let client = self.client(key).await?;
        let prepare = || {
            match request.time {
                Some(t) => client.prepare_report_at(&measurement, Time(t.0)),
                None => client.prepare_report(&measurement),
            }
            .map_err(|e| e.to_string())
        };
        match client.upload_report(&prepare()?).await {
            Err(e) if e.problem_type() == Some(DapProblemType::OutdatedConfig) => {
                tracing::debug!(error = %e, "HPKE config outdated; refetching and retrying once");
                client
                    .refresh_hpke_configs()
                    .await
                    .map_err(|e| e.to_string())?;
                client.upload_report(&prepare()?).await
            }
            other => other,
        }
        .map_err(|e| e.to_string())
    }

    /// The client for `key`, built (fetching both HPKE configs) on first use.
    async fn client(&self, key: ClientKey) -> Result<Arc<Client>, String> {
        let cached = self
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(client) = cached {
            return Ok(client);
        }
        let params = ClientParameters {
            task_id: key.task_id,
            leader_endpoint: parse_endpoint(&key.leader)
                .map_err(|e| format!("bad \"leader\": {e}"))?,
            helper_endpoint: parse_endpoint(&key.helper)
                .map_err(|e| format!("bad \"helper\": {e}"))?,
            time_precision: Duration(key.time_precision),
        };
        let client = Client::new(params, key.vdaf.clone(), super::http_client()?)
            .await
            .map_err(|e| e.to_string())?;
        let client = Arc::new(client);
        // Two concurrent first uploads may both build one; either is fine to keep.
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Arc::clone(&client));
        Ok(client)
    }
}
