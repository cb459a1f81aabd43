//! Checks of the Leader's collection jobs.

use duet_messages::dap09::{
    Collection, CollectionJobId, Duration, Interval, PartialBatchSelector, TaskId, Time,
};

use super::{ciphertext, interval, task, PRECISION, T0};
use crate::{
    AcquiredCollectionJob, CollectionJob, CollectionJobBatch, CollectionJobState, Datastore,
    StoreError,
};

/// The state of a stored collection job.
async fn state_of(
    store: &dyn Datastore,
    task_id: &TaskId,
    id: &CollectionJobId,
) -> CollectionJobState {
    store
        .get_collection_job(task_id, id)
        .await
        .expect("get")
        .expect("stored job")
        .state
}

/// A job's batch, as `collection_job_batches` reads it.
fn batch_of(job: &CollectionJob) -> CollectionJobBatch {
    CollectionJobBatch {
        id: job.id,
        batch_interval: job.batch_interval,
        aggregation_parameter: job.aggregation_parameter.clone(),
    }
}

/// Leases collection jobs at `now` and keeps those of `task_id`.
async fn acquire(store: &dyn Datastore, task_id: TaskId, now: u64) -> Vec<AcquiredCollectionJob> {
    store
        .acquire_collection_jobs(Time(now), 100, 10)
        .await
        .expect("acquire_collection_jobs")
        .into_iter()
        .filter(|j| j.job.task_id == task_id)
        .collect()
}

fn new_job(task_id: TaskId, start: u64) -> CollectionJob {
    CollectionJob {
        task_id,
        id: CollectionJobId::random(),
        batch_interval: interval(start, PRECISION),
        aggregation_parameter: Vec::new(),
        state: CollectionJobState::Start,
    }
}

