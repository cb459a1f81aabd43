//! Collection jobs: created and polled by the collector, run by the collection driver once their
//! batch is fully aggregated and large enough.

use std::sync::Arc;

use duet_core::hpke::{seal, HpkeApplicationInfo};
use duet_core::AuthenticationToken;
use duet_messages::dap09::{
    media_type, AggregateShare, AggregateShareAad, AggregateShareReq, BatchSelector, Collection,
    CollectionJobId, CollectionReq, PartialBatchSelector, Query, Role, TaskId, Time,
};
use duet_messages::problem::DapProblemType;
use duet_messages::{Decode, Encode};
use duet_store::{AcquiredCollectionJob, CollectionJob, CollectionJobState, StoreError};
use tokio::sync::watch;

use super::Leader;
use crate::batch::{is_valid_batch_interval, merger, total};
use crate::error::Error;
use crate::metrics::CollectionOutcome;
use crate::peer::{self, PeerError};
use crate::shared::TaskEntry;

/// The answer to a collection-job poll.
#[derive(Debug)]
pub enum PollResult {
    /// Not ready yet.
    Pending,
    /// Done: the encoded `Collection`.
    Ready(Collection),
    /// The job failed.
    Failed(String),
    /// The collector deleted it.
    Deleted,
}

/// Checks the collector's token.
pub(crate) fn check_collector_auth(
    entry: &TaskEntry,
    dap_auth: Option<&[u8]>,
    authorization: Option<&[u8]>,
) -> Result<(), Error> {
    let ok = entry
        .task
        .collector_auth_token
        .as_ref()
        .is_some_and(|t: &AuthenticationToken| t.is_presented(dap_auth, authorization));
    if ok {
        Ok(())
    } else {
        Err(Error::abort(
            DapProblemType::UnauthorizedRequest,
            Some(entry.task.id),
            "missing or wrong collector authentication token",
        ))
    }
}

