//! The records the [`Datastore`](crate::Datastore) stores.

use duet_messages::dap09::{
    AggregationJobId, Collection, CollectionJobId, HpkeCiphertext, Interval, ReportId,
    ReportIdChecksum, TaskId, Time,
};

/// A report as the Leader stores it on upload, before anything is decrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReport {
    /// Its task.
    pub task_id: TaskId,
    /// Its ID.
    pub report_id: ReportId,
    /// Its client timestamp.
    pub time: Time,
    /// The whole encoded `Report` message.
    pub encoded: Vec<u8>,
}

/// A report in a leased aggregation job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    /// Its ID.
    pub report_id: ReportId,
    /// Its client timestamp.
    pub time: Time,
    /// The whole encoded `Report` message.
    pub encoded: Vec<u8>,
}

/// A lease on a job: proof that this worker may write the job's outcome until `expiry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Random token identifying this lease.
    pub token: [u8; 16],
    /// When the lease runs out.
    pub expiry: Time,
    /// How many times the job has been leased, this one included.
    pub attempts: u32,
}

/// A Leader aggregation job taken with a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquiredAggregationJob {
    /// Its task.
    pub task_id: TaskId,
    /// Its ID.
    pub job_id: AggregationJobId,
    /// Its reports, in job order.
    pub reports: Vec<JobReport>,
    /// The lease.
    pub lease: Lease,
}

/// An aggregate over one batch bucket (for time-interval tasks, one `time_precision`-aligned
/// interval), or a delta to be merged into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchAggregation {
    /// Its task.
    pub task_id: TaskId,
    /// The bucket.
    pub bucket: Interval,
    /// The VDAF aggregation parameter (empty for Prio3).
    pub aggregation_parameter: Vec<u8>,
    /// The encoded aggregate share.
    pub aggregate_share: Vec<u8>,
    /// Number of reports aggregated.
    pub report_count: u64,
    /// XOR of the SHA-256 of the report IDs aggregated.
    pub checksum: ReportIdChecksum,
}

/// The state of a collection job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CollectionJobState {
    /// Waiting for its batch to be ready.
    Start,
    /// Done: the result to hand the collector.
    Finished(Collection),
    /// Given up on, with the reason.
    Abandoned(String),
    /// Deleted by the collector.
    Deleted,
}

/// A Leader collection job (time-interval query).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionJob {
    /// Its task.
    pub task_id: TaskId,
    /// Its ID, chosen by the collector.
    pub id: CollectionJobId,
    /// The queried batch interval.
    pub batch_interval: Interval,
    /// The aggregation parameter.
    pub aggregation_parameter: Vec<u8>,
    /// The state.
    pub state: CollectionJobState,
}

/// A collection job's batch, what a new job's overlap and query-count checks read (not its
/// result).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionJobBatch {
    /// The job's ID.
    pub id: CollectionJobId,
    /// The queried batch interval.
    pub batch_interval: Interval,
    /// The aggregation parameter.
    pub aggregation_parameter: Vec<u8>,
}

/// A collection job taken with a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcquiredCollectionJob {
    /// The job as it was when leased.
    pub job: CollectionJob,
    /// The lease.
    pub lease: Lease,
}

/// A Helper aggregation job, kept so that a repeated request gets the same response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperAggregationJob {
    /// Its task.
    pub task_id: TaskId,
    /// Its ID, chosen by the Leader.
    pub id: AggregationJobId,
    /// SHA-256 of the request body that created it.
    pub request_hash: [u8; 32],
    /// The last step completed.
    pub step: u16,
    /// The encoded `AggregationJobResp` that was sent.
    pub response: Vec<u8>,
}

/// An aggregate share the Helper has served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateShareJob {
    /// Its task.
    pub task_id: TaskId,
    /// The batch interval.
    pub batch_interval: Interval,
    /// The aggregation parameter.
    pub aggregation_parameter: Vec<u8>,
    /// Number of reports in the batch.
    pub report_count: u64,
    /// Checksum of the batch.
    pub checksum: ReportIdChecksum,
    /// The aggregate share, sealed to the collector.
    pub encrypted_aggregate_share: HpkeCiphertext,
}

impl CollectionJobState {
    /// The `state`, `collection` and `abandon_reason` columns both backends store a state in.
    pub(crate) fn to_columns(&self) -> (&'static str, Option<Vec<u8>>, Option<&str>) {
        use duet_messages::Encode;
        match self {
            Self::Start => ("start", None, None),
            Self::Finished(collection) => ("finished", Some(collection.get_encoded()), None),
            Self::Abandoned(reason) => ("abandoned", None, Some(reason.as_str())),
            Self::Deleted => ("deleted", None, None),
        }
    }

