//! Checks of the Leader's reports and aggregation jobs.

use std::collections::HashSet;

use duet_messages::dap09::{AggregationJobId, CollectionJobId, ReportId, TaskId, Time};

use super::{
    add_shares, checksum, create_jobs, delta, interval, report, share_value, task, PRECISION, T0,
};
use crate::{
    AcquiredAggregationJob, CollectionJob, CollectionJobState, Datastore, HelperAggregationJob,
    NewReport, StoreError,
};

/// Leases jobs at `now` and keeps those of `task_id` (the method is not per task).
async fn acquire(
    store: &dyn Datastore,
    task_id: TaskId,
    now: u64,
    limit: usize,
) -> Vec<AcquiredAggregationJob> {
    store
        .acquire_aggregation_jobs(Time(now), 100, limit)
        .await
        .expect("acquire_aggregation_jobs")
        .into_iter()
        .filter(|j| j.task_id == task_id)
        .collect()
}

/// The count of unaggregated reports of `task_id` in `[start, start + duration)`, checked
/// against `has_unaggregated_reports`.
pub async fn unaggregated(
    store: &dyn Datastore,
    task_id: TaskId,
    start: u64,
    duration: u64,
) -> u64 {
    let within = interval(start, duration);
    let count = store
        .count_unaggregated_reports(&task_id, &within)
        .await
        .expect("count_unaggregated_reports");
    let any = store
        .has_unaggregated_reports(&task_id, &within)
        .await
        .expect("has_unaggregated_reports");
    assert_eq!(any, count > 0, "{count} unaggregated reports in {within:?}");
    count
}

fn ids(job: &AcquiredAggregationJob) -> Vec<ReportId> {
    job.reports.iter().map(|r| r.report_id).collect()
}