impl Leader {
    /// Checks that the task is this Leader's and the request carries its collector's token.
    pub async fn authorize_collector(
        &self,
        task_id: TaskId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<(), Error> {
        let entry = self.shared.require_task(&task_id).await?;
        check_collector_auth(&entry, auth.0, auth.1)
    }

    /// Handles `PUT /tasks/{task}/collection_jobs/{id}`.
    pub async fn create_collection_job(
        &self,
        task_id: TaskId,
        job_id: CollectionJobId,
        auth: (Option<&[u8]>, Option<&[u8]>),
        body: &[u8],
    ) -> Result<(), Error> {
        let entry = self.shared.require_task(&task_id).await?;
        check_collector_auth(&entry, auth.0, auth.1)?;
        let task = &entry.task;
        let req = CollectionReq::get_decoded(body).map_err(|e| {
            Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                format!("malformed collection request: {e}"),
            )
        })?;
        let Query::TimeInterval { batch_interval } = req.query else {
            return Err(Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                "this task uses the time_interval query type",
            ));
        };
        if !req.aggregation_parameter.is_empty() {
            return Err(Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                "Prio3 takes an empty aggregation parameter",
            ));
        }
        if !is_valid_batch_interval(&batch_interval, task.time_precision) {
            return Err(Error::abort(
                DapProblemType::BatchInvalid,
                Some(task_id),
                format!(
                    "the batch interval must start and last a multiple of the time precision ({} s)",
                    task.time_precision.0
                ),
            ));
        }
        let job = CollectionJob {
            task_id,
            id: job_id,
            batch_interval,
            aggregation_parameter: req.aggregation_parameter,
            state: CollectionJobState::Start,
        };
        if let Some(same) = self
            .shared
            .store
            .get_collection_job(&task_id, &job_id)
            .await?
        {
            if same.state == CollectionJobState::Deleted {
                return Err(Error::abort(
                    DapProblemType::InvalidMessage,
                    Some(task_id),
                    "this collection job was deleted; create another under a new ID",
                ));
            }
            if same.batch_interval == job.batch_interval
                && same.aggregation_parameter == job.aggregation_parameter
            {
                return Ok(());
            }
            return Err(Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                "a different collection job with this ID exists",
            ));
        }
        // The jobs whose batches overlap this one (or are this one), read without their results:
        // those of the same batch count its queries. Overlap with another batch (a job's, or one
        // collected under a job deleted since) is the store's to check as it inserts the job,
        // where concurrent creations are serialised.
        let existing = self
            .shared
            .store
            .collection_job_batches(&task_id, &batch_interval)
            .await?;
        // A batch is queried once per distinct aggregation parameter (DAP-09, "Batch Validation"):
        // another job with a parameter already used on it, as every Prio3 job's empty one is, asks for
        // the same aggregate shares again, which the Helper answers as it did.
        let mut parameters: Vec<&[u8]> = existing
            .iter()
            .filter(|j| j.batch_interval == batch_interval)
            .map(|j| &j.aggregation_parameter[..])
            .collect();
        parameters.sort_unstable();
        parameters.dedup();
        let queried_before = parameters.contains(&&job.aggregation_parameter[..]);
        if !queried_before && parameters.len() as u64 >= task.max_batch_query_count {
            return Err(Error::abort(
                DapProblemType::BatchQueriedTooManyTimes,
                Some(task_id),
                format!(
                    "this batch may be queried {} time(s)",
                    task.max_batch_query_count
                ),
            ));
        }
        match self.shared.store.put_collection_job(&job).await {
            Ok(()) => {}
            Err(StoreError::BatchOverlap) => {
                return Err(Error::abort(
                    DapProblemType::BatchOverlap,
                    Some(task_id),
                    "the batch interval overlaps one collected before",
                ))
            }
            Err(StoreError::AlreadyExists) => {
                return Err(Error::abort(
                    DapProblemType::InvalidMessage,
                    Some(task_id),
                    "a different collection job with this ID exists",
                ))
            }
            Err(e) => return Err(e.into()),
        }
        self.wake_collection.notify_one();
        Ok(())
    }

    /// Handles `POST /tasks/{task}/collection_jobs/{id}`.
    pub async fn poll_collection_job(
        &self,
        task_id: TaskId,
        job_id: CollectionJobId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<Option<PollResult>, Error> {
        let entry = self.shared.require_task(&task_id).await?;
        check_collector_auth(&entry, auth.0, auth.1)?;
        let Some(job) = self
            .shared
            .store
            .get_collection_job(&task_id, &job_id)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(match job.state {
            CollectionJobState::Start => PollResult::Pending,
            CollectionJobState::Finished(c) => PollResult::Ready(c),
            CollectionJobState::Abandoned(reason) => PollResult::Failed(reason),
            CollectionJobState::Deleted => PollResult::Deleted,
        }))
    }

    /// Handles `DELETE /tasks/{task}/collection_jobs/{id}`; returns whether the job existed.
    pub async fn delete_collection_job(
        &self,
        task_id: TaskId,
        job_id: CollectionJobId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<bool, Error> {
        let entry = self.shared.require_task(&task_id).await?;
        check_collector_auth(&entry, auth.0, auth.1)?;
        Ok(self
            .shared
            .store
            .delete_collection_job(&task_id, &job_id)
            .await?)
    }
}

/// Collection jobs one Leader process runs at once.
const COLLECTION_SLOTS: usize = 16;

