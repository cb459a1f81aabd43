//! The Helper: answers the Leader's aggregation-job and aggregate-share requests.

mod aggregate_share;
mod aggregation;

use std::sync::Arc;

use duet_core::Clock;
use duet_messages::dap09::TaskId;
use duet_messages::problem::DapProblemType;
use duet_store::Datastore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AggregatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::shared::{Shared, TaskEntry};

/// How often a Helper deletes the aggregation jobs past their retention.
const CLEANUP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);
/// Jobs deleted per statement: with their responses, up to tens of megabytes, a short write.
const CLEANUP_BATCH: usize = 1_000;
/// The pause between full batches, so that catching up leaves the database to other writers.
const CLEANUP_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

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

    /// Deletes the aggregation jobs stored more than `helper_job_retention_s` ago (their request
    /// hashes and responses, kept to answer a retried request), a batch at a time; returns how
    /// many.
    pub async fn delete_old_jobs(&self) -> Result<u64, Error> {
        let retention = self.shared.config.helper_job_retention_s;
        let mut deleted = 0;
        loop {
            let n = self
                .shared
                .store
                .delete_old_helper_aggregation_jobs(retention, CLEANUP_BATCH)
                .await?;
            deleted += n;
            if n < CLEANUP_BATCH as u64 {
                return Ok(deleted);
            }
            tokio::time::sleep(CLEANUP_PAUSE).await;
        }
    }

    /// Deletes old aggregation jobs ([`Helper::delete_old_jobs`]) every `CLEANUP_INTERVAL`
    /// until `shutdown` turns true.
    pub fn spawn_cleanup(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let helper = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                match helper.delete_old_jobs().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "deleted old aggregation jobs"),
                    Err(e) => tracing::warn!(error = %e, "deleting old aggregation jobs failed"),
                }
            }
        })
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