/// Reports: replay protection per task, for repeats within one batch, across batches and in
/// batches larger than any statement chunk. A store may find a replay at upload or when jobs claim
/// the reports; either way each ID is aggregated once, with its first upload's contents.
/// Unaggregated counts by time.
pub async fn check_put_reports(leader: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let (r1, r2, r3) = (
        report(t.id, T0 + 10),
        report(t.id, T0 + 20),
        report(t.id, T0 + 30),
    );
    assert_eq!(
        leader.put_reports(&[]).await.expect("put_reports"),
        Vec::<bool>::new()
    );
    let new = leader
        .put_reports(&[r1.clone(), r2.clone(), r1.clone()])
        .await
        .expect("put_reports");
    assert_eq!(&new[..2], &[true, true]);
    // A replayed ID with other contents.
    let mut r2_again = report(t.id, T0 + 99);
    r2_again.report_id = r2.report_id;
    let new = leader
        .put_reports(&[r2_again, r3.clone()])
        .await
        .expect("put_reports");
    assert!(new[1]);

    // A large batch, spread over the next bucket, with a replay at its end.
    let mut batch: Vec<NewReport> = (0..1000)
        .map(|i| report(t.id, T0 + PRECISION + i % 100))
        .collect();
    batch.push(r3.clone());
    let new = leader.put_reports(&batch).await.expect("put_reports");
    assert!(new[..1000].iter().all(|n| *n));

    // The same report ID in another task is a different report.
    let other = task(TaskId::random());
    leader.put_task(&other).await.expect("put_task");
    let mut r1_other = r1.clone();
    r1_other.task_id = other.id;
    assert_eq!(
        leader.put_reports(&[r1_other]).await.expect("put_reports"),
        vec![true]
    );

    // Queued reports count as unaggregated, by time. [start, end): a report at the end of an
    // interval is not in it. (Before job creation, a backend may still count replays.)
    assert_eq!(unaggregated(leader, t.id, T0 + 20, 10).await, 1);
    assert_eq!(
        unaggregated(leader, t.id, T0 + PRECISION + 99, PRECISION).await,
        10
    );
    assert_eq!(
        unaggregated(leader, t.id, T0 + PRECISION + 100, PRECISION).await,
        0
    );

    // Jobs hold every report once, as first uploaded.
    let now = T0 + 5000;
    create_jobs(leader, 10_000, now).await;
    let mut want: Vec<&NewReport> = [&r1, &r2, &r3].into_iter().chain(&batch[..1000]).collect();
    want.sort_by_key(|r| r.report_id.0);
    let jobs = leader
        .acquire_aggregation_jobs(Time(now), 100, 100)
        .await
        .expect("acquire_aggregation_jobs");
    let mut got: Vec<_> = jobs
        .iter()
        .filter(|j| j.task_id == t.id)
        .flat_map(|j| j.reports.iter())
        .collect();
    got.sort_by_key(|r| r.report_id.0);
    assert_eq!(got.len(), want.len());
    for (got, want) in got.iter().zip(&want) {
        assert_eq!(
            (got.report_id, got.time, &got.encoded),
            (want.report_id, want.time, &want.encoded)
        );
    }
    let in_other = jobs.iter().filter(|j| j.task_id == other.id);
    assert_eq!(in_other.map(|j| j.reports.len()).sum::<usize>(), 1);

    // Reports of unfinished jobs count as unaggregated. [start, end): a report at the end of an
    // interval is not in it.
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, 3);
    assert_eq!(unaggregated(leader, t.id, T0, 2 * PRECISION).await, 1003);
    assert_eq!(unaggregated(leader, t.id, T0 + 20, 10).await, 1);
    assert_eq!(
        unaggregated(leader, t.id, T0 + PRECISION + 99, PRECISION).await,
        10
    );
    assert_eq!(
        unaggregated(leader, t.id, T0 + PRECISION + 100, PRECISION).await,
        0
    );
    assert_eq!(unaggregated(leader, other.id, T0, PRECISION).await, 1);

    // Replays of reports already in jobs make no new job.
    leader.put_reports(&[r1, r3]).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 10_000, now).await, 0);
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, 3);

    for id in [t.id, other.id] {
        assert!(leader.delete_task(&id).await.expect("delete_task"));
    }
    assert_eq!(unaggregated(leader, t.id, T0, 2 * PRECISION).await, 0);

    // A second upload of an ID is the replay even when it carries an earlier time and the
    // reports go into jobs one at a time.
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let first = report(t.id, T0 + 50);
    let mut second = report(t.id, T0 + 10);
    second.report_id = first.report_id;
    leader
        .put_reports(std::slice::from_ref(&first))
        .await
        .expect("put_reports");
    leader.put_reports(&[second]).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 1, now).await, 1);
    let jobs = acquire(leader, t.id, now, 10).await;
    let held: Vec<_> = jobs
        .iter()
        .flat_map(|j| j.reports.iter().map(|r| (r.time, r.encoded.clone())))
        .collect();
    assert_eq!(held, vec![(first.time, first.encoded)]);
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
}