    /// The state stored in those columns.
    pub(crate) fn from_columns(
        state: &str,
        collection: Option<Vec<u8>>,
        abandon_reason: Option<String>,
    ) -> Result<Self, crate::StoreError> {
        use crate::StoreError;
        use duet_messages::Decode;
        Ok(match state {
            "start" => Self::Start,
            "finished" => {
                let encoded = collection.ok_or_else(|| {
                    StoreError::Corrupt("finished collection job without a result".into())
                })?;
                let collection = Collection::get_decoded(&encoded)
                    .map_err(|e| StoreError::Corrupt(format!("stored Collection: {e}")))?;
                Self::Finished(collection)
            }
            "abandoned" => Self::Abandoned(abandon_reason.unwrap_or_default()),
            "deleted" => Self::Deleted,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "collection job state '{other}'"
                )))
            }
        })
    }
}

/// How many reports an aggregation job of each task holds at most: `per_task`'s size for the
/// tasks it names (at least one), `default` for the others. With no `default`, a job creation
/// claims no report of a task `per_task` does not name and lists the task in
/// [`CreatedJobs::unsized_tasks`] instead, so that its caller can size it and create again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobSizes {
    /// The size of the jobs of a task `per_task` does not name, if they are to be created.
    pub default: Option<usize>,
    /// Sizes by task.
    pub per_task: std::collections::HashMap<TaskId, usize>,
}

impl JobSizes {
    /// `size` for every task.
    pub fn uniform(size: usize) -> Self {
        JobSizes {
            default: Some(size),
            per_task: std::collections::HashMap::new(),
        }
    }

    /// The size of `task`'s jobs; `None` if its reports are to be left unclaimed.
    pub fn of(&self, task: &TaskId) -> Option<usize> {
        self.per_task
            .get(task)
            .copied()
            .or(self.default)
            .map(|size| size.max(1))
    }
}

/// What a job creation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreatedJobs {
    /// How many jobs it created.
    pub jobs: usize,
    /// Tasks with reports it left unclaimed because [`JobSizes`] gave them no size (each once).
    pub unsized_tasks: Vec<TaskId>,
}

/// The sum of a batch's stored bucket aggregations, read one row at a time (see
/// [`Datastore::sum_batch_aggregations`](crate::Datastore::sum_batch_aggregations)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSum {
    /// The encoded sum of the buckets' aggregate shares; `None` if the batch has no bucket row.
    pub aggregate_share: Option<Vec<u8>>,
    /// Reports in the batch.
    pub report_count: u64,
    /// The checksum of the batch's reports.
    pub checksum: ReportIdChecksum,
    /// The smallest interval covering the buckets that hold reports; `None` if none does.
    pub spanned: Option<Interval>,
}

impl BatchSum {
    /// Adds one bucket's aggregation, its share through `merge`.
    pub fn add(
        &mut self,
        bucket: BatchAggregation,
        merge: crate::MergeFn<'_>,
    ) -> Result<(), crate::StoreError> {
        self.aggregate_share = Some(match self.aggregate_share.take() {
            None => bucket.aggregate_share,
            Some(sum) => merge(&sum, &bucket.aggregate_share).map_err(crate::StoreError::Merge)?,
        });
        self.report_count = self.report_count.saturating_add(bucket.report_count);
        self.checksum = self.checksum.combined_with(&bucket.checksum);
        if bucket.report_count > 0 {
            self.spanned = Some(
                self.spanned
                    .map_or(bucket.bucket, |spanned| spanned.merged_with(&bucket.bucket)),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use duet_messages::dap09::{Duration, ReportId};

    use super::*;

    fn bucket(start: u64, share: u8, report_count: u64) -> BatchAggregation {
        BatchAggregation {
            task_id: TaskId([1; 32]),
            bucket: Interval {
                start: Time(start),
                duration: Duration(100),
            },
            aggregation_parameter: Vec::new(),
            aggregate_share: vec![share],
            report_count,
            checksum: ReportIdChecksum::for_report_id(&ReportId([share; 16])),
        }
    }

    /// A batch's sum adds the shares, counts and checksums of every bucket, and spans only the
    /// buckets that hold reports (one aggregated to nothing, as after a job whose reports were
    /// all rejected, widens nothing).
    #[test]
    fn batch_sums_span_the_buckets_with_reports() {
        let add = |a: &[u8], b: &[u8]| Ok(vec![a[0] + b[0]]);
        let mut sum = BatchSum::default();
        for b in [bucket(300, 1, 2), bucket(100, 2, 0), bucket(500, 4, 1)] {
            sum.add(b, &add).expect("add");
        }
        assert_eq!(sum.aggregate_share, Some(vec![7]));
        assert_eq!(sum.report_count, 3);
        let want = [1, 2, 4].iter().fold(ReportIdChecksum::default(), |c, i| {
            c.combined_with(&ReportIdChecksum::for_report_id(&ReportId([*i; 16])))
        });
        assert_eq!(sum.checksum, want);
        assert_eq!(
            sum.spanned,
            Some(Interval {
                start: Time(300),
                duration: Duration(300),
            })
        );
        let failing = |_: &[u8], _: &[u8]| Err("no".to_string());
        assert!(matches!(
            sum.add(bucket(700, 1, 1), &failing),
            Err(crate::StoreError::Merge(_))
        ));
    }
}
