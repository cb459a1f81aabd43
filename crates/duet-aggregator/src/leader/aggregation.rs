//! The aggregation job creator and driver.
//!
//! Prio3 prepares in one round: the driver decrypts and prepares the Leader's shares, sends one
//! `AggregationJobInitReq`, finishes preparation with the Helper's answers and merges the output
//! shares per bucket in one store transaction. The request is a pure function of the stored
//! reports, the task and the role's keys, none of which changes between attempts, so a retried
//! job sends the same bytes and the Helper answers idempotently (it may have stored the job
//! when its answer was lost). So reports are not left out of the request for what can change
//! between attempts: whether their batch was collected meanwhile (the Helper rejects those as
//! `batch_collected`, which is what keeps them out of collected batches; the Leader also drops
//! any a faulty Helper accepts, as far as its collected-batch cache knows), or whether they are
//! too early by this replica's clock (the Helper judges by its own).

use std::collections::HashSet;
use std::sync::Arc;

use duet_core::hpke::{open, HpkeApplicationInfo, HpkeKeypair};
use duet_core::vdaf::LeaderPrepState;
use duet_messages::dap09::media_type;
use duet_messages::dap09::{
    AggregationJobInitReq, AggregationJobResp, InputShareAad, PartialBatchSelector,
    PlaintextInputShareRef, PrepareInit, PrepareStepResult, ReportId, ReportRef, ReportShare, Role,
    TaskId, Time,
};
use duet_messages::{Decode, Encode};
use duet_store::{AcquiredAggregationJob, JobSizes};
use tokio::sync::watch;

use super::Leader;
use crate::batch::{in_any, merger, BucketAccumulator};
use crate::error::Error;
use crate::metrics::{AggregationOutcome, LeaderReports, StoreOp};
use crate::peer::{self, PeerError};
use crate::shared::{find_key, TaskEntry};

/// The most reports a job of a task whose encoded reports are `report_len` bytes, and aggregate
/// shares `aggregate_len` bytes, holds: as many as fit `max_aggregation_job_bytes`, and no more
/// than fit `max_job_aggregate_bytes` were each in a time bucket of its own (so no Helper with
/// the same setting refuses the job); at least one and at most `max_aggregation_job_size`.
pub(crate) fn job_size(
    cfg: &crate::AggregatorConfig,
    report_len: usize,
    aggregate_len: usize,
) -> usize {
    (cfg.max_aggregation_job_bytes / report_len.max(1))
        .min(cfg.max_job_buckets(aggregate_len))
        .clamp(1, cfg.max_aggregation_job_size)
}

/// Each cached task's job size, from its VDAF's report length, and `max_aggregation_job_size`
/// for the `fallback` tasks (no longer stored, unreadable, or with a VDAF this process cannot
/// instantiate: their jobs fail anyway). Any other task gets no size, so the store leaves its reports
/// unclaimed and names it (see [`size_new_tasks`]): a replica that runs jobs learns of a task
/// uploaded to another replica before it cuts the task's jobs, whenever that task was stored.
fn job_sizes(leader: &Leader, fallback: &HashSet<TaskId>) -> JobSizes {
    let cfg = &leader.shared.config;
    let mut sizes = JobSizes {
        default: None,
        per_task: fallback
            .iter()
            .map(|id| (*id, cfg.max_aggregation_job_size))
            .collect(),
    };
    for entry in leader.shared.cached_tasks() {
        let report_len = super::upload::typical_report_len(&entry.lengths);
        let size = job_size(cfg, report_len, entry.aggregate_len);
        sizes.per_task.insert(entry.task.id, size);
    }
    sizes
}

/// Reads and caches the tasks a job creation left unsized; a task not stored, unreadable, or
/// whose VDAF cannot be instantiated goes into `fallback`. Returns whether any task was settled either
/// way (one that could not be read is tried again at the next pass).
async fn size_new_tasks(leader: &Leader, tasks: &[TaskId], fallback: &mut HashSet<TaskId>) -> bool {
    let mut settled = false;
    for id in tasks {
        let unusable = match leader.shared.store.get_task(id).await {
            Ok(Some(task)) => leader
                .shared
                .cache_task(task)
                .err()
                .map(|e| format!("its VDAF is unusable: {e}")),
            Ok(None) => Some("it is no longer stored".into()),
            // Stored parameters this version refuses to read stay so.
            Err(e @ duet_store::StoreError::Corrupt(_)) => Some(format!("it is unreadable: {e}")),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "reading a task failed");
                continue;
            }
        };
        if let Some(why) = unusable {
            tracing::warn!(task = %id, "reports queued for a task that cannot be served: {why}");
            fallback.insert(*id);
        }
        settled = true;
    }
    settled
}