/// Reports uploaded in several batches are each taken once, in jobs of at most `max_job_size`;
/// the part of a batch past a job's size waits for the next job. Each task's jobs take the size
/// given for it; a task given none keeps its reports until it has one.
pub async fn check_jobs_across_uploads(leader: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let newer: Vec<NewReport> = [120, 100, 110].map(|dt| report(t.id, T0 + dt)).into();
    let older: Vec<NewReport> = [10, 0].map(|dt| report(t.id, T0 + dt)).into();
    leader.put_reports(&newer).await.expect("put_reports");
    leader.put_reports(&older).await.expect("put_reports");
    let now = T0 + 5000;
    assert_eq!(create_jobs(leader, 2, now).await, 3);
    assert_eq!(create_jobs(leader, 2, now).await, 0);
    let jobs = acquire(leader, t.id, now, 10).await;
    let mut sizes: Vec<usize> = jobs.iter().map(|j| j.reports.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![1, 2, 2]);
    let mut got: Vec<_> = jobs
        .iter()
        .flat_map(|j| {
            j.reports
                .iter()
                .map(|r| (r.report_id.0, r.time, r.encoded.clone()))
        })
        .collect();
    got.sort();
    let mut want: Vec<_> = newer
        .iter()
        .chain(&older)
        .map(|r| (r.report_id.0, r.time, r.encoded.clone()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));

    // Sizes by task: one task's jobs of 2, the other's of the default 3.
    let (a, b) = (task(TaskId::random()), task(TaskId::random()));
    for t in [&a, &b] {
        leader.put_task(t).await.expect("put_task");
        let reports: Vec<NewReport> = (0..5).map(|dt| report(t.id, T0 + dt)).collect();
        leader.put_reports(&reports).await.expect("put_reports");
    }
    let sizes = crate::JobSizes {
        default: Some(3),
        per_task: [(a.id, 2)].into(),
    };
    let created = leader
        .create_sized_aggregation_jobs(&sizes, Time(now))
        .await
        .expect("create_sized_aggregation_jobs");
    assert_eq!(created.jobs, 5);
    assert!(created.unsized_tasks.is_empty());
    let jobs = leader
        .acquire_aggregation_jobs(Time(now), 100, 10)
        .await
        .expect("acquire_aggregation_jobs");
    for (t, want) in [(&a, vec![1, 2, 2]), (&b, vec![2, 3])] {
        let mut sizes: Vec<usize> = jobs
            .iter()
            .filter(|j| j.task_id == t.id)
            .map(|j| j.reports.len())
            .collect();
        sizes.sort();
        assert_eq!(sizes, want);
        assert!(leader.delete_task(&t.id).await.expect("delete_task"));
    }

    // With no default size, a task without one keeps its reports and is named, each pass,
    // until it has a size (a backend may leave later reports of sized tasks for then too).
    let (c, d) = (task(TaskId::random()), task(TaskId::random()));
    let mut uploaded = Vec::new();
    for (t, dts) in [(&c, 0..3), (&d, 3..6), (&c, 6..8)] {
        leader.put_task(t).await.expect("put_task");
        let reports: Vec<NewReport> = dts.map(|dt| report(t.id, T0 + dt)).collect();
        leader.put_reports(&reports).await.expect("put_reports");
        uploaded.extend(reports.iter().map(|r| (r.task_id.0, r.report_id.0)));
    }
    let mut sizes = crate::JobSizes {
        default: None,
        per_task: [(c.id, 10)].into(),
    };
    async fn create(
        leader: &dyn Datastore,
        sizes: &crate::JobSizes,
        now: u64,
    ) -> crate::CreatedJobs {
        leader
            .create_sized_aggregation_jobs(sizes, Time(now))
            .await
            .expect("create_sized_aggregation_jobs")
    }
    let first = create(leader, &sizes, now).await;
    assert_eq!(first.unsized_tasks, vec![d.id]);
    assert_eq!(first.jobs, 1, "one job of `c`'s reports before `d`'s");
    let again = create(leader, &sizes, now).await;
    assert_eq!(again.unsized_tasks, vec![d.id]);
    sizes.per_task.insert(d.id, 10);
    let sized = create(leader, &sizes, now).await;
    assert!(sized.unsized_tasks.is_empty(), "{sized:?}");
    assert_eq!(
        create(leader, &sizes, now).await,
        crate::CreatedJobs::default()
    );
    let jobs = leader
        .acquire_aggregation_jobs(Time(now), 100, 10)
        .await
        .expect("acquire_aggregation_jobs");
    assert_eq!(jobs.len(), 1 + again.jobs + sized.jobs);
    let mut claimed: Vec<_> = jobs
        .iter()
        .flat_map(|j| j.reports.iter().map(|r| (j.task_id.0, r.report_id.0)))
        .collect();
    claimed.sort();
    uploaded.sort();
    assert_eq!(claimed, uploaded, "every report claimed once");
    assert_eq!(
        jobs.iter().filter(|j| j.task_id == d.id).count(),
        1,
        "`d`'s reports in one job"
    );
    for t in [&c, &d] {
        assert!(leader.delete_task(&t.id).await.expect("delete_task"));
    }
}