/// Runs collection jobs when woken (new job, reports aggregated) or on the polling interval.
/// Each job runs on its own task: one whose Helper is slow to answer holds its slot, not the
/// others, and wake-ups while it runs still lease the jobs that are free. On shutdown it leases
/// nothing more and lets the running jobs finish.
pub(super) async fn run_collection_driver(
    leader: Arc<Leader>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = leader.shared.config.clone();
    // Each running job yields the wake-up count at its lease. A job that ends not ready may have
    // missed a wake-up that came while it held its lease; then one more pass looks at it again.
    let mut running = tokio::task::JoinSet::new();
    let mut wakeups: u64 = 0;
    let mut pass = true;
    let mut poll = super::poll_timer(&cfg);
    let mut retry = super::RetryTimer::default();
    loop {
        let free = COLLECTION_SLOTS.saturating_sub(running.len());
        if pass && free > 0 {
            pass = false;
            let now = leader.shared.clock.now();
            match leader
                .shared
                .store
                .acquire_collection_jobs(now, cfg.lease_duration_s, free)
                .await
            {
                Ok(jobs) => {
                    for job in jobs {
                        let leader = Arc::clone(&leader);
                        let leased_at = wakeups;
                        running.spawn(async move { (leased_at, step_job(&leader, job).await) });
                    }
                }
                Err(e) => tracing::error!(error = %e, "acquiring collection jobs failed"),
            }
        }
        tokio::select! {
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok((_, Some(at))) = done {
                    retry.retry_at(at, leader.shared.clock.now());
                }
                if done.map_or(true, |(leased_at, _)| leased_at < wakeups) {
                    pass = true;
                }
            }
            _ = leader.wake_collection.notified() => {
                wakeups += 1;
                pass = true;
            }
            _ = retry.due() => pass = true,
            _ = poll.tick() => pass = true,
            _ = shutdown.changed() => {
                while running.join_next().await.is_some() {}
                return;
            }
        }
    }
}

enum Step {
    /// Not ready; try again when woken.
    NotReady,
    /// Transient failure; retry after a backoff.
    Retry(String),
    /// Give up.
    Abandon(String),
    /// Done.
    Finished(Collection),
}

/// Takes one step of a leased collection job; returns when a job released for a retry is due
/// again.
async fn step_job(leader: &Leader, job: AcquiredCollectionJob) -> Option<Time> {
    let store = &leader.shared.store;
    let now = leader.shared.clock.now();
    let metrics = &leader.shared.metrics;
    let mut retry = None;
    let outcome = match run_job(leader, &job).await {
        Ok(Step::Finished(c)) => {
            let r = store
                .finish_collection_job(&job, &CollectionJobState::Finished(c))
                .await;
            leader.invalidate_collected(&job.job.task_id);
            if r.is_ok() {
                metrics.collection_job(CollectionOutcome::Finished);
            }
            r
        }
        Ok(Step::NotReady) => store.release_collection_job(&job, now, false).await,
        Ok(Step::Retry(reason)) if job.lease.attempts < leader.shared.config.max_job_attempts => {
            tracing::warn!(job = %job.job.id, %reason, "collection job will be retried");
            let at = Time(
                now.0
                    .saturating_add(leader.shared.config.retry_delay_s(job.lease.attempts)),
            );
            retry = Some(at);
            store.release_collection_job(&job, at, true).await
        }
        Ok(Step::Retry(reason) | Step::Abandon(reason)) => {
            tracing::error!(job = %job.job.id, %reason, "abandoning collection job");
            let r = store
                .finish_collection_job(&job, &CollectionJobState::Abandoned(reason))
                .await;
            if r.is_ok() {
                metrics.collection_job(CollectionOutcome::Abandoned);
            }
            r
        }
        Err(e) => {
            tracing::error!(job = %job.job.id, error = %e, "collection job step failed");
            let at = Time(now.0 + 1);
            retry = Some(at);
            store.release_collection_job(&job, at, true).await
        }
    };
    if let Err(e) = outcome {
        tracing::error!(job = %job.job.id, error = %e, "recording a collection job's state failed");
        return None;
    }
    retry
}

