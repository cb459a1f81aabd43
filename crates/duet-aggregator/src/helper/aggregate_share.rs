//! Aggregate-share requests: validate the batch, check count and checksum against the Leader's,
//! seal the Helper's share to the collector. Repeats of a served request get the same answer.

use duet_core::hpke::{seal, HpkeApplicationInfo};
use duet_messages::dap09::{
    AggregateShare, AggregateShareAad, AggregateShareReq, BatchSelector, Interval, Role, TaskId,
};
use duet_messages::problem::DapProblemType;
use duet_messages::{Decode, Encode};
use duet_store::{AggregateShareJob, StoreError};

use super::Helper;
use crate::batch::{is_valid_batch_interval, merger, total};
use crate::error::Error;
use crate::shared::TaskEntry;

/// Attempts at computing and recording a share while jobs merge into its batch.
const SHARE_ATTEMPTS: usize = 3;

impl Helper {
    /// Handles `POST /tasks/{task}/aggregate_shares`: returns the encoded `AggregateShare`.
    pub async fn aggregate_share(
        &self,
        task_id: TaskId,
        auth: (Option<&[u8]>, Option<&[u8]>),
        body: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let entry = self.authorized(task_id, auth).await?;
        let task = &entry.task;
        let abort = |p: DapProblemType, m: String| Error::abort(p, Some(task_id), m);
        let req = AggregateShareReq::get_decoded(body).map_err(|e| {
            abort(
                DapProblemType::InvalidMessage,
                format!("malformed aggregate share request: {e}"),
            )
        })?;
        let BatchSelector::TimeInterval { batch_interval } = req.batch_selector else {
            return Err(abort(
                DapProblemType::InvalidMessage,
                "this task uses the time_interval query type".into(),
            ));
        };
        if !req.aggregation_parameter.is_empty() {
            return Err(abort(
                DapProblemType::InvalidMessage,
                "Prio3 takes an empty aggregation parameter".into(),
            ));
        }
        if !is_valid_batch_interval(&batch_interval, task.time_precision) {
            return Err(abort(
                DapProblemType::BatchInvalid,
                "the batch interval must start and last a multiple of the time precision".into(),
            ));
        }
        // A job that merges into the batch while its share is computed makes the recording
        // answer `Conflict`: the share is computed again (and then no longer matches the
        // Leader's count, unless the Leader aggregated the same reports meanwhile).
        for _ in 0..SHARE_ATTEMPTS {
            match self.serve_share(&entry, &req, &batch_interval).await {
                Err(Error::Store(StoreError::Conflict)) => continue,
                served => return served,
            }
        }
        Err(Error::Internal(
            "the batch kept changing while its aggregate share was computed".into(),
        ))
    }

    /// One attempt at [`Helper::aggregate_share`] once the request is validated.
    async fn serve_share(
        &self,
        entry: &TaskEntry,
        req: &AggregateShareReq,
        batch_interval: &Interval,
    ) -> Result<Vec<u8>, Error> {
        let task = &entry.task;
        let task_id = task.id;
        let batch_interval = *batch_interval;
        let abort = |p: DapProblemType, m: String| Error::abort(p, Some(task_id), m);
        let store = &self.shared.store;
        // A share served before for this batch, if it was for the same count and checksum.
        let served_before = |done: AggregateShareJob| {
            if done.report_count == req.report_count && done.checksum == req.checksum {
                Ok(AggregateShare {
                    encrypted_aggregate_share: done.encrypted_aggregate_share,
                }
                .get_encoded())
            } else {
                Err(abort(
                    DapProblemType::BatchMismatch,
                    "this batch was served with another count or checksum".into(),
                ))
            }
        };
        if let Some(done) = store
            .get_aggregate_share_job(&task_id, &batch_interval, &req.aggregation_parameter)
            .await?
        {
            return served_before(done);
        }
        let overlap = || {
            abort(
                DapProblemType::BatchOverlap,
                "the batch overlaps one collected before".into(),
            )
        };
        // DAP-09's order (§4.6.6): the batch's boundaries (checked before this), its size, how
        // often it was queried, then overlap with batches served before, which is checked
        // again when the share is recorded, where concurrent requests are serialised.
        let sum = store
            .sum_batch_aggregations(
                &task_id,
                &batch_interval,
                &req.aggregation_parameter,
                &merger(&entry.vdaf),
            )
            .await?;
        let sum = total(&entry.vdaf, &batch_interval, sum)?;
        if sum.report_count < task.min_batch_size {
            return Err(abort(
                DapProblemType::InvalidBatchSize,
                format!(
                    "the batch has {} reports; the minimum is {}",
                    sum.report_count, task.min_batch_size
                ),
            ));
        }
        let served = store
            .list_aggregate_share_jobs(&task_id, &batch_interval)
            .await?;
        let queries = served
            .iter()
            .filter(|j| j.batch_interval == batch_interval)
            .count() as u64;
        if queries >= task.max_batch_query_count {
            return Err(abort(
                DapProblemType::BatchQueriedTooManyTimes,
                format!(
                    "this batch may be queried {} time(s)",
                    task.max_batch_query_count
                ),
            ));
        }
        if served
            .iter()
            .any(|j| j.batch_interval.overlaps_another(&batch_interval))
        {
            return Err(overlap());
        }
        if sum.report_count != req.report_count || sum.checksum != req.checksum {
            return Err(abort(
                DapProblemType::BatchMismatch,
                format!(
                    "the Helper aggregated {} reports in this batch, the Leader {}, or their checksums differ",
                    sum.report_count, req.report_count
                ),
            ));
        }
        let aad = AggregateShareAad {
            task_id,
            aggregation_parameter: req.aggregation_parameter.clone(),
            batch_selector: req.batch_selector,
        }
        .get_encoded();
        let sealed = seal(
            &task.collector_hpke_config,
            &HpkeApplicationInfo::AggregateShare {
                server: Role::Helper,
            },
            &sum.aggregate_share,
            &aad,
        )?;
        let job = AggregateShareJob {
            task_id,
            batch_interval,
            aggregation_parameter: req.aggregation_parameter.clone(),
            report_count: sum.report_count,
            checksum: sum.checksum,
            encrypted_aggregate_share: sealed,
        };
        match store.put_aggregate_share_job(&job).await {
            Ok(()) => Ok(AggregateShare {
                encrypted_aggregate_share: job.encrypted_aggregate_share,
            }
            .get_encoded()),
            // A concurrent request for this batch won the race: answer as it was answered, if
            // it was for the same count and checksum.
            Err(StoreError::AlreadyExists) => {
                let done = store
                    .get_aggregate_share_job(&task_id, &batch_interval, &job.aggregation_parameter)
                    .await?
                    .ok_or_else(|| Error::Internal("aggregate share vanished".into()))?;
                served_before(done)
            }
            Err(StoreError::BatchOverlap) => Err(overlap()),
            Err(e) => Err(e.into()),
        }
    }
}