/// Groups stored reports into aggregation jobs whenever reports arrive; passes again at once
/// (once) when it has sized a task whose reports the last pass left.
pub(super) async fn run_job_creator(leader: Arc<Leader>, mut shutdown: watch::Receiver<bool>) {
    let cfg = &leader.shared.config;
    let mut fallback = HashSet::new();
    let mut again = false;
    loop {
        let at_once = std::mem::take(&mut again);
        if at_once {
            if *shutdown.borrow() {
                return;
            }
        } else {
            tokio::select! {
                _ = leader.wake_job_creator.notified() => {
                    // Let a burst of uploads land so jobs come out full.
                    tokio::time::sleep(
                        std::time::Duration::from_millis(cfg.job_creation_delay_ms),
                    )
                    .await;
                }
                _ = tokio::time::sleep(cfg.polling_interval()) => {}
                _ = shutdown.changed() => return,
            }
        }
        let now = leader.shared.clock.now();
        let sizes = job_sizes(&leader, &fallback);
        let created = leader.shared.metrics.time(
            StoreOp::CreateAggregationJobs,
            leader
                .shared
                .store
                .create_sized_aggregation_jobs(&sizes, now),
        );
        match created.await {
            Ok(created) => {
                if created.jobs > 0 {
                    tracing::debug!(jobs = created.jobs, "created aggregation jobs");
                    leader.wake_aggregation.notify_one();
                }
                if !created.unsized_tasks.is_empty() {
                    let settled =
                        size_new_tasks(&leader, &created.unsized_tasks, &mut fallback).await;
                    again = settled && !at_once;
                }
            }
            Err(e) => tracing::error!(error = %e, "creating aggregation jobs failed"),
        }
    }
}

/// Leases and runs aggregation jobs whenever jobs are created, keeping up to
/// `max_concurrent_jobs` in flight: a slot that frees is filled at once, so one slow job does not
/// hold back the next lease. On shutdown it leases nothing more and lets the running jobs finish.
pub(super) async fn run_aggregation_driver(
    leader: Arc<Leader>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = leader.shared.config.clone();
    let limit = cfg.max_concurrent_jobs.max(1);
    let mut running = tokio::task::JoinSet::new();
    // Whether the last lease found every job there was; then only a wake-up, a poll or shutdown
    // leads to the next one, not a finished job.
    let mut drained = false;
    let mut poll = super::poll_timer(&cfg);
    let mut retry = super::RetryTimer::default();
    loop {
        if !drained && running.len() < limit {
            let wanted = limit - running.len();
            let now = leader.shared.clock.now();
            let acquired = leader.shared.metrics.time(
                StoreOp::AcquireAggregationJobs,
                leader
                    .shared
                    .store
                    .acquire_aggregation_jobs(now, cfg.lease_duration_s, wanted),
            );
            let jobs = match acquired.await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, "acquiring aggregation jobs failed");
                    Vec::new()
                }
            };
            drained = jobs.len() < wanted;
            for job in jobs {
                let leader = Arc::clone(&leader);
                running.spawn(async move { step_job(&leader, job).await });
            }
            continue;
        }
        tokio::select! {
            Some(done) = running.join_next(), if !running.is_empty() => {
                if let Ok(Some(at)) = done {
                    retry.retry_at(at, leader.shared.clock.now());
                }
            }
            _ = leader.wake_aggregation.notified() => drained = false,
            _ = retry.due() => drained = false,
            _ = poll.tick() => drained = false,
            _ = shutdown.changed() => {
                while running.join_next().await.is_some() {}
                return;
            }
        }
    }
}

