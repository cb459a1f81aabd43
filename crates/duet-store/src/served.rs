//! The Helper's served batches, as its writes check them inside their transactions: an
//! aggregate share is recorded only for a batch that overlaps no other served one and whose
//! aggregations still hold the reports the share was computed from, and an aggregation job
//! merges into no bucket of a served batch. Checked before the transactions too (by the
//! aggregator, to answer early), but only a check inside them holds against concurrent requests.

use duet_messages::dap09::Interval;

use crate::{AggregateShareJob, BatchAggregation, StoreError};

/// Whether recording `job` is consistent with the task's `served` batches (read in the
/// recording transaction) and with `aggregated`, the reports its batch's stored aggregations
/// hold now: `BatchOverlap` if another served batch overlaps it, `Conflict` if a job merged
/// into the batch after the share was computed (recompute it).
pub(crate) fn check_share(
    served: &[Interval],
    job: &AggregateShareJob,
    aggregated: u64,
) -> Result<(), StoreError> {
    let batch = &job.batch_interval;
    if served.iter().any(|s| s.overlaps_another(batch)) {
        return Err(StoreError::BatchOverlap);
    }
    if aggregated != job.report_count {
        return Err(StoreError::Conflict);
    }
    Ok(())
}

/// Whether a bucket of `deltas` lies in one of the `served` batches (read in the job's
/// transaction): then a share was served after the caller read the collected batches, and the
/// job must be prepared again (its reports in that batch are `batch_collected`).
pub(crate) fn merges_into_served(served: &[Interval], deltas: &[BatchAggregation]) -> bool {
    deltas
        .iter()
        .any(|d| served.iter().any(|s| s.contains(d.bucket.start)))
}

#[cfg(test)]
mod tests {
    use duet_messages::dap09::{
        Duration, HpkeCiphertext, HpkeConfigId, ReportIdChecksum, TaskId, Time,
    };

    use super::*;

    fn interval(start: u64, duration: u64) -> Interval {
        Interval {
            start: Time(start),
            duration: Duration(duration),
        }
    }

    fn job(batch: Interval, report_count: u64) -> AggregateShareJob {
        AggregateShareJob {
            task_id: TaskId([1; 32]),
            batch_interval: batch,
            aggregation_parameter: Vec::new(),
            report_count,
            checksum: ReportIdChecksum([0; 32]),
            encrypted_aggregate_share: HpkeCiphertext {
                config_id: HpkeConfigId(1),
                encapsulated_key: Vec::new(),
                payload: Vec::new(),
            },
        }
    }

    fn delta(start: u64) -> BatchAggregation {
        BatchAggregation {
            task_id: TaskId([1; 32]),
            bucket: interval(start, 10),
            aggregation_parameter: Vec::new(),
            aggregate_share: Vec::new(),
            report_count: 1,
            checksum: ReportIdChecksum([0; 32]),
        }
    }

    #[test]
    fn shares_are_recorded_only_for_unchanged_batches_that_overlap_no_other() {
        let served = [interval(0, 20), interval(40, 10)];
        assert!(check_share(&served, &job(interval(0, 20), 5), 5).is_ok());
        assert!(check_share(&served, &job(interval(20, 20), 5), 5).is_ok());
        assert!(matches!(
            check_share(&served, &job(interval(10, 20), 5), 5),
            Err(StoreError::BatchOverlap)
        ));
        assert!(matches!(
            check_share(&served, &job(interval(0, 60), 5), 5),
            Err(StoreError::BatchOverlap)
        ));
        assert!(matches!(
            check_share(&served, &job(interval(20, 20), 5), 6),
            Err(StoreError::Conflict)
        ));
    }

    #[test]
    fn jobs_do_not_merge_into_served_batches() {
        let served = [interval(0, 20)];
        assert!(merges_into_served(&served, &[delta(30), delta(10)]));
        assert!(!merges_into_served(&served, &[delta(20), delta(30)]));
        assert!(!merges_into_served(&[], &[delta(0)]));
    }
}
