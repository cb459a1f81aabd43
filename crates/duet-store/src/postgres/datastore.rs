//! `Datastore` for PostgreSQL: each call runs its module's function under
//! [`PostgresDatastore::run`]'s retries, bound to the handle's role where the roles differ.

use std::collections::HashSet;
use std::sync::PoisonError;

use async_trait::async_trait;
use duet_core::hpke::HpkeKeypair;
use duet_core::{AggregatorRole, Task};
use duet_messages::dap09::{AggregationJobId, CollectionJobId, Interval, ReportId, TaskId, Time};

use super::{
    collection, flush, helper, job_creation, leader, tasks, unaggregated, PostgresDatastore,
    SETTINGS,
};
use crate::{
    AcquiredAggregationJob, AcquiredCollectionJob, AggregateShareJob, BatchAggregation, BatchSum,
    CollectionJob, CollectionJobBatch, CollectionJobState, Datastore, HelperAggregationJob,
    MergeFn, NewReport, StoreError, Wakeup,
};

#[async_trait]
impl Datastore for PostgresDatastore {
    async fn put_task(&self, task: &Task) -> Result<(), StoreError> {
        self.run("put_task", || tasks::put_task(self, task)).await
    }

    async fn get_task(&self, task_id: &TaskId) -> Result<Option<Task>, StoreError> {
        self.run("get_task", || tasks::get_task(self, task_id))
            .await
    }

    async fn list_tasks(&self) -> Result<Vec<Task>, StoreError> {
        self.run("list_tasks", || tasks::list_tasks(self)).await
    }

    async fn delete_task(&self, task_id: &TaskId) -> Result<bool, StoreError> {
        self.run("delete_task", || tasks::delete_task(self, task_id))
            .await
    }

    async fn put_hpke_keypair(&self, keypair: &HpkeKeypair) -> Result<(), StoreError> {
        self.run("put_hpke_keypair", || {
            tasks::put_hpke_keypair(self, keypair)
        })
        .await
    }

    async fn get_hpke_keypairs(&self) -> Result<Vec<HpkeKeypair>, StoreError> {
        self.run("get_hpke_keypairs", || tasks::get_hpke_keypairs(self))
            .await
    }

    async fn get_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Vec<BatchAggregation>, StoreError> {
        self.run("get_batch_aggregations", || {
            tasks::get_batch_aggregations(self, task_id, interval, aggregation_parameter)
        })
        .await
    }

    async fn sum_batch_aggregations(
        &self,
        task_id: &TaskId,
        interval: &Interval,
        aggregation_parameter: &[u8],
        merge: MergeFn<'_>,
    ) -> Result<BatchSum, StoreError> {
        self.run("sum_batch_aggregations", || {
            tasks::sum_batch_aggregations(self, task_id, interval, aggregation_parameter, merge)
        })
        .await
    }

    async fn collected_intervals(
        &self,
        task_id: &TaskId,
        within: &Interval,
    ) -> Result<Vec<Interval>, StoreError> {
        match self.role {
            AggregatorRole::Leader => {
                self.run("collected_intervals", || {
                    collection::collected_intervals(self, task_id, within)
                })
                .await
            }
            AggregatorRole::Helper => {
                self.run("collected_intervals", || {
                    helper::collected_intervals(self, task_id, within)
                })
                .await
            }
        }
    }

    async fn put_reports(&self, reports: &[NewReport]) -> Result<Vec<bool>, StoreError> {
        self.run("put_reports", || {
            leader::put_reports(self, reports, &self.pool)
        })
        .await
    }

    async fn put_reports_pipelined(
        &self,
        reports: &[NewReport],
    ) -> Result<(Vec<bool>, crate::Durable), StoreError> {
        let bytes: usize = reports.iter().map(|r| r.encoded.len()).sum();
        if bytes < flush::UNFLUSHED_MIN_BYTES {
            return Ok((self.put_reports(reports).await?, crate::Durable::Now));
        }
        let fresh = self
            .run("put_reports", || {
                leader::put_reports(self, reports, &self.unflushed)
            })
            .await?;
        // The connection that wrote the batch is the pool's only one, and it is replaced only
        // when the pool is next used: this is the session the batch went to.
        let session = *self
            .unflushed_session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pool = self.pool.clone();
        Ok((
            fresh,
            crate::Durable::Later(Box::pin(
                async move { flush::flushed(&pool, session).await },
            )),
        ))
    }

    async fn create_sized_aggregation_jobs(
        &self,
        sizes: &crate::JobSizes,
        now: Time,
    ) -> Result<crate::CreatedJobs, StoreError> {
        self.run("create_aggregation_jobs", || {
            job_creation::create_aggregation_jobs(self, sizes, now)
        })
        .await
    }

    async fn acquire_aggregation_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredAggregationJob>, StoreError> {
        self.run("acquire_aggregation_jobs", || {
            leader::acquire_aggregation_jobs(self, now, lease_duration, limit)
        })
        .await
    }

    async fn finish_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError> {
        self.run("finish_aggregation_job", || {
            leader::finish_aggregation_job(self, job, deltas, merge)
        })
        .await
    }