/// Runs one leased job to its end, a retry or its abandonment; returns when a job released for a
/// retry is due again.
async fn step_job(leader: &Leader, mut job: AcquiredAggregationJob) -> Option<Time> {
    let store = &leader.shared.store;
    let metrics = &leader.shared.metrics;
    let reports = job.reports.len() as u64;
    let result = run_job(leader, &mut job).await;
    let mut retry = None;
    let (outcome, counted) = match result {
        Ok(counts) => {
            metrics.leader_reports(counts);
            metrics.aggregation_job(AggregationOutcome::Finished);
            leader.wake_collection.notify_one();
            return None;
        }
        Err(JobFailure::Retry(reason))
            if job.lease.attempts < leader.shared.config.max_job_attempts =>
        {
            let backoff = leader.shared.config.retry_delay_s(job.lease.attempts);
            tracing::warn!(job = %job.job_id, %reason, attempt = job.lease.attempts, "aggregation job will be retried");
            let retry_at = Time(leader.shared.clock.now().0.saturating_add(backoff));
            let released = store.release_aggregation_job(&job, retry_at).await;
            if released.is_ok() {
                retry = Some(retry_at);
            }
            (released, AggregationOutcome::Retried)
        }
        Err(JobFailure::Retry(reason)) | Err(JobFailure::Abandon(reason)) => {
            tracing::error!(job = %job.job_id, %reason, "abandoning aggregation job");
            let abandoned = store.abandon_aggregation_job(&job).await;
            if abandoned.is_ok() {
                delete_at_helper(leader, &job).await;
            }
            (abandoned, AggregationOutcome::Abandoned)
        }
    };
    match outcome {
        Ok(()) => {
            metrics.aggregation_job(counted);
            if matches!(counted, AggregationOutcome::Abandoned) {
                metrics.leader_reports_abandoned(reports);
            }
        }
        Err(e) => {
            tracing::error!(job = %job.job_id, error = %e, "recording an aggregation job's failure failed")
        }
    }
    leader.wake_collection.notify_one();
    retry
}

/// How long the Leader waits for the Helper to answer the DELETE of an abandoned job.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Tells the Helper that the Leader has abandoned `job`, so that it can clean up its state
/// (DAP-09 §4.5.2: the Leader SHOULD send a DELETE to the job's URI). Best effort, within
/// [`DELETE_TIMEOUT`]: the job has ended here whatever the Helper answers, so a failure is only
/// logged.
async fn delete_at_helper(leader: &Leader, job: &AcquiredAggregationJob) {
    let Ok(Some(entry)) = leader.shared.task(&job.task_id).await else {
        return;
    };
    let task = &entry.task;
    let Ok(url) = task.helper_endpoint.join(&format!(
        "tasks/{}/aggregation_jobs/{}",
        task.id, job.job_id
    )) else {
        return;
    };
    let (name, value) = task.aggregator_auth_token.request_header();
    let sent = leader
        .http
        .delete(url)
        .header(name, value)
        .timeout(DELETE_TIMEOUT)
        .send()
        .await;
    match sent {
        Ok(answer) if answer.status().is_success() => {}
        Ok(answer) => {
            tracing::debug!(job = %job.job_id, status = %answer.status(), "the Helper refused the abandoned job's DELETE")
        }
        Err(e) => {
            tracing::debug!(job = %job.job_id, error = %e, "the abandoned job's DELETE did not reach the Helper")
        }
    }
}

enum JobFailure {
    Retry(String),
    Abandon(String),
}

impl From<Error> for JobFailure {
    fn from(e: Error) -> Self {
        JobFailure::Retry(e.to_string())
    }
}

/// One report after the Leader's first preparation step.
struct Initialized {
    report_id: ReportId,
    time: Time,
    state: LeaderPrepState,
}

