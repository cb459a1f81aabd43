//! Aggregation jobs on the Helper: decrypt, validate and prepare each report share, accumulate
//! the output shares per bucket, and store job, report IDs and aggregates in one transaction.

use std::collections::HashSet;
use std::sync::Arc;

use duet_core::hpke::{open, HpkeApplicationInfo, HpkeKeypair};
use duet_core::vdaf::PrepFailure;
use duet_messages::dap09::{
    AggregationJobId, AggregationJobInitReq, AggregationJobResp, InputShareAad, Interval,
    PartialBatchSelector, PlaintextInputShareRef, PrepareError, PrepareInit, PrepareResp,
    PrepareStepResult, ReportId, Role, TaskId, Time,
};
use duet_messages::problem::DapProblemType;
use duet_messages::{Decode, Encode};
use duet_store::{HelperAggregationJob, StoreError};
use sha2::{Digest, Sha256};

use super::Helper;
use crate::batch::{in_any, merger, span_of, BucketAccumulator};
use crate::config::MAX_AGGREGATION_JOB_SIZE;
use crate::error::Error;
use crate::metrics::StoreOp;
use crate::shared::{find_key, TaskEntry};

/// Attempts at committing a job when concurrent writers race on report IDs, or a share of a
/// batch it merges into is served meanwhile.
const COMMIT_ATTEMPTS: usize = 3;

impl Helper {
    /// Handles `PUT /tasks/{task}/aggregation_jobs/{id}`: returns the encoded
    /// `AggregationJobResp`.
    pub async fn aggregation_job_init(
        &self,
        task_id: TaskId,
        job_id: AggregationJobId,
        auth: (Option<&[u8]>, Option<&[u8]>),
        body: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let entry = self.authorized(task_id, auth).await?;
        let invalid = |m: String| Error::abort(DapProblemType::InvalidMessage, Some(task_id), m);
        // Decoding stops at the report past the limit: a body of many tiny reports costs no
        // more than a job of the most this Helper takes.
        let req = AggregationJobInitReq::get_decoded_at_most(body, MAX_AGGREGATION_JOB_SIZE)
            .map_err(|e| match e {
                duet_messages::CodecError::TooManyItems { .. } => invalid(format!(
                    "the job has more than {MAX_AGGREGATION_JOB_SIZE} reports; this Helper takes \
                     at most {MAX_AGGREGATION_JOB_SIZE} per job"
                )),
                e => invalid(format!("malformed aggregation job: {e}")),
            })?;
        if req.partial_batch_selector != PartialBatchSelector::TimeInterval {
            return Err(invalid(
                "this task uses the time_interval query type".into(),
            ));
        }
        if !req.aggregation_parameter.is_empty() {
            return Err(invalid("Prio3 takes an empty aggregation parameter".into()));
        }
        let mut ids = HashSet::with_capacity(req.prepare_inits.len());
        if !req
            .prepare_inits
            .iter()
            .all(|p| ids.insert(p.report_share.metadata.id))
        {
            return Err(invalid("the job names a report twice".into()));
        }
        // The only collected batches this job's reports can fall in.
        let times = span_of(
            req.prepare_inits
                .iter()
                .map(|p| p.report_share.metadata.time),
        );
        let request_hash: [u8; 32] = Sha256::digest(body).into();
        // Shared with the preparation thread rather than copied.
        let req = Arc::new(req);

        for attempt in 0..COMMIT_ATTEMPTS {
            if let Some(existing) = self
                .shared
                .store
                .get_helper_aggregation_job(&task_id, &job_id)
                .await?
            {
                if existing.request_hash == request_hash {
                    return Ok(existing.response);
                }
                return Err(invalid(
                    "a different aggregation job with this ID exists".into(),
                ));
            }
            // After the stored answer, so that a Leader's retry of a job this Helper took
            // gets it, should the budget have been lowered since.
            if attempt == 0 {
                check_buckets(&entry, &self.shared.config, &req.prepare_inits).map_err(invalid)?;
            }
            let report_ids: Vec<ReportId> = req
                .prepare_inits
                .iter()
                .map(|p| p.report_share.metadata.id)
                .collect();
            // The first attempt expects no replays (the Leader drops them before they reach a
            // job): the job's write checks every ID anyway and answers `Conflict` if one was
            // seen, and the next attempt looks them up and rejects them as replayed. A replay
            // thus costs its job a second preparation, and a job without one a round trip less.
            let seen = if attempt == 0 {
                HashSet::new()
            } else {
                self.shared
                    .store
                    .seen_report_ids(&task_id, &report_ids)
                    .await?
            };
            let collected = self
                .shared
                .store
                .collected_intervals(&task_id, &times)
                .await?;
            let keys = self.shared.keys();
            let now = self.shared.clock.now();
            let prepared = {
                let entry = Arc::clone(&entry);
                let req = Arc::clone(&req);
                tokio::task::spawn_blocking(move || {
                    prepare_all(&entry, &keys, &seen, &collected, now, &req.prepare_inits)
                })
                .await
                .map_err(|e| Error::Internal(format!("preparation task failed: {e}")))??
            };
            let response = prepared.response.get_encoded();
            let job = HelperAggregationJob {
                task_id,
                id: job_id,
                request_hash,
                step: 0,
                response: response.clone(),
            };
            let merge = merger(&entry.vdaf);
            let metrics = &self.shared.metrics;
            match metrics
                .time(
                    StoreOp::PutHelperAggregationJob,
                    self.shared.store.put_helper_aggregation_job(
                        &job,
                        &prepared.processed,
                        &prepared.deltas,
                        &merge,
                    ),
                )
                .await
            {
                Ok(()) => {
                    let continued = prepared.accepted as u64;
                    let rejected = prepared.response.prepare_resps.len() as u64 - continued;
                    metrics.helper_reports(continued, rejected);
                    return Ok(response);
                }
                // A concurrent request stored this job or one of these reports, or a share of a
                // batch it merges into was served meanwhile: look again.
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal(
            "could not commit the aggregation job under contention".into(),
        ))
    }

    /// Handles `POST /tasks/{task}/aggregation_jobs/{id}`. Prio3 finishes in the init step, so
    /// no report of a job has a preparation state left to continue, and a continuation (which
    /// names at least one report) names reports without one: `invalidMessage` (DAP-09 §4.5.2).
    pub async fn aggregation_job_continue(
        &self,
        task_id: TaskId,
        job_id: AggregationJobId,
        auth: (Option<&[u8]>, Option<&[u8]>),
        body: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.authorize(task_id, auth).await?;
        // The job first, then the message (DAP-09's order of checks).
        if self
            .shared
            .store
            .get_helper_aggregation_job(&task_id, &job_id)
            .await?
            .is_none()
        {
            return Err(Error::abort(
                DapProblemType::UnrecognizedAggregationJob,
                Some(task_id),
                "no such aggregation job",
            ));
        }
        duet_messages::dap09::AggregationJobContinueReq::get_decoded(body).map_err(|e| {
            Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                format!("malformed continuation: {e}"),
            )
        })?;
        Err(Error::abort(
            DapProblemType::InvalidMessage,
            Some(task_id),
            "no report of this job awaits a continuation: the job finished in its first step",
        ))
    }