/// Pipelined uploads (`put_reports_pipelined`): small and large batches (a large one is about
/// 17 kB a report, like Prio3SumVec(1000)) are stored once they are durable, with their times
/// and contents, and a repeat within a batch or of an earlier batch is aggregated once.
pub async fn check_pipelined_uploads(leader: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let small: Vec<NewReport> = (0..3).map(|i| report(t.id, T0 + i)).collect();
    let large: Vec<NewReport> = (0..30)
        .map(|i| {
            let mut r = report(t.id, T0 + 10 + i);
            r.encoded.resize(17_000, i as u8);
            r
        })
        .collect();
    let mut batches = vec![small.clone(), large.clone()];
    // The first of the large batch again, within a batch and across batches.
    batches.push(vec![large[0].clone(), large[0].clone(), small[0].clone()]);
    for batch in &batches {
        let (fresh, durable) = leader
            .put_reports_pipelined(batch)
            .await
            .expect("put_reports_pipelined");
        assert_eq!(fresh.len(), batch.len());
        durable.wait().await.expect("durable");
    }
    let now = T0 + 5000;
    assert_eq!(create_jobs(leader, 1000, now).await, 1);
    let mut got: Vec<_> = acquire(leader, t.id, now, 10)
        .await
        .iter()
        .flat_map(|j| {
            j.reports
                .iter()
                .map(|r| (r.report_id.0, r.time, r.encoded.clone()))
        })
        .collect();
    got.sort();
    let mut want: Vec<_> = small
        .iter()
        .chain(&large)
        .map(|r| (r.report_id.0, r.time, r.encoded.clone()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
}

/// Aggregation jobs: creation in bounded sizes oldest first, one task per job; leases (exclusive
/// until expiry, attempts counted, a stale lease refused); finish merges deltas and drops the
/// reports; release delays; abandon drops.
pub async fn check_aggregation_jobs(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    let reports: Vec<NewReport> = (0..10).map(|i| report(t.id, T0 + 10 * i)).collect();
    leader.put_reports(&reports).await.expect("put_reports");
    let now = T0 + 5000;
    assert_eq!(create_jobs(leader, 4, now).await, 3);
    assert_eq!(create_jobs(leader, 4, now).await, 0);

    // One job at a time while leased.
    let first = acquire(leader, t.id, now, 1).await;
    assert_eq!(first.len(), 1);
    let a = first[0].clone();
    assert_eq!(a.lease.attempts, 1);
    assert_eq!(a.lease.expiry, Time(now + 100));
    let rest = acquire(leader, t.id, now + 50, 10).await;
    assert_eq!(rest.len(), 2);
    assert!(acquire(leader, t.id, now + 60, 10).await.is_empty());

    // Jobs hold consecutive runs of the oldest reports, in time order, with their payloads.
    let mut jobs = [a.clone(), rest[0].clone(), rest[1].clone()];
    jobs.sort_by_key(|j| j.reports.first().map(|r| r.time));
    assert_eq!(
        jobs.iter().map(|j| j.reports.len()).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    let in_jobs: Vec<_> = jobs.iter().flat_map(|j| j.reports.iter()).collect();
    assert_eq!(in_jobs.len(), reports.len());
    for (got, want) in in_jobs.iter().zip(&reports) {
        assert_eq!(
            (got.report_id, got.time, &got.encoded),
            (want.report_id, want.time, &want.encoded)
        );
    }
    let job_ids: HashSet<AggregationJobId> = jobs.iter().map(|j| j.job_id).collect();
    assert_eq!(job_ids.len(), 3);

    // The first lease runs out and the job is taken again: the old lease is stale.
    let a2 = acquire(leader, t.id, now + 100, 10).await;
    assert_eq!(a2.len(), 1);
    let a2 = a2[0].clone();
    assert_eq!(
        (a2.job_id, a2.lease.attempts, &a2.reports),
        (a.job_id, 2, &a.reports)
    );
    assert_ne!(a2.lease.token, a.lease.token);
    let da = delta(t.id, T0, 100, &ids(&a));
    let lost = leader
        .finish_aggregation_job(&a, std::slice::from_ref(&da), &add_shares)
        .await;
    assert!(matches!(lost, Err(StoreError::LeaseLost)));
    assert!(matches!(
        leader.release_aggregation_job(&a, Time(now)).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        leader.abandon_aggregation_job(&a).await,
        Err(StoreError::LeaseLost)
    ));
    let no_rows = leader
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
        .await
        .expect("get");
    assert!(no_rows.is_empty(), "a refused finish must not merge");

    // Finishing merges (inserting the first row) and counts the job's reports as aggregated.
    leader
        .finish_aggregation_job(&a2, std::slice::from_ref(&da), &add_shares)
        .await
        .expect("finish_aggregation_job");
    let stored = leader
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
        .await
        .expect("get");
    assert_eq!(stored, vec![da.clone()]);
    assert_eq!(
        unaggregated(leader, t.id, T0, PRECISION).await,
        10 - a.reports.len() as u64
    );
    let again = leader
        .finish_aggregation_job(&a2, std::slice::from_ref(&da), &add_shares)
        .await;
    assert!(
        matches!(again, Err(StoreError::LeaseLost)),
        "a finished job cannot finish twice"
    );

    // Release: runnable again only at the retry time. Meanwhile the other lease ran out.
    let (b, c) = (rest[0].clone(), rest[1].clone());
    leader
        .release_aggregation_job(&b, Time(now + 1000))
        .await
        .expect("release_aggregation_job");
    assert!(matches!(
        leader.release_aggregation_job(&b, Time(now)).await,
        Err(StoreError::LeaseLost)
    ));
    let c2 = acquire(leader, t.id, now + 500, 10).await;
    assert_eq!(
        c2.iter()
            .map(|j| (j.job_id, j.lease.attempts))
            .collect::<Vec<_>>(),
        vec![(c.job_id, 2)]
    );

    // Abandon: the job's reports count as aggregated (dropped) and the job never runs again.
    leader
        .abandon_aggregation_job(&c2[0])
        .await
        .expect("abandon_aggregation_job");
    let pending = 10 - (a.reports.len() + c.reports.len()) as u64;
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, pending);
    assert!(acquire(leader, t.id, now + 999, 10).await.is_empty());
    let b2 = acquire(leader, t.id, now + 1000, 10).await;
    assert_eq!(
        b2.iter()
            .map(|j| (j.job_id, j.lease.attempts))
            .collect::<Vec<_>>(),
        vec![(b.job_id, 2)]
    );

    // Merging into a stored bucket adds shares and counts and XORs checksums; a new bucket is
    // inserted.
    let db = delta(t.id, T0, 7, &ids(&b));
    let extra_id = ReportId::random();
    let dnext = delta(t.id, T0 + PRECISION, 5, &[extra_id]);
    leader
        .finish_aggregation_job(&b2[0], &[db, dnext.clone()], &add_shares)
        .await
        .expect("finish");
    let stored = leader
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
        .await
        .expect("get");
    let ab_ids: Vec<ReportId> = ids(&a).into_iter().chain(ids(&b)).collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(share_value(&stored[0].aggregate_share), 107);
    assert_eq!(stored[0].report_count, ab_ids.len() as u64);
    assert_eq!(stored[0].checksum, checksum(&ab_ids));
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, 0);

    // Buckets are returned when they lie inside the interval, for the given parameter only.
    let both = leader
        .get_batch_aggregations(&t.id, &interval(T0, 2 * PRECISION), &[])
        .await
        .expect("get");
    assert_eq!(both.len(), 2);
    let later = leader
        .get_batch_aggregations(&t.id, &interval(T0 + 1, 2 * PRECISION), &[])
        .await
        .expect("get");
    assert_eq!(later, vec![dnext]);
    let partial = leader
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION + 1), &[])
        .await
        .expect("get");
    assert_eq!(partial.len(), 1);
    let other_param = leader
        .get_batch_aggregations(&t.id, &interval(T0, 2 * PRECISION), &[1])
        .await
        .expect("get");
    assert!(other_param.is_empty());
    let helper_view = helper
        .get_batch_aggregations(&t.id, &interval(T0, 2 * PRECISION), &[])
        .await
        .expect("get");
    assert!(helper_view.is_empty(), "batch aggregations are per role");

    // Aggregated reports keep protecting against replays: a replay is never counted as
    // unaggregated once jobs are created, and makes no new job.
    assert!(acquire(leader, t.id, now + 100_000, 10).await.is_empty());
    leader.put_reports(&reports).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 4, now).await, 0);
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, 0);

    // A job never mixes tasks.
    let u = task(TaskId::random());
    leader.put_task(&u).await.expect("put_task");
    let mixed = [report(t.id, T0), report(u.id, T0), report(t.id, T0 + 1)];
    leader.put_reports(&mixed).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 10, now).await, 2);
    let all = leader
        .acquire_aggregation_jobs(Time(now + 200_000), 100, 100)
        .await
        .expect("acquire");
    let mut sizes: Vec<(bool, usize)> = all
        .iter()
        .filter(|j| j.task_id == t.id || j.task_id == u.id)
        .map(|j| (j.task_id == t.id, j.reports.len()))
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![(false, 1), (true, 2)]);
    for j in all.iter().filter(|j| j.task_id == u.id) {
        assert_eq!(j.reports[0].report_id, mixed[1].report_id);
    }
    assert_eq!(create_jobs(leader, 0, now).await, 0);

    for id in [t.id, u.id] {
        assert!(leader.delete_task(&id).await.expect("delete_task"));
    }
}