async fn run_job(
    leader: &Leader,
    job: &mut AcquiredAggregationJob,
) -> Result<LeaderReports, JobFailure> {
    let shared = &leader.shared;
    let Some(entry) = shared.task(&job.task_id).await? else {
        return Err(JobFailure::Abandon("the task no longer exists".into()));
    };
    let keys = shared.keys();
    let reports = job.reports.len() as u64;

    let (initialized, prepare_inits) = {
        let entry = Arc::clone(&entry);
        // The reports are not needed after this step: hand them over instead of copying them.
        let stored = std::mem::take(&mut job.reports);
        tokio::task::spawn_blocking(move || leader_init_all(&entry, &keys, &stored))
            .await
            .map_err(|e| JobFailure::Retry(format!("preparation task failed: {e}")))?
    };

    // The reports the Leader's own preparation dropped.
    let mut counts = LeaderReports {
        rejected: reports.saturating_sub(initialized.len() as u64),
        ..LeaderReports::default()
    };
    let mut deltas = Vec::new();
    if !prepare_inits.is_empty() {
        let task = &entry.task;
        let req = AggregationJobInitReq {
            aggregation_parameter: Vec::new(),
            partial_batch_selector: PartialBatchSelector::TimeInterval,
            prepare_inits,
        };
        let url = task
            .helper_endpoint
            .join(&format!(
                "tasks/{}/aggregation_jobs/{}",
                task.id, job.job_id
            ))
            .map_err(|e| JobFailure::Abandon(format!("bad Helper URL: {e}")))?;
        let request = req.get_encoded();
        // Each report's answer is shorter than its part of the request (its ID and the
        // Helper's preparation message against the report's metadata, shares and the Leader's
        // preparation message of the same size).
        let limit = 2 * request.len() + 64 * 1024;
        let body = peer::send(
            &leader.http,
            reqwest::Method::PUT,
            url,
            media_type::AGGREGATION_JOB_INIT_REQ,
            request,
            &task.aggregator_auth_token,
            limit,
        )
        .await
        .map_err(|e| match e {
            PeerError::Transient(m) => JobFailure::Retry(m),
            e if e.is_configuration() => JobFailure::Retry(e.to_string()),
            e @ (PeerError::Rejected { .. } | PeerError::Oversized(_)) => {
                JobFailure::Abandon(e.to_string())
            }
        })?;
        let resp = AggregationJobResp::get_decoded(&body)
            .map_err(|e| JobFailure::Abandon(format!("the Helper's response is malformed: {e}")))?;
        if resp.prepare_resps.len() != initialized.len()
            || resp
                .prepare_resps
                .iter()
                .zip(&initialized)
                .any(|(r, i)| r.report_id != i.report_id)
        {
            return Err(JobFailure::Abandon(
                "the Helper answered for different reports".into(),
            ));
        }
        // Prio3's Helper answers an init with a message to continue or a rejection; `finished`
        // there is an invalid answer, on which the Leader aborts the job (DAP-09 §4.5.1.1).
        if resp
            .prepare_resps
            .iter()
            .any(|r| r.result == PrepareStepResult::Finished)
        {
            return Err(JobFailure::Abandon(
                "the Helper answered an initialization with `finished`".into(),
            ));
        }
        // A Helper rejects reports of the batches it served; one that did not would have them
        // merged into batches this Leader collected.
        let collected = leader.collected_intervals(&job.task_id).await?;
        let entry = Arc::clone(&entry);
        let task_id = job.task_id;
        let mut job_counts = counts;
        (deltas, counts) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let mut acc = BucketAccumulator::new(&entry.vdaf, entry.task.time_precision);
            for (init, resp) in initialized.into_iter().zip(resp.prepare_resps) {
                match resp.result {
                    PrepareStepResult::Continue { .. } if in_any(&collected, init.time) => {
                        job_counts.rejected += 1;
                        tracing::warn!(report = %init.report_id, "the Helper accepted a report of a collected batch; report dropped")
                    }
                    PrepareStepResult::Continue { message } => {
                        match entry.vdaf.leader_continued(init.state, &message) {
                            Ok(out) => {
                                acc.add(init.time, &init.report_id, &out)?;
                                job_counts.aggregated += 1;
                            }
                            Err(e) => {
                                job_counts.rejected += 1;
                                tracing::debug!(report = %init.report_id, error = %e, "report failed preparation")
                            }
                        }
                    }
                    // Refused above: the job is aborted before it gets here.
                    PrepareStepResult::Finished => {}
                    PrepareStepResult::Reject(err) => {
                        job_counts.rejected_by_helper += 1;
                        tracing::debug!(report = %init.report_id, ?err, "Helper rejected report")
                    }
                }
            }
            Ok((acc.into_deltas(task_id)?, job_counts))
        })
        .await
        .map_err(|e| JobFailure::Retry(format!("accumulation task failed: {e}")))??;
    }
    let merge = merger(&entry.vdaf);
    shared
        .metrics
        .time(
            StoreOp::FinishAggregationJob,
            shared.store.finish_aggregation_job(job, &deltas, &merge),
        )
        .await
        .map_err(|e| match e {
            duet_store::StoreError::LeaseLost => JobFailure::Abandon("lease lost".into()),
            e => JobFailure::Retry(e.to_string()),
        })?;
    Ok(counts)
}