    /// Handles `DELETE /tasks/{task}/aggregation_jobs/{id}`. Finished jobs' aggregates stay
    /// counted; the request only needs to succeed.
    pub async fn aggregation_job_delete(
        &self,
        task_id: TaskId,
        auth: (Option<&[u8]>, Option<&[u8]>),
    ) -> Result<(), Error> {
        self.authorize(task_id, auth).await
    }
}

/// Refuses a job whose reports fall in more time buckets than `max_job_aggregate_bytes` has
/// room for the aggregates of, before any is prepared: each bucket's aggregate is as long as the
/// task's VDAF makes it however few reports it sums, so a job of small report shares spread over
/// many buckets could otherwise take up to the job size limit's aggregates at once.
fn check_buckets(
    entry: &TaskEntry,
    config: &crate::AggregatorConfig,
    inits: &[PrepareInit],
) -> Result<(), String> {
    let precision = entry.task.time_precision;
    let most = config.max_job_buckets(entry.aggregate_len);
    let mut buckets = HashSet::new();
    for init in inits {
        buckets.insert(init.report_share.metadata.time.round_down(precision).0);
        if buckets.len() > most {
            return Err(format!(
                "the job's reports fall in more than {most} time buckets of {} s; this Helper \
                 sums a job into at most {} bytes of aggregates, {} bytes per bucket for this \
                 task's VDAF: send jobs whose reports span fewer buckets",
                precision.0, config.max_job_aggregate_bytes, entry.aggregate_len
            ));
        }
    }
    Ok(())
}