async fn run_job(leader: &Leader, acquired: &AcquiredCollectionJob) -> Result<Step, StoreError> {
    let job = &acquired.job;
    let shared = &leader.shared;
    let entry = match shared.task(&job.task_id).await {
        Ok(Some(e)) => e,
        Ok(None) => return Ok(Step::Abandon("the task no longer exists".into())),
        Err(e) => return Ok(Step::Retry(e.to_string())),
    };
    let task = &entry.task;
    let store = &shared.store;
    if store
        .has_unaggregated_reports(&job.task_id, &job.batch_interval)
        .await?
    {
        return Ok(Step::NotReady);
    }
    let sum = store
        .sum_batch_aggregations(
            &job.task_id,
            &job.batch_interval,
            &job.aggregation_parameter,
            &merger(&entry.vdaf),
        )
        .await
        .and_then(|sum| {
            total(&entry.vdaf, &job.batch_interval, sum)
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        });
    let sum = match sum {
        Ok(s) => s,
        Err(e @ (StoreError::Corrupt(_) | StoreError::Merge(_))) => {
            return Ok(Step::Abandon(format!(
                "stored aggregates are unusable: {e}"
            )))
        }
        Err(e) => return Err(e),
    };
    if sum.report_count < task.min_batch_size {
        return Ok(Step::NotReady);
    }
    let batch_selector = BatchSelector::TimeInterval {
        batch_interval: job.batch_interval,
    };
    let req = AggregateShareReq {
        batch_selector,
        aggregation_parameter: job.aggregation_parameter.clone(),
        report_count: sum.report_count,
        checksum: sum.checksum,
    };
    let url = match task
        .helper_endpoint
        .join(&format!("tasks/{}/aggregate_shares", task.id))
    {
        Ok(u) => u,
        Err(e) => return Ok(Step::Abandon(format!("bad Helper URL: {e}"))),
    };
    let body = match peer::send(
        &leader.http,
        reqwest::Method::POST,
        url,
        media_type::AGGREGATE_SHARE_REQ,
        req.get_encoded(),
        &task.aggregator_auth_token,
        // The Helper's share, as long as the Leader's, sealed.
        sum.aggregate_share.len() + 1024,
    )
    .await
    {
        Ok(b) => b,
        Err(PeerError::Transient(m)) => return Ok(Step::Retry(m)),
        Err(e) if e.is_configuration() => return Ok(Step::Retry(e.to_string())),
        // On a first attempt, the Helper may have aggregated reports this Leader has not merged
        // yet (uploaded after the readiness check, in a job still running here): the counts
        // agree once the job ends, and the leases until then find the batch not ready, so one
        // more attempt settles it. A mismatch on a later attempt is final.
        Err(
            e @ PeerError::Rejected {
                problem: Some(DapProblemType::BatchMismatch),
                ..
            },
        ) if acquired.lease.attempts <= 1 => return Ok(Step::Retry(e.to_string())),
        Err(e @ (PeerError::Rejected { .. } | PeerError::Oversized(_))) => {
            return Ok(Step::Abandon(e.to_string()))
        }
    };
    let helper_share = match AggregateShare::get_decoded(&body) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Step::Abandon(format!(
                "the Helper's aggregate share is malformed: {e}"
            )))
        }
    };
    let aad = AggregateShareAad {
        task_id: task.id,
        aggregation_parameter: job.aggregation_parameter.clone(),
        batch_selector,
    }
    .get_encoded();
    let leader_share = match seal(
        &task.collector_hpke_config,
        &HpkeApplicationInfo::AggregateShare {
            server: Role::Leader,
        },
        &sum.aggregate_share,
        &aad,
    ) {
        Ok(ct) => ct,
        Err(e) => {
            return Ok(Step::Abandon(format!(
                "sealing the aggregate share failed: {e}"
            )))
        }
    };
    Ok(Step::Finished(Collection {
        partial_batch_selector: PartialBatchSelector::TimeInterval,
        report_count: sum.report_count,
        interval: sum.spanned,
        leader_encrypted_agg_share: leader_share,
        helper_encrypted_agg_share: helper_share.encrypted_aggregate_share,
    }))
}