/// Decrypts and prepares the Leader's share of every report; reports that fail are dropped here
/// (the Helper never hears of them). Only what cannot change between attempts at a job decides
/// (see the module's documentation).
fn leader_init_all(
    entry: &TaskEntry,
    keys: &[HpkeKeypair],
    reports: &[duet_store::JobReport],
) -> (Vec<Initialized>, Vec<PrepareInit>) {
    let task = &entry.task;
    let info = HpkeApplicationInfo::InputShare {
        server: Role::Leader,
    };
    let mut initialized = Vec::with_capacity(reports.len());
    let mut inits = Vec::with_capacity(reports.len());
    for stored in reports {
        let drop = |why: &str| tracing::debug!(report = %stored.report_id, why, "report dropped");
        // Read in place: of the report's bytes only the Leader's share is copied (to be
        // decrypted), and the parts the Helper gets.
        let Ok(report) = ReportRef::get_decoded(&stored.encoded) else {
            drop("stored report does not decode");
            continue;
        };
        if task
            .task_expiration
            .is_some_and(|e| report.metadata.time.0 > e.0)
        {
            drop("task expired");
            continue;
        }
        let Some(key) = find_key(keys, report.leader_encrypted_input_share.config_id) else {
            drop("unknown HPKE config");
            continue;
        };
        let aad = InputShareAad::encode_parts(&task.id, &report.metadata, report.public_share);
        let Ok(plaintext) = open(key, &info, report.leader_encrypted_input_share, &aad) else {
            drop("HPKE decryption failed");
            continue;
        };
        let Ok(share) = PlaintextInputShareRef::get_decoded(&plaintext) else {
            drop("plaintext input share does not decode");
            continue;
        };
        if !share.extensions.is_empty() {
            // Duet's tasks define no extensions; taskprov is not enabled.
            drop("unexpected extension");
            continue;
        }
        let (state, message) = match entry.vdaf.leader_init(
            &task.vdaf_verify_key,
            &report.metadata.id,
            report.public_share,
            share.payload,
        ) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(report = %stored.report_id, error = %e, "leader preparation failed");
                continue;
            }
        };
        initialized.push(Initialized {
            report_id: report.metadata.id,
            time: report.metadata.time,
            state,
        });
        inits.push(PrepareInit {
            report_share: ReportShare {
                metadata: report.metadata,
                public_share: report.public_share.to_vec(),
                encrypted_input_share: report.helper_encrypted_input_share.into_owned(),
            },
            message,
        });
    }
    (initialized, inits)
}

#[cfg(test)]
mod job_size_tests {
    use duet_core::vdaf::VdafInstance;

    use super::super::upload::typical_report_len;
    use super::job_size;
    use crate::AggregatorConfig;

    /// A job holds as many reports as fit its byte budget, within the count: small reports fill
    /// the count, 17 kB ones the bytes.
    #[test]
    fn jobs_of_larger_reports_hold_fewer() {
        let cfg = AggregatorConfig::default();
        let size_of = |vdaf: VdafInstance| {
            let vdaf = vdaf.instantiate().expect("VDAF");
            let len = typical_report_len(&vdaf.share_lengths().expect("lengths"));
            let aggregate_len = vdaf.aggregate_len().expect("aggregate length");
            (len, job_size(&cfg, len, aggregate_len))
        };
        let (count_len, count) = size_of(VdafInstance::Prio3Count);
        assert!(count_len < 300, "{count_len}");
        assert_eq!(count, 2500);
        let (histogram_len, histogram) = size_of(VdafInstance::Prio3Histogram {
            length: 100,
            chunk_length: 10,
        });
        assert!((2000..3000).contains(&histogram_len), "{histogram_len}");
        assert_eq!(histogram, 2500);
        let (sumvec_len, sumvec) = size_of(VdafInstance::Prio3SumVec {
            bits: 1,
            length: 1000,
            chunk_length: 31,
        });
        assert!((15_000..20_000).contains(&sumvec_len), "{sumvec_len}");
        assert_eq!(sumvec, (16 << 20) / sumvec_len);
        assert!((800..1100).contains(&sumvec), "{sumvec}");
        // At least one report, however large.
        assert_eq!(job_size(&cfg, 1 << 30, 8), 1);
    }

    /// A job holds no more reports than there is room for the aggregates of, were each report in
    /// a time bucket of its own: the most buckets a Helper with the same setting takes.
    #[test]
    fn jobs_hold_no_more_reports_than_their_aggregates_have_room_for() {
        let cfg = AggregatorConfig {
            max_aggregation_job_bytes: 1 << 30,
            max_job_aggregate_bytes: 16_000 * 300 + 15_999,
            ..AggregatorConfig::default()
        };
        // Prio3SumVec(1000)'s 17 kB reports: a gibibyte of them would be 60,000 or so.
        assert_eq!(job_size(&cfg, 17_000, 16_000), 300);
        assert_eq!(cfg.max_job_buckets(16_000), 300);
        // Prio3Count's 8-byte aggregates leave the count to bind.
        assert_eq!(job_size(&cfg, 200, 8), 2500);
        // At least one report, however large its aggregate.
        assert_eq!(job_size(&cfg, 17_000, 1 << 40), 1);
        assert_eq!(cfg.max_job_buckets(1 << 40), 1);
    }
}
