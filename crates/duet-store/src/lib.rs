//! Duet's storage: the [`Datastore`] trait, the records it stores, its conformance suite, and the
//! backends: embedded SQLite ([`sqlite`]) and PostgreSQL ([`postgres`]), which several replicas
//! can share.
//!
//! Only this crate knows SQL. A datastore handle is bound to one aggregator role: in a process
//! that is both Leader and Helper over one database, each role has its own handle, and rows that
//! both roles keep (tasks, HPKE keys, batch aggregations) carry the role in their key.
#![forbid(unsafe_code)]

mod bloom;
pub mod conformance;
pub mod models;
pub mod postgres;
mod rows;
mod served;
pub mod sqlite;

use std::collections::HashSet;

use async_trait::async_trait;
use duet_core::hpke::HpkeKeypair;
use duet_core::Task;
use duet_messages::dap09::{AggregationJobId, CollectionJobId, Interval, ReportId, TaskId, Time};

pub use models::*;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// A row with this key already exists (with different content).
    #[error("already exists")]
    AlreadyExists,
    /// A concurrent writer changed what this write depended on; recompute and retry.
    #[error("conflict with a concurrent write")]
    Conflict,
    /// The batch overlaps another whose aggregate share was served.
    #[error("the batch overlaps one collected before")]
    BatchOverlap,
    /// The lease on a job was lost (expired and taken by another worker).
    #[error("lease lost")]
    LeaseLost,
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// Merging aggregate shares failed.
    #[error("merging aggregate shares failed: {0}")]
    Merge(String),
}

/// Adds two encoded aggregate shares of the same VDAF; the store calls it to fold new shares into
/// stored ones without knowing the VDAF.
pub type MergeFn<'a> = &'a (dyn Fn(&[u8], &[u8]) -> Result<Vec<u8>, String> + Send + Sync);

/// When writes are durable (see [`Datastore::put_reports_pipelined`]).
pub enum Durable {
    /// They are already.
    Now,
    /// Once this completes (successfully).
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>),
}

impl Durable {
    /// Waits until the writes are durable.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self {
            Durable::Now => Ok(()),
            Durable::Later(flushed) => flushed.await,
        }
    }
}