/// Deleting a Leader task removes its reports, jobs, collection jobs and aggregations, and
/// leaves the Helper's rows of the same task ID alone.
pub async fn check_leader_delete_task(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    helper.put_task(&t).await.expect("helper put_task");
    let reports: Vec<NewReport> = (0..6).map(|i| report(t.id, T0 + i)).collect();
    leader.put_reports(&reports).await.expect("put_reports");
    create_jobs(leader, 3, T0).await;
    let jobs = acquire(leader, t.id, T0, 10).await;
    assert_eq!(jobs.len(), 2);
    let d = delta(t.id, T0, 3, &ids(&jobs[0]));
    leader
        .finish_aggregation_job(&jobs[0], std::slice::from_ref(&d), &add_shares)
        .await
        .expect("finish");
    let cj = CollectionJob {
        task_id: t.id,
        id: CollectionJobId::random(),
        batch_interval: interval(T0, PRECISION),
        aggregation_parameter: Vec::new(),
        state: CollectionJobState::Start,
    };
    leader
        .put_collection_job(&cj)
        .await
        .expect("put_collection_job");
    let hj = HelperAggregationJob {
        task_id: t.id,
        id: AggregationJobId::random(),
        request_hash: [1; 32],
        step: 0,
        response: vec![1, 2, 3],
    };
    let hd = delta(t.id, T0, 9, &ids(&jobs[0]));
    helper
        .put_helper_aggregation_job(&hj, &ids(&jobs[0]), std::slice::from_ref(&hd), &add_shares)
        .await
        .expect("put");

    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
    assert_eq!(leader.get_task(&t.id).await.expect("get_task"), None);
    assert_eq!(unaggregated(leader, t.id, T0, PRECISION).await, 0);
    assert!(acquire(leader, t.id, T0 + 1000, 10).await.is_empty());
    assert_eq!(
        leader
            .get_collection_job(&t.id, &cj.id)
            .await
            .expect("get_collection_job"),
        None
    );
    assert!(leader
        .collection_job_batches(&t.id, &duet_messages::dap09::Interval::ALL_TIME)
        .await
        .expect("collection_job_batches")
        .is_empty());
    let left = leader
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
        .await
        .expect("get");
    assert!(left.is_empty());
    // A lease on a job of the deleted task is gone with it.
    let lost = leader
        .finish_aggregation_job(&jobs[1], &[], &add_shares)
        .await;
    assert!(matches!(lost, Err(StoreError::LeaseLost)));
    // The task added again takes new reports into new jobs.
    leader.put_task(&t).await.expect("put_task again");
    let again: Vec<NewReport> = (0..2).map(|i| report(t.id, T0 + i)).collect();
    leader.put_reports(&again).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 3, T0).await, 1);
    let jobs = acquire(leader, t.id, T0, 10).await;
    assert_eq!(jobs.len(), 1);
    let mut got = ids(&jobs[0]);
    got.sort_unstable_by_key(|id| id.0);
    let mut want: Vec<ReportId> = again.iter().map(|r| r.report_id).collect();
    want.sort_unstable_by_key(|id| id.0);
    assert_eq!(got, want);
    assert!(leader.delete_task(&t.id).await.expect("delete_task again"));

    assert_eq!(
        helper.get_task(&t.id).await.expect("get_task"),
        Some(t.clone())
    );
    let kept = helper
        .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
        .await
        .expect("get");
    assert_eq!(kept, vec![hd]);
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &hj.id)
            .await
            .expect("get"),
        Some(hj)
    );
    assert!(helper.delete_task(&t.id).await.expect("helper delete_task"));
}