/// Collection jobs: identical re-put, conflicting put, leases, finish and abandon, delete, and
/// the collected intervals they leave.
pub async fn check_collection_jobs(leader: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let job = new_job(t.id, T0);
    assert_eq!(
        leader
            .get_collection_job(&t.id, &job.id)
            .await
            .expect("get"),
        None
    );
    leader
        .put_collection_job(&job)
        .await
        .expect("put_collection_job");
    leader
        .put_collection_job(&job)
        .await
        .expect("identical re-put");
    let mut different = job.clone();
    different.batch_interval = interval(T0 + PRECISION, PRECISION);
    assert!(matches!(
        leader.put_collection_job(&different).await,
        Err(StoreError::AlreadyExists)
    ));
    let mut different_param = job.clone();
    different_param.aggregation_parameter = vec![1];
    assert!(matches!(
        leader.put_collection_job(&different_param).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(
        leader
            .get_collection_job(&t.id, &job.id)
            .await
            .expect("get"),
        Some(job.clone())
    );
    // The job's batch, read in any window it overlaps, and in no other.
    let batches = |within: Interval| async move {
        leader
            .collection_job_batches(&t.id, &within)
            .await
            .expect("collection_job_batches")
    };
    for within in [
        Interval::ALL_TIME,
        job.batch_interval,
        interval(T0 - PRECISION, PRECISION + 1),
        interval(T0 + PRECISION - 1, PRECISION),
    ] {
        assert_eq!(batches(within).await, vec![batch_of(&job)], "{within:?}");
    }
    for within in [
        interval(T0 - PRECISION, PRECISION),
        interval(T0 + PRECISION, PRECISION),
        interval(T0, 0),
    ] {
        assert!(batches(within).await.is_empty(), "{within:?}");
    }

    // Leases: exclusive until expiry or release; release delays to the retry time.
    let now = T0 + 10 * PRECISION;
    let first = acquire(leader, t.id, now).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job, job);
    assert_eq!(
        (first[0].lease.attempts, first[0].lease.expiry),
        (1, Time(now + 100))
    );
    assert!(acquire(leader, t.id, now + 50).await.is_empty());
    leader
        .release_collection_job(&first[0], Time(now + 200), true)
        .await
        .expect("release_collection_job");
    let stale = leader
        .release_collection_job(&first[0], Time(now), true)
        .await;
    assert!(matches!(stale, Err(StoreError::LeaseLost)));
    assert!(acquire(leader, t.id, now + 199).await.is_empty());
    let second = acquire(leader, t.id, now + 200).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].lease.attempts, 2);
    let third = acquire(leader, t.id, now + 300).await;
    assert_eq!(third.len(), 1, "an expired lease is taken over");
    assert_eq!(third[0].lease.attempts, 3);

    // Finish needs the current lease.
    let collection = Collection {
        partial_batch_selector: PartialBatchSelector::TimeInterval,
        report_count: 12,
        interval: interval(T0, PRECISION),
        leader_encrypted_agg_share: ciphertext(1),
        helper_encrypted_agg_share: ciphertext(2),
    };
    let finished = CollectionJobState::Finished(collection.clone());
    let lost = leader.finish_collection_job(&second[0], &finished).await;
    assert!(matches!(lost, Err(StoreError::LeaseLost)));
    assert!(leader
        .collected_intervals(&t.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals")
        .is_empty());
    leader
        .finish_collection_job(&third[0], &finished)
        .await
        .expect("finish_collection_job");
    assert_eq!(state_of(leader, &t.id, &job.id).await, finished);
    let twice = leader.finish_collection_job(&third[0], &finished).await;
    assert!(
        matches!(twice, Err(StoreError::LeaseLost)),
        "a finished job cannot finish twice"
    );
    assert!(acquire(leader, t.id, now + 10_000).await.is_empty());
    // The collector's retried PUT of a finished job is still fine, and changes nothing.
    leader
        .put_collection_job(&job)
        .await
        .expect("identical re-put after finish");
    assert_eq!(
        leader
            .get_collection_job(&t.id, &job.id)
            .await
            .expect("get")
            .map(|j| j.state),
        Some(finished.clone())
    );
    assert_eq!(
        leader
            .collected_intervals(&t.id, &Interval::ALL_TIME)
            .await
            .expect("collected_intervals"),
        vec![job.batch_interval]
    );
    // Only the collected batches that overlap the window asked about.
    let batch = job.batch_interval;
    let at = |start: u64, duration: u64| Interval {
        start: Time(start),
        duration: Duration(duration),
    };
    for (within, expected) in [
        (at(batch.start.0 - PRECISION, PRECISION), vec![]),
        (at(batch.end().0, PRECISION), vec![]),
        (at(batch.end().0 - 1, 1), vec![batch]),
        (at(batch.start.0 - PRECISION, PRECISION + 1), vec![batch]),
        (at(batch.start.0, 0), vec![]),
    ] {
        assert_eq!(
            leader
                .collected_intervals(&t.id, &within)
                .await
                .expect("collected_intervals"),
            expected,
            "collected within {within:?}"
        );
    }

    // Abandoned: not collected.
    let abandoned_job = new_job(t.id, T0 + PRECISION);
    leader
        .put_collection_job(&abandoned_job)
        .await
        .expect("put_collection_job");
    // Leases that find the batch not ready are not attempts, however many there are.
    for at in now + 20_000..now + 20_003 {
        let waiting = acquire(leader, t.id, at).await;
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].lease.attempts, 1);
        leader
            .release_collection_job(&waiting[0], Time(at), false)
            .await
            .expect("release_collection_job");
    }
    let leased = acquire(leader, t.id, now + 20_003).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].lease.attempts, 1);
    let abandoned = CollectionJobState::Abandoned("batch too small".into());
    leader
        .finish_collection_job(&leased[0], &abandoned)
        .await
        .expect("finish_collection_job");
    assert_eq!(state_of(leader, &t.id, &abandoned_job.id).await, abandoned);
    assert_eq!(
        leader
            .collected_intervals(&t.id, &Interval::ALL_TIME)
            .await
            .expect("collected_intervals"),
        vec![job.batch_interval]
    );
    assert!(acquire(leader, t.id, now + 30_000).await.is_empty());

    // Deleted: not listed, not leased again; a lease held on it can still record the batch as
    // collected (the Helper served it), and the job stays deleted.
    let deleted_job = new_job(t.id, T0 + 2 * PRECISION);
    leader
        .put_collection_job(&deleted_job)
        .await
        .expect("put_collection_job");
    let leased = acquire(leader, t.id, now + 40_000).await;
    assert_eq!(leased.len(), 1);
    assert!(leader
        .delete_collection_job(&t.id, &deleted_job.id)
        .await
        .expect("delete_collection_job"));
    assert_eq!(
        state_of(leader, &t.id, &deleted_job.id).await,
        CollectionJobState::Deleted
    );
    let ids: Vec<CollectionJobId> = leader
        .collection_job_batches(&t.id, &Interval::ALL_TIME)
        .await
        .expect("list")
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&job.id) && ids.contains(&abandoned_job.id));
    leader
        .finish_collection_job(&leased[0], &finished)
        .await
        .expect("finish a job deleted while leased");
    assert_eq!(
        state_of(leader, &t.id, &deleted_job.id).await,
        CollectionJobState::Deleted
    );
    assert_eq!(
        leader
            .collected_intervals(&t.id, &Interval::ALL_TIME)
            .await
            .expect("collected_intervals"),
        vec![job.batch_interval, deleted_job.batch_interval]
    );
    let lost = leader
        .finish_collection_job(&leased[0], &CollectionJobState::Abandoned("x".into()))
        .await;
    assert!(matches!(lost, Err(StoreError::LeaseLost)));
    assert!(acquire(leader, t.id, now + 50_000).await.is_empty());
    assert!(!leader
        .delete_collection_job(&t.id, &CollectionJobId::random())
        .await
        .expect("delete unknown"));

    // A start-state job deleted before being leased never runs.
    let never_run = new_job(t.id, T0 + 3 * PRECISION);
    leader
        .put_collection_job(&never_run)
        .await
        .expect("put_collection_job");
    assert!(leader
        .delete_collection_job(&t.id, &never_run.id)
        .await
        .expect("delete_collection_job"));
    assert!(acquire(leader, t.id, now + 60_000).await.is_empty());

    // Deleting a finished job doesn't un-collect its batch.
    assert!(leader
        .delete_collection_job(&t.id, &job.id)
        .await
        .expect("delete_collection_job"));
    assert_eq!(
        leader
            .collected_intervals(&t.id, &Interval::ALL_TIME)
            .await
            .expect("collected_intervals"),
        vec![job.batch_interval, deleted_job.batch_interval]
    );
    assert_eq!(
        leader
            .collection_job_batches(&t.id, &Interval::ALL_TIME)
            .await
            .expect("list"),
        vec![batch_of(&abandoned_job)]
    );
    assert_eq!(
        leader
            .get_collection_job(&t.id, &abandoned_job.id)
            .await
            .expect("get"),
        Some(got_abandoned(&abandoned_job))
    );

    // Another task's jobs are its own.
    let other = task(TaskId::random());
    assert!(leader
        .collection_job_batches(&other.id, &Interval::ALL_TIME)
        .await
        .expect("list")
        .is_empty());
    assert!(leader
        .collected_intervals(&other.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals")
        .is_empty());
    assert_eq!(
        leader
            .get_collection_job(&other.id, &abandoned_job.id)
            .await
            .expect("get"),
        None
    );

    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
    assert!(leader
        .collected_intervals(&t.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals")
        .is_empty());
}

fn got_abandoned(job: &CollectionJob) -> CollectionJob {
    CollectionJob {
        state: CollectionJobState::Abandoned("batch too small".into()),
        ..job.clone()
    }
}

/// A new job whose batch overlaps another job's, without being the same, is `BatchOverlap`, also
/// when the two are created at once; the same batch again is a new job; a job deleted before
/// its batch was collected leaves no batch to overlap.
pub async fn check_collection_job_overlaps(leader: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let first = new_job(t.id, T0);
    leader.put_collection_job(&first).await.expect("put");
    let mut wider = new_job(t.id, T0);
    wider.batch_interval = interval(T0, 2 * PRECISION);
    assert!(matches!(
        leader.put_collection_job(&wider).await,
        Err(StoreError::BatchOverlap)
    ));
    assert_eq!(
        leader
            .get_collection_job(&t.id, &wider.id)
            .await
            .expect("get"),
        None
    );
    leader
        .put_collection_job(&new_job(t.id, T0))
        .await
        .expect("the same batch again");
    leader
        .put_collection_job(&new_job(t.id, T0 + PRECISION))
        .await
        .expect("the next batch");

    // Deleted before its batch was collected: nothing to overlap.
    let dropped = new_job(t.id, T0 + 4 * PRECISION);
    leader.put_collection_job(&dropped).await.expect("put");
    assert!(leader
        .delete_collection_job(&t.id, &dropped.id)
        .await
        .expect("delete"));
    let mut over_dropped = new_job(t.id, T0 + 4 * PRECISION);
    over_dropped.batch_interval = interval(T0 + 4 * PRECISION, 2 * PRECISION);
    leader
        .put_collection_job(&over_dropped)
        .await
        .expect("over a job deleted before it ran");

    // Two overlapping jobs created at once: one is stored.
    for round in 0..5u64 {
        let start = T0 + (10 + 4 * round) * PRECISION;
        let a = new_job(t.id, start);
        let mut b = new_job(t.id, start);
        b.batch_interval = interval(start, 2 * PRECISION);
        let (ra, rb) = tokio::join!(leader.put_collection_job(&a), leader.put_collection_job(&b));
        let stored = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(stored, 1, "{ra:?} {rb:?}");
        assert!(
            [ra, rb]
                .into_iter()
                .any(|r| matches!(r, Err(StoreError::BatchOverlap))),
            "the other is refused for overlap"
        );
    }

    // Deleted while leased, then given back for a retry: the lease ends, the job is not run
    // again, and its batch is not collected.
    let gone = new_job(t.id, T0 + 40 * PRECISION);
    leader.put_collection_job(&gone).await.expect("put");
    let now = T0 + 100 * PRECISION;
    let leased: Vec<_> = acquire(leader, t.id, now)
        .await
        .into_iter()
        .filter(|j| j.job.id == gone.id)
        .collect();
    assert_eq!(leased.len(), 1);
    assert!(leader
        .delete_collection_job(&t.id, &gone.id)
        .await
        .expect("delete"));
    leader
        .release_collection_job(&leased[0], Time(now), true)
        .await
        .expect("release a job deleted while leased");
    assert!(acquire(leader, t.id, now + 10_000)
        .await
        .iter()
        .all(|j| j.job.id != gone.id));
    assert!(!leader
        .collected_intervals(&t.id, &gone.batch_interval)
        .await
        .expect("collected_intervals")
        .contains(&gone.batch_interval));
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
}