/// Everything Duet persists. Each method is one transaction.
#[async_trait]
pub trait Datastore: Send + Sync + 'static {
    // ---- Tasks and keys (both roles) ----

    /// Stores a new task. `AlreadyExists` if a different task has this ID; storing the same task
    /// again succeeds.
    async fn put_task(&self, task: &Task) -> Result<(), StoreError>;
    /// A task by ID.
    async fn get_task(&self, task_id: &TaskId) -> Result<Option<Task>, StoreError>;
    /// All tasks.
    async fn list_tasks(&self) -> Result<Vec<Task>, StoreError>;
    /// Deletes a task and everything stored under it. Returns whether it existed. For a task
    /// no process serves any more: a server that has the task cached goes on accepting its
    /// uploads and running its jobs, and those write under the deleted task again.
    async fn delete_task(&self, task_id: &TaskId) -> Result<bool, StoreError>;
    /// Stores an HPKE keypair (`AlreadyExists` if its config ID is taken).
    async fn put_hpke_keypair(&self, keypair: &HpkeKeypair) -> Result<(), StoreError>;
    /// All HPKE keypairs, ordered by config ID.
    async fn get_hpke_keypairs(&self) -> Result<Vec<HpkeKeypair>, StoreError>;

    // ---- Batch aggregations (both roles) ----

    /// The stored per-bucket aggregations of a task whose bucket lies in `interval`.
    async fn get_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Vec<BatchAggregation>, StoreError>;
    /// The sum of the stored per-bucket aggregations of a task whose bucket lies in `interval`,
    /// their shares added with `merge`. The rows are read and added one at a time, so a batch
    /// of many buckets takes the memory of a few aggregate shares (and of the rows a backend
    /// reads ahead: up to 50 on SQLite, sqlx's row channel), not of all of them.
    async fn sum_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
        merge: MergeFn<'_>,
    ) -> Result<BatchSum, StoreError>;
    /// Intervals of batches that have been collected (Leader: finished collection jobs, deleted
    /// since or not; Helper: aggregate shares served) and overlap `within`
    /// ([`Interval::ALL_TIME`] for all of them), in order and once each. The Helper's reads
    /// near the present skip its history.
    async fn collected_intervals(
        &self,
        task_id: &TaskId,
        within: &Interval,
    ) -> Result<Vec<Interval>, StoreError>;

    // ---- Leader: reports and aggregation jobs ----

    /// Stores uploaded reports in one transaction. A report whose ID was seen before for its
    /// task is a replay and is never aggregated; a store may find replays here, but both
    /// backends find them when `create_aggregation_jobs` claims the reports, which keeps the
    /// upload path free of a random-key index, and keep the first upload. Returns, per report,
    /// `false` for a replay found here (a repeat within `reports`), `true` otherwise.
    async fn put_reports(&self, reports: &[NewReport]) -> Result<Vec<bool>, StoreError>;
    /// [`Datastore::put_reports`], except that it may return once the reports are written and
    /// visible, before they are durable: the returned [`Durable`] completes once they are, and
    /// only then may their uploads be acknowledged. A caller can write its next batch meanwhile.
    /// (PostgreSQL does so for large batches, where a commit's flush would otherwise hold up
    /// the next write; a store that only writes durably returns [`Durable::Now`].)
    async fn put_reports_pipelined(
        &self,
        reports: &[NewReport],
    ) -> Result<(Vec<bool>, Durable), StoreError> {
        Ok((self.put_reports(reports).await?, Durable::Now))
    }
    /// Groups unassigned reports into new aggregation jobs of at most `max_job_size` reports
    /// each (none if it is 0). Returns how many jobs were created.
    async fn create_aggregation_jobs(
        &self,
        max_job_size: usize,
        now: Time,
    ) -> Result<usize, StoreError> {
        if max_job_size == 0 {
            return Ok(0);
        }
        Ok(self
            .create_sized_aggregation_jobs(&JobSizes::uniform(max_job_size), now)
            .await?
            .jobs)
    }
    /// Groups unassigned reports into new aggregation jobs, each of at most as many reports as
    /// `sizes` gives its task. The reports of a task `sizes` gives no size are left unclaimed,
    /// and so may be reports uploaded after them (in upload order, as a backend claims); the
    /// task is listed in the result.
    async fn create_sized_aggregation_jobs(
        &self,
        sizes: &JobSizes,
        now: Time,
    ) -> Result<CreatedJobs, StoreError>;
    /// Leases up to `limit` runnable aggregation jobs, with their reports.
    async fn acquire_aggregation_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredAggregationJob>, StoreError>;
    /// Completes a leased job: merges `deltas` into the batch aggregations, marks the job
    /// finished and its reports aggregated (their payloads dropped; their IDs kept for replay
    /// protection). `LeaseLost` if the lease is no longer held.
    async fn finish_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError>;
    /// Gives a leased job back, runnable again at `retry_at`. `LeaseLost` if the lease is no
    /// longer held.
    async fn release_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        retry_at: Time,
    ) -> Result<(), StoreError>;
    /// Gives up on a leased job (`LeaseLost` if the lease is no longer held): it will not run
    /// again and its reports count as aggregated (dropped).
    async fn abandon_aggregation_job(&self, job: &AcquiredAggregationJob)
        -> Result<(), StoreError>;
    /// How many reports of a task with a timestamp in `interval` are not yet aggregated (stored
    /// but unassigned, or in an unfinished job). A store that finds replays when jobs are
    /// created counts a replay uploaded since the last job creation until then.
    async fn count_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<u64, StoreError>;
    /// Whether [`Datastore::count_unaggregated_reports`] would be above zero. It stops at the
    /// first such report, where a count reads them all: a collection driver asks this each time
    /// a job finishes, while its batch may still hold many.
    async fn has_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<bool, StoreError>;

    // ---- Leader: collection jobs ----

    /// Stores a new collection job in state `Start`. Storing an identical job again succeeds,
    /// whatever state the stored one has reached (identical: same batch interval and aggregation
    /// parameter); a different job with the same ID is `AlreadyExists`. A new job whose batch
    /// overlaps, without being the same, the batch of another job of the task (not deleted, or
    /// deleted after its batch was collected) is `BatchOverlap`, checked so that of two such
    /// jobs created at once, one is stored.
    async fn put_collection_job(&self, job: &CollectionJob) -> Result<(), StoreError>;
    /// A collection job.
    async fn get_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<Option<CollectionJob>, StoreError>;
    /// The batches of a task's collection jobs that are not deleted and overlap `overlapping`
    /// ([`Interval::ALL_TIME`] for all of them), by batch start and job ID: what a new job's
    /// overlap and query-count checks need, read without the jobs' results.
    async fn collection_job_batches(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<CollectionJobBatch>, StoreError>;
    /// Marks a collection job deleted: it is not leased again. Returns whether it existed.
    async fn delete_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<bool, StoreError>;
    /// Leases up to `limit` collection jobs in state `Start`.
    async fn acquire_collection_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredCollectionJob>, StoreError>;
    /// Gives a leased collection job back, runnable again at `retry_at` (a job deleted while
    /// leased is not run again: its lease just ends). `LeaseLost` if the lease is no longer
    /// held. A lease that was not an `attempt` (the job's batch was not
    /// ready: a job waits through any number of those) is uncounted: the job's attempts go back
    /// to what they were before it.
    async fn release_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        retry_at: Time,
        attempt: bool,
    ) -> Result<(), StoreError>;
    /// Moves a leased collection job to a final state (`Finished` or `Abandoned`). A job deleted
    /// while leased stays deleted, but a `Finished` result is still recorded: the Helper served
    /// the batch, so it counts as collected (`collected_intervals`). (If that attempt ends
    /// otherwise, the deleted job is not run again, and a batch the Helper served without its
    /// answer reaching the Leader is not recorded.) `LeaseLost` if the lease is no longer
    /// held.
    async fn finish_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        state: &CollectionJobState,
    ) -> Result<(), StoreError>;

    // ---- Helper ----

    /// The stored aggregation job, if any.
    async fn get_helper_aggregation_job(
        &self,
        task_id: &TaskId,
        id: &AggregationJobId,
    ) -> Result<Option<HelperAggregationJob>, StoreError>;
    /// Which of these report IDs the Helper has already aggregated for the task. An ID stored
    /// by another process very recently may be missed; `put_helper_aggregation_job` never
    /// misses one (it answers `Conflict`, and the caller looks again).
    async fn seen_report_ids(
        &self,
        task_id: &TaskId,
        ids: &[ReportId],
    ) -> Result<HashSet<ReportId>, StoreError>;
    /// Stores a finished Helper aggregation job in one transaction: the job (with its response),
    /// the IDs of the reports it processed (for replay protection: those it accepted and those
    /// it rejected for good) and the merged `deltas`.
    /// `Conflict` if the job ID or any report ID is already stored, or if a bucket of `deltas`
    /// lies in a batch whose aggregate share is recorded (one served since the caller read
    /// `collected_intervals`: its reports there are `batch_collected`).
    async fn put_helper_aggregation_job(
        &self,
        job: &HelperAggregationJob,
        report_ids: &[ReportId],
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError>;
    /// Deletes up to `limit` of the oldest Helper aggregation jobs (their request hashes and
    /// responses) stored more than `older_than_s` seconds ago, by the database's clock; returns
    /// how many. A Leader's retry of a deleted job is a new job whose reports are all replays.
    async fn delete_old_helper_aggregation_jobs(
        &self,
        older_than_s: u64,
        limit: usize,
    ) -> Result<u64, StoreError>;
    /// A previously served aggregate share for this batch and aggregation parameter.
    async fn get_aggregate_share_job(
        &self,
        task_id: &TaskId,
        batch_interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Option<AggregateShareJob>, StoreError>;
    /// The aggregate-share jobs of a task whose batch overlaps `overlapping` (for the query-count
    /// and overlap checks of that batch), in order of batch and parameter.
    async fn list_aggregate_share_jobs(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<AggregateShareJob>, StoreError>;
    /// Records a served aggregate share (`AlreadyExists` if one exists for this batch and
    /// parameter with different content). Checked in its transaction, serialised with the
    /// task's aggregation job writes: `BatchOverlap` if a share was served for another batch
    /// that overlaps this one, and `Conflict` if the batch's aggregations no longer hold
    /// `report_count` reports (a job merged into it after the share was computed: recompute).
    async fn put_aggregate_share_job(&self, job: &AggregateShareJob) -> Result<(), StoreError>;

    // ---- Operations ----

    /// Checks that the database answers.
    async fn health_check(&self) -> Result<(), StoreError>;

    /// The database's engine and version, and the settings that bear on its speed and its
    /// durability, as (name, value) pairs: for benchmark reports, which are only comparable
    /// between equally configured databases.
    async fn settings(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// Closes the connections (of every handle on the same pool), waiting for them to finish.
    /// Operations after it fail.
    async fn close(&self);

    /// Loads what the store keeps in memory to make its hot paths cheap, before a server takes
    /// requests (SQLite: the filter in front of its role's replay set, read from the whole set;
    /// about 0.3–0.4 s per million report IDs). Everything works without it, only slower at
    /// first.
    async fn warm_up(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Wake-ups for the Leader's background jobs caused by writes of *other* processes sharing
    /// the database (and of this one), or `None` if the backend has no such channel (SQLite: one
    /// process, whose in-process wake-ups already cover it). Delivery is best effort: a lost
    /// wake-up costs at most one polling interval.
    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Wakeup>> {
        None
    }
}

/// Something a write committed that a Leader's background job may want to act on now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wakeup {
    /// Reports were stored (the job creator has work).
    ReportsStored,
    /// Aggregation jobs were created (the aggregation driver has work).
    AggregationJobsCreated,
    /// An aggregation job ended or a collection job was created (the collection driver has work).
    CollectionWorkReady,
    /// The listener (re)started: wake-ups may have been missed meanwhile, so act as if all of the
    /// above happened.
    Listening,
}