struct Prepared {
    response: AggregationJobResp,
    /// The reports this job processed, accepted or rejected, whose IDs go into the replay set:
    /// all but those rejected as `report_too_early` (the Leader may send them again later) or
    /// `report_replayed` (there already). A rejected report is never prepared again: DAP-09
    /// (§4.5.1.1) forbids the Leader to send it in another job, and a Leader that did would
    /// learn, from a second answer to a second Leader share, something of the Helper's.
    processed: Vec<ReportId>,
    /// How many of them were accepted.
    accepted: usize,
    deltas: Vec<duet_store::BatchAggregation>,
}

fn prepare_all(
    entry: &TaskEntry,
    keys: &[HpkeKeypair],
    seen: &HashSet<ReportId>,
    collected: &[Interval],
    now: Time,
    inits: &[PrepareInit],
) -> Result<Prepared, Error> {
    let task = &entry.task;
    let mut acc = BucketAccumulator::new(&entry.vdaf, task.time_precision);
    let mut processed = Vec::with_capacity(inits.len());
    let mut accepted = 0;
    let mut resps = Vec::with_capacity(inits.len());
    for init in inits {
        let id = init.report_share.metadata.id;
        let result = match prepare_one(entry, keys, seen, collected, now, init) {
            Ok((out, message)) => {
                acc.add(init.report_share.metadata.time, &id, &out)?;
                accepted += 1;
                processed.push(id);
                PrepareStepResult::Continue { message }
            }
            Err(e @ (PrepareError::ReportTooEarly | PrepareError::ReportReplayed)) => {
                PrepareStepResult::Reject(e)
            }
            Err(e) => {
                processed.push(id);
                PrepareStepResult::Reject(e)
            }
        };
        resps.push(PrepareResp {
            report_id: id,
            result,
        });
    }
    Ok(Prepared {
        response: AggregationJobResp {
            prepare_resps: resps,
        },
        processed,
        accepted,
        deltas: acc.into_deltas(task.id)?,
    })
}

fn prepare_one(
    entry: &TaskEntry,
    keys: &[HpkeKeypair],
    seen: &HashSet<ReportId>,
    collected: &[Interval],
    now: Time,
    init: &PrepareInit,
) -> Result<(duet_core::vdaf::OutputShare, Vec<u8>), PrepareError> {
    let task = &entry.task;
    let share = &init.report_share;
    let time = share.metadata.time;
    if seen.contains(&share.metadata.id) {
        return Err(PrepareError::ReportReplayed);
    }
    if in_any(collected, time) {
        return Err(PrepareError::BatchCollected);
    }
    // A time past 2^63 seconds is too far in the future whatever the task's clock skew (and
    // past what a store keeps: it would fail the job's write at every attempt).
    if time.0 > now.0.saturating_add(task.tolerable_clock_skew.0) || i64::try_from(time.0).is_err()
    {
        return Err(PrepareError::ReportTooEarly);
    }
    if task.task_expiration.is_some_and(|e| time.0 > e.0) {
        return Err(PrepareError::TaskExpired);
    }
    let key = find_key(keys, share.encrypted_input_share.config_id)
        .ok_or(PrepareError::HpkeUnknownConfigId)?;
    let aad = InputShareAad::encode_parts(&task.id, &share.metadata, &share.public_share);
    let plaintext = open(
        key,
        &HpkeApplicationInfo::InputShare {
            server: Role::Helper,
        },
        &share.encrypted_input_share,
        &aad,
    )
    .map_err(|_| PrepareError::HpkeDecryptError)?;
    let input = PlaintextInputShareRef::get_decoded(&plaintext)
        .map_err(|_| PrepareError::InvalidMessage)?;
    if !input.extensions.is_empty() {
        // No extensions are defined for Duet's tasks (taskprov is not enabled).
        return Err(PrepareError::InvalidMessage);
    }
    entry
        .vdaf
        .helper_init(
            &task.vdaf_verify_key,
            &share.metadata.id,
            &share.public_share,
            input.payload,
            &init.message,
        )
        .map_err(|e| match e {
            PrepFailure::Decode(_) => PrepareError::InvalidMessage,
            PrepFailure::Prepare(_) => PrepareError::VdafPrepError,
        })
}
