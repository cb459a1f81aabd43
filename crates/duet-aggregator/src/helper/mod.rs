//! The Helper: answers the Leader's aggregation-job and aggregate-share requests.

mod aggregate_share;
mod aggregation;

use std::sync::Arc;

use duet_core::Clock;
use duet_messages::dap09::TaskId;
use duet_messages::problem::DapProblemType;
use duet_store::Datastore;

use crate::config::AggregatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::shared::{Shared, TaskEntry};

/// The Helper role of one process.
pub struct Helper {
    pub(crate) shared: Shared,
}

impl Helper {
    /// A Helper over `store`, with metrics of its own.
    pub async fn new(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
    ) -> Result<Arc<Self>, Error> {
        Self::with_metrics(store, clock, config, Arc::default()).await
    }

    /// A Helper over `store` counting into `metrics` (which a Leader may share).
    pub async fn with_metrics(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            shared: Shared::new(store, clock, config, metrics).await?,
        }))
    }

    /// The Helper's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// How long a request's body may take to arrive (`http_body_timeout_ms`).
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shared.config.http_body_timeout_ms)
    }

    /// The HPKE configs this Helper publishes, for any task; for `task_id`, only if it knows
    /// the task (`unrecognizedTask` otherwise).
    pub async fn hpke_config_list(
        &self,
        task_id: Option<duet_messages::dap09::TaskId>,
    ) -> Result<duet_messages::dap09::HpkeConfigList, Error> {
        if let Some(task_id) = task_id {
            self.shared.require_task(&task_id).await?;
        }
        Ok(self.shared.hpke_config_list())
    }
}

impl Helper {
    /// Checks that the task exists and that the request carries the Leader's token: what a
    /// request must pass before the server reads its body.
    pub async fn authorize(
        &self,
        task_id: TaskId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<(), Error> {
        self.authorized(task_id, auth).await.map(drop)
    }

    /// The task, once the request has shown the Leader's token.
    pub(crate) async fn authorized(
        &self,
        task_id: TaskId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<Arc<TaskEntry>, Error> {
        let entry = self.shared.require_task(&task_id).await?;
        check_leader_auth(&entry, auth.0, auth.1)?;
        Ok(entry)
    }
}

/// Checks the Leader's token.
fn check_leader_auth(
    entry: &TaskEntry,
    dap_auth: Option<&[u8]>,
    authorization: Option<&[u8]>,
) -> Result<(), Error> {
    if entry
        .task
        .aggregator_auth_token
        .is_presented(dap_auth, authorization)
    {
        Ok(())
    } else {
        Err(Error::abort(
            DapProblemType::UnauthorizedRequest,
            Some(entry.task.id),
            "missing or wrong aggregator authentication token",
        ))
    }
}