    async fn release_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
        retry_at: Time,
    ) -> Result<(), StoreError> {
        self.run("release_aggregation_job", || {
            leader::release_aggregation_job(self, job, retry_at)
        })
        .await
    }

    async fn abandon_aggregation_job(
        &self,
        job: &AcquiredAggregationJob,
    ) -> Result<(), StoreError> {
        self.run("abandon_aggregation_job", || {
            leader::abandon_aggregation_job(self, job)
        })
        .await
    }

    async fn count_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<u64, StoreError> {
        self.run("count_unaggregated_reports", || {
            unaggregated::count_unaggregated_reports(self, task_id, interval)
        })
        .await
    }

    async fn has_unaggregated_reports(
        &self,
        task_id: &TaskId,
        interval: &Interval,
    ) -> Result<bool, StoreError> {
        self.run("has_unaggregated_reports", || {
            unaggregated::has_unaggregated_reports(self, task_id, interval)
        })
        .await
    }

    async fn put_collection_job(&self, job: &CollectionJob) -> Result<(), StoreError> {
        self.run("put_collection_job", || {
            collection::put_collection_job(self, job)
        })
        .await
    }

    async fn get_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<Option<CollectionJob>, StoreError> {
        self.run("get_collection_job", || {
            collection::get_collection_job(self, task_id, id)
        })
        .await
    }

    async fn collection_job_batches(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<CollectionJobBatch>, StoreError> {
        self.run("collection_job_batches", || {
            collection::collection_job_batches(self, task_id, overlapping)
        })
        .await
    }

    async fn delete_collection_job(
        &self,
        task_id: &TaskId,
        id: &CollectionJobId,
    ) -> Result<bool, StoreError> {
        self.run("delete_collection_job", || {
            collection::delete_collection_job(self, task_id, id)
        })
        .await
    }

    async fn acquire_collection_jobs(
        &self,
        now: Time,
        lease_duration: u64,
        limit: usize,
    ) -> Result<Vec<AcquiredCollectionJob>, StoreError> {
        self.run("acquire_collection_jobs", || {
            collection::acquire_collection_jobs(self, now, lease_duration, limit)
        })
        .await
    }

    async fn release_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        retry_at: Time,
        attempt: bool,
    ) -> Result<(), StoreError> {
        self.run("release_collection_job", || {
            collection::release_collection_job(self, job, retry_at, attempt)
        })
        .await
    }

    async fn finish_collection_job(
        &self,
        job: &AcquiredCollectionJob,
        state: &CollectionJobState,
    ) -> Result<(), StoreError> {
        self.run("finish_collection_job", || {
            collection::finish_collection_job(self, job, state)
        })
        .await
    }

    async fn get_helper_aggregation_job(
        &self,
        task_id: &TaskId,
        id: &AggregationJobId,
    ) -> Result<Option<HelperAggregationJob>, StoreError> {
        self.run("get_helper_aggregation_job", || {
            helper::get_helper_aggregation_job(self, task_id, id)
        })
        .await
    }

    async fn seen_report_ids(
        &self,
        task_id: &TaskId,
        ids: &[ReportId],
    ) -> Result<HashSet<ReportId>, StoreError> {
        self.run("seen_report_ids", || {
            helper::seen_report_ids(self, task_id, ids)
        })
        .await
    }

    async fn put_helper_aggregation_job(
        &self,
        job: &HelperAggregationJob,
        report_ids: &[ReportId],
        deltas: &[BatchAggregation],
        merge: MergeFn<'_>,
    ) -> Result<(), StoreError> {
        self.run("put_helper_aggregation_job", || {
            helper::put_helper_aggregation_job(self, job, report_ids, deltas, merge)
        })
        .await
    }

    async fn delete_old_helper_aggregation_jobs(
        &self,
        older_than_s: u64,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.run("delete_old_helper_aggregation_jobs", || {
            helper::delete_old_helper_aggregation_jobs(self, older_than_s, limit)
        })
        .await
    }

    async fn get_aggregate_share_job(
        &self,
        task_id: &TaskId,
        batch_interval: &Interval,
        aggregation_parameter: &[u8],
    ) -> Result<Option<AggregateShareJob>, StoreError> {
        self.run("get_aggregate_share_job", || {
            helper::get_aggregate_share_job(self, task_id, batch_interval, aggregation_parameter)
        })
        .await
    }

    async fn list_aggregate_share_jobs(
        &self,
        task_id: &TaskId,
        overlapping: &Interval,
    ) -> Result<Vec<AggregateShareJob>, StoreError> {
        self.run("list_aggregate_share_jobs", || {
            helper::list_aggregate_share_jobs(self, task_id, overlapping)
        })
        .await
    }

    async fn put_aggregate_share_job(&self, job: &AggregateShareJob) -> Result<(), StoreError> {
        self.run("put_aggregate_share_job", || {
            helper::put_aggregate_share_job(self, job)
        })
        .await
    }

    async fn close(&self) {
        PostgresDatastore::close(self).await;
    }

    async fn health_check(&self) -> Result<(), StoreError> {
        sqlx::query("-- health_check\nSELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Database(e.to_string()))?;
        Ok(())
    }

    async fn settings(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "-- settings\n\
             SELECT n, current_setting(n) FROM UNNEST($1::text[]) WITH ORDINALITY AS s(n, i) \
             ORDER BY i",
        )
        .bind(&SETTINGS[..])
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?;
        Ok(
            std::iter::once(("engine".to_string(), "postgresql".to_string()))
                .chain(rows)
                .collect(),
        )
    }

    /// Loads the role's filter over its closed replay runs.
    async fn warm_up(&self) -> Result<(), StoreError> {
        match self.role {
            AggregatorRole::Leader => self.leader_runs.load(&self.pool).await,
            AggregatorRole::Helper => self.helper_runs.load(&self.pool).await,
        }
    }

    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Wakeup>> {
        self.wakeups.subscribe(&self.pool)
    }
}
