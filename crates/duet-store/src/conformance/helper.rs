//! Checks of the Helper's aggregation jobs, report IDs and aggregate-share jobs.

use std::collections::HashSet;

use duet_messages::dap09::{AggregationJobId, Duration, Interval, ReportId, TaskId, Time};

use super::{
    add_shares, checksum, ciphertext, create_jobs, delta, interval, share_value, task, PRECISION,
    T0,
};
use crate::{AggregateShareJob, Datastore, HelperAggregationJob, StoreError};

fn helper_job(task_id: TaskId, tag: u8) -> HelperAggregationJob {
    HelperAggregationJob {
        task_id,
        id: AggregationJobId::random(),
        request_hash: [tag; 32],
        step: 1,
        response: vec![tag; 40],
    }
}

fn random_ids(n: usize) -> Vec<ReportId> {
    (0..n).map(|_| ReportId::random()).collect()
}

/// Helper aggregation jobs: stored with their report IDs and merged deltas in one transaction;
/// a repeated job ID or report ID is a `Conflict` that leaves nothing behind.
pub async fn check_helper_aggregation_jobs(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    let job = helper_job(t.id, 1);
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &job.id)
            .await
            .expect("get"),
        None
    );
    // More IDs than fit in one statement.
    let ids = random_ids(1200);
    let d = delta(t.id, T0, 40, &ids);
    helper
        .put_helper_aggregation_job(&job, &ids, std::slice::from_ref(&d), &add_shares)
        .await
        .expect("put");
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &job.id)
            .await
            .expect("get"),
        Some(job.clone())
    );
    let bucket = interval(T0, PRECISION);
    assert_eq!(
        helper
            .get_batch_aggregations(&t.id, &bucket, &[])
            .await
            .expect("get"),
        vec![d.clone()]
    );
    assert!(leader
        .get_batch_aggregations(&t.id, &bucket, &[])
        .await
        .expect("get")
        .is_empty());

    // seen_report_ids: exactly the stored ones, per task.
    let unseen = random_ids(5);
    let mut query: Vec<ReportId> = unseen.clone();
    query.extend_from_slice(&ids);
    let seen = helper
        .seen_report_ids(&t.id, &query)
        .await
        .expect("seen_report_ids");
    assert_eq!(seen, ids.iter().copied().collect::<HashSet<_>>());
    assert!(helper
        .seen_report_ids(&t.id, &[])
        .await
        .expect("seen_report_ids")
        .is_empty());
    let other = TaskId::random();
    assert!(helper
        .seen_report_ids(&other, &ids)
        .await
        .expect("seen_report_ids")
        .is_empty());

    // The same job ID again: Conflict, nothing stored.
    let mut same_id = helper_job(t.id, 2);
    same_id.id = job.id;
    let fresh = random_ids(3);
    let d2 = delta(t.id, T0, 5, &fresh);
    let conflict = helper
        .put_helper_aggregation_job(&same_id, &fresh, std::slice::from_ref(&d2), &add_shares)
        .await;
    assert!(matches!(conflict, Err(StoreError::Conflict)));
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &job.id)
            .await
            .expect("get"),
        Some(job.clone())
    );
    assert!(helper
        .seen_report_ids(&t.id, &fresh)
        .await
        .expect("seen_report_ids")
        .is_empty());
    assert_eq!(
        helper
            .get_batch_aggregations(&t.id, &bucket, &[])
            .await
            .expect("get"),
        vec![d.clone()]
    );

    // A new job replaying one report ID (last, after the fresh ones): Conflict, full rollback.
    let replaying = helper_job(t.id, 3);
    let mut replay_ids = fresh.clone();
    replay_ids.push(ids[700]);
    let d3 = delta(t.id, T0 + PRECISION, 6, &replay_ids);
    let conflict = helper
        .put_helper_aggregation_job(&replaying, &replay_ids, &[d.clone(), d3], &add_shares)
        .await;
    assert!(matches!(conflict, Err(StoreError::Conflict)));
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &replaying.id)
            .await
            .expect("get"),
        None
    );
    assert!(helper
        .seen_report_ids(&t.id, &fresh)
        .await
        .expect("seen_report_ids")
        .is_empty());
    let two_buckets = interval(T0, 2 * PRECISION);
    assert_eq!(
        helper
            .get_batch_aggregations(&t.id, &two_buckets, &[])
            .await
            .expect("get"),
        vec![d.clone()]
    );

    // The same report ID twice within one job is a replay too.
    let doubled = helper_job(t.id, 4);
    let twice = [fresh[0], fresh[0]];
    let conflict = helper
        .put_helper_aggregation_job(&doubled, &twice, &[], &add_shares)
        .await;
    assert!(matches!(conflict, Err(StoreError::Conflict)));
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &doubled.id)
            .await
            .expect("get"),
        None
    );

    // A good second job merges into the bucket.
    let second = helper_job(t.id, 5);
    helper
        .put_helper_aggregation_job(&second, &fresh, &[d2], &add_shares)
        .await
        .expect("put");
    let merged = helper
        .get_batch_aggregations(&t.id, &bucket, &[])
        .await
        .expect("get");
    let all_ids: Vec<ReportId> = ids.iter().chain(&fresh).copied().collect();
    assert_eq!(merged.len(), 1);
    assert_eq!(share_value(&merged[0].aggregate_share), 45);
    assert_eq!(merged[0].report_count, all_ids.len() as u64);
    assert_eq!(merged[0].checksum, checksum(&all_ids));
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &second.id)
            .await
            .expect("get"),
        Some(second)
    );

    // Job IDs are per task.
    let u = task(TaskId::random());
    helper.put_task(&u).await.expect("put_task");
    let mut elsewhere = helper_job(u.id, 6);
    elsewhere.id = job.id;
    helper
        .put_helper_aggregation_job(&elsewhere, &ids[..3], &[], &add_shares)
        .await
        .expect("put");

    for id in [t.id, u.id] {
        assert!(helper.delete_task(&id).await.expect("delete_task"));
    }
}

/// A share of the one-bucket batch at `start`, which holds `report_count` reports.
fn share_job(task_id: TaskId, start: u64, tag: u8, report_count: u64) -> AggregateShareJob {
    AggregateShareJob {
        task_id,
        batch_interval: interval(start, PRECISION),
        aggregation_parameter: Vec::new(),
        report_count,
        checksum: checksum(&random_ids(2)),
        encrypted_aggregate_share: ciphertext(tag),
    }
}

/// Aggregate-share jobs: keyed by batch and parameter; an identical re-put succeeds, a different
/// one is `AlreadyExists`; the Helper's collected intervals are theirs.
pub async fn check_aggregate_share_jobs(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    leader.put_task(&t).await.expect("put_task");
    let job = share_job(t.id, T0, 1, 0);
    let batch = job.batch_interval;
    assert_eq!(
        helper
            .get_aggregate_share_job(&t.id, &batch, &[])
            .await
            .expect("get"),
        None
    );
    helper
        .put_aggregate_share_job(&job)
        .await
        .expect("put_aggregate_share_job");
    helper
        .put_aggregate_share_job(&job)
        .await
        .expect("identical re-put");
    let mut different = job.clone();
    different.encrypted_aggregate_share = ciphertext(9);
    assert!(matches!(
        helper.put_aggregate_share_job(&different).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(
        helper
            .get_aggregate_share_job(&t.id, &batch, &[])
            .await
            .expect("get"),
        Some(job.clone())
    );
    assert_eq!(
        helper
            .get_aggregate_share_job(&t.id, &batch, &[7])
            .await
            .expect("get"),
        None
    );
    let longer = interval(T0, 2 * PRECISION);
    assert_eq!(
        helper
            .get_aggregate_share_job(&t.id, &longer, &[])
            .await
            .expect("get"),
        None
    );

    // Another parameter for the same batch is another job.
    let mut with_param = share_job(t.id, T0, 2, 0);
    with_param.aggregation_parameter = vec![7];
    helper
        .put_aggregate_share_job(&with_param)
        .await
        .expect("put_aggregate_share_job");
    let later = share_job(t.id, T0 + PRECISION, 3, 0);
    helper
        .put_aggregate_share_job(&later)
        .await
        .expect("put_aggregate_share_job");
    let listed = helper
        .list_aggregate_share_jobs(&t.id, &Interval::ALL_TIME)
        .await
        .expect("list_aggregate_share_jobs");
    assert_eq!(listed.len(), 3);
    for j in [&job, &with_param, &later] {
        assert!(listed.contains(j));
    }
    assert!(helper
        .list_aggregate_share_jobs(&TaskId::random(), &Interval::ALL_TIME)
        .await
        .expect("list")
        .is_empty());

    // Collected intervals per role: the Helper's come from aggregate-share jobs only.
    let mut collected = helper
        .collected_intervals(&t.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals");
    collected.sort();
    collected.dedup();
    assert_eq!(collected, vec![batch, later.batch_interval]);
    assert!(leader
        .collected_intervals(&t.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals")
        .is_empty());

    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
}

/// A served batch is final, whatever the interleaving of requests: a share is recorded for no
/// batch that overlaps a served one, and for none whose aggregations changed since the share was
/// computed (`Conflict`, to compute it again); no aggregation job merges into a served batch
/// (`Conflict`, leaving nothing behind, to prepare its reports again).
pub async fn check_served_batches_are_final(helper: &dyn Datastore) {
    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    let ids = random_ids(3);
    helper
        .put_helper_aggregation_job(
            &helper_job(t.id, 1),
            &ids,
            &[delta(t.id, T0, 3, &ids)],
            &add_shares,
        )
        .await
        .expect("put");
    // Computed before a job added a report: its count is no longer the batch's.
    assert!(matches!(
        helper
            .put_aggregate_share_job(&share_job(t.id, T0, 1, 2))
            .await,
        Err(StoreError::Conflict)
    ));
    let served = share_job(t.id, T0, 1, 3);
    helper
        .put_aggregate_share_job(&served)
        .await
        .expect("put_aggregate_share_job");
    let mut overlapping = share_job(t.id, T0, 2, 3);
    overlapping.batch_interval = interval(T0, 2 * PRECISION);
    assert!(matches!(
        helper.put_aggregate_share_job(&overlapping).await,
        Err(StoreError::BatchOverlap)
    ));
    // A job that read the collected batches before the share was served.
    let late = helper_job(t.id, 2);
    let late_ids = random_ids(2);
    let into_served = [
        delta(t.id, T0 + 2 * PRECISION, 1, &late_ids[..1]),
        delta(t.id, T0, 1, &late_ids[1..]),
    ];
    assert!(matches!(
        helper
            .put_helper_aggregation_job(&late, &late_ids, &into_served, &add_shares)
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        helper
            .get_batch_aggregations(&t.id, &interval(T0, 3 * PRECISION), &[])
            .await
            .expect("get"),
        vec![delta(t.id, T0, 3, &ids)],
        "nothing of the refused job merged"
    );
    // Prepared again: the report in the served batch is rejected, the other merged.
    helper
        .put_helper_aggregation_job(&late, &late_ids[..1], &into_served[..1], &add_shares)
        .await
        .expect("put again");
    assert_eq!(
        helper
            .get_aggregate_share_job(&t.id, &served.batch_interval, &[])
            .await
            .expect("get"),
        Some(served)
    );
    let later = interval(T0 + 2 * PRECISION, PRECISION);
    let mut later_share = share_job(t.id, T0 + 2 * PRECISION, 3, 1);
    later_share.batch_interval = later;
    helper
        .put_aggregate_share_job(&later_share)
        .await
        .expect("a batch that overlaps none");
    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
}

/// The Helper's served batches are read by the times they overlap: `collected_intervals` and
/// `list_aggregate_share_jobs` return exactly the batches that share a second with the window
/// (half-open at both ends), a batch whose end lies past the largest stored time included, and
/// the checks inside the writes see the batches their own times overlap.
pub async fn check_served_batches_by_time(helper: &dyn Datastore) {
    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    let first = share_job(t.id, T0, 1, 0);
    let mut with_param = share_job(t.id, T0, 2, 0);
    with_param.aggregation_parameter = vec![7];
    let mut second = share_job(t.id, T0 + 2 * PRECISION, 3, 0);
    second.batch_interval = interval(T0 + 2 * PRECISION, 2 * PRECISION);
    // Ends past `i64::MAX` seconds: stored, and found, all the same.
    let mut open_ended = share_job(t.id, T0 + 10 * PRECISION, 4, 0);
    open_ended.batch_interval.duration = Duration(i64::MAX as u64);
    for j in [&first, &with_param, &second, &open_ended] {
        helper
            .put_aggregate_share_job(j)
            .await
            .expect("put_aggregate_share_job");
    }
    let a = first.batch_interval;
    let b = second.batch_interval;
    let c = open_ended.batch_interval;
    let at = |start: u64, duration: u64| Interval {
        start: Time(start),
        duration: Duration(duration),
    };
    for (within, expected) in [
        (at(T0 + PRECISION, PRECISION), vec![]),
        (at(T0 - PRECISION, PRECISION), vec![]),
        (at(T0 + 9 * PRECISION, PRECISION), vec![]),
        (at(T0, 1), vec![a]),
        (at(T0 + PRECISION - 1, 2), vec![a]),
        (at(T0 + 3 * PRECISION, PRECISION), vec![b]),
        (at(T0, 3 * PRECISION), vec![a, b]),
        (at(T0 + 1000 * PRECISION, 1), vec![c]),
        (at(T0 + PRECISION, 0), vec![]),
        (Interval::ALL_TIME, vec![a, b, c]),
    ] {
        assert_eq!(
            helper
                .collected_intervals(&t.id, &within)
                .await
                .expect("collected_intervals"),
            expected,
            "collected within {within:?}"
        );
    }
    assert_eq!(
        helper
            .list_aggregate_share_jobs(&t.id, &at(T0 - PRECISION, 2 * PRECISION))
            .await
            .expect("list_aggregate_share_jobs"),
        vec![first, with_param]
    );
    assert!(helper
        .list_aggregate_share_jobs(&t.id, &at(T0 + PRECISION, PRECISION))
        .await
        .expect("list_aggregate_share_jobs")
        .is_empty());
    // The writes' own checks find the batches near their times.
    let mut overlapping = share_job(t.id, T0 + 3 * PRECISION, 5, 0);
    overlapping.batch_interval = interval(T0 + 3 * PRECISION, 2 * PRECISION);
    assert!(matches!(
        helper.put_aggregate_share_job(&overlapping).await,
        Err(StoreError::BatchOverlap)
    ));
    let ids = random_ids(2);
    let deltas = [
        delta(t.id, T0 + PRECISION, 1, &ids[..1]),
        delta(t.id, T0 + 500 * PRECISION, 1, &ids[1..]),
    ];
    assert!(matches!(
        helper
            .put_helper_aggregation_job(&helper_job(t.id, 6), &ids, &deltas, &add_shares)
            .await,
        Err(StoreError::Conflict)
    ));
    helper
        .put_helper_aggregation_job(&helper_job(t.id, 7), &ids[..1], &deltas[..1], &add_shares)
        .await
        .expect("a job between served batches");
    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
}

/// Helper aggregation jobs older than a retention are deleted, oldest first and at most `limit`
/// at a time; younger ones, and what the deleted jobs aggregated, stay.
pub async fn check_old_helper_jobs_are_deleted(helper: &dyn Datastore) {
    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    let jobs: Vec<HelperAggregationJob> = (0..3).map(|i| helper_job(t.id, i)).collect();
    let mut ids = Vec::new();
    for job in &jobs {
        let id = random_ids(1);
        helper
            .put_helper_aggregation_job(job, &id, &[delta(t.id, T0, 1, &id)], &add_shares)
            .await
            .expect("put");
        ids.extend(id);
    }
    let stored = |job: &HelperAggregationJob| {
        let job = job.clone();
        async move {
            helper
                .get_helper_aggregation_job(&job.task_id, &job.id)
                .await
                .expect("get")
                .is_some()
        }
    };
    // Nothing is an hour old.
    assert_eq!(
        helper
            .delete_old_helper_aggregation_jobs(3600, 10)
            .await
            .expect("delete"),
        0
    );
    assert!(stored(&jobs[0]).await);
    // Once the clock has moved on a second, all of them are older than 0 s: two at a time.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        helper
            .delete_old_helper_aggregation_jobs(0, 2)
            .await
            .expect("delete"),
        2
    );
    assert_eq!(
        helper
            .delete_old_helper_aggregation_jobs(0, 2)
            .await
            .expect("delete"),
        1
    );
    for job in &jobs {
        assert!(!stored(job).await);
    }
    // Their reports stay aggregated and their IDs replays.
    assert_eq!(
        helper
            .get_batch_aggregations(&t.id, &interval(T0, PRECISION), &[])
            .await
            .expect("get")
            .iter()
            .map(|a| a.report_count)
            .sum::<u64>(),
        3
    );
    assert_eq!(
        helper
            .seen_report_ids(&t.id, &ids)
            .await
            .expect("seen")
            .len(),
        3
    );
    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
}

/// A batch's bucket aggregations summed by the store: shares added with the merge function,
/// counts added, checksums combined, and the buckets holding reports spanned; an interval with
/// no bucket sums to nothing; a merge that fails fails the sum; the other role's rows are not
/// counted.
pub async fn check_batch_sums(leader: &dyn Datastore, helper: &dyn Datastore) {
    use crate::BatchSum;

    let t = task(TaskId::random());
    helper.put_task(&t).await.expect("put_task");
    let ids = random_ids(6);
    let deltas = [
        delta(t.id, T0, 3, &ids[..1]),
        delta(t.id, T0 + 2 * PRECISION, 5, &ids[1..3]),
        delta(t.id, T0 + 5 * PRECISION, 7, &ids[3..]),
    ];
    helper
        .put_helper_aggregation_job(&helper_job(t.id, 1), &ids, &deltas, &add_shares)
        .await
        .expect("put");
    let sum = |within: Interval| async move {
        helper
            .sum_batch_aggregations(&t.id, &within, &[], &add_shares)
            .await
            .expect("sum")
    };
    let first_three = sum(interval(T0, 3 * PRECISION)).await;
    assert_eq!(
        share_value(first_three.aggregate_share.as_deref().expect("a share")),
        8
    );
    assert_eq!(
        (
            first_three.report_count,
            first_three.checksum,
            first_three.spanned
        ),
        (3, checksum(&ids[..3]), Some(interval(T0, 3 * PRECISION)))
    );
    let all = sum(interval(T0 - PRECISION, 8 * PRECISION)).await;
    assert_eq!(
        share_value(all.aggregate_share.as_deref().expect("a share")),
        15
    );
    assert_eq!(
        (all.report_count, all.checksum, all.spanned),
        (6, checksum(&ids), Some(interval(T0, 6 * PRECISION)))
    );
    // One bucket: its own row.
    let last = sum(interval(T0 + 5 * PRECISION, PRECISION)).await;
    assert_eq!(
        last.aggregate_share,
        Some(deltas[2].aggregate_share.clone())
    );
    assert_eq!(
        sum(interval(T0 + 3 * PRECISION, 2 * PRECISION)).await,
        BatchSum::default()
    );
    let failing = |_: &[u8], _: &[u8]| Err::<Vec<u8>, _>("no".to_string());
    assert!(matches!(
        helper
            .sum_batch_aggregations(&t.id, &interval(T0, 3 * PRECISION), &[], &failing)
            .await,
        Err(StoreError::Merge(_))
    ));
    assert_eq!(
        leader
            .sum_batch_aggregations(&t.id, &interval(T0, 8 * PRECISION), &[], &add_shares)
            .await
            .expect("sum"),
        BatchSum::default(),
        "the Leader's role has no rows of this task"
    );
    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
}

/// Deleting a Helper task removes its jobs, report IDs, aggregate shares and aggregations, and
/// leaves the Leader's rows of the same task ID alone.
pub async fn check_helper_delete_task(leader: &dyn Datastore, helper: &dyn Datastore) {
    let t = task(TaskId::random());
    leader.put_task(&t).await.expect("put_task");
    helper.put_task(&t).await.expect("put_task");
    let ids = random_ids(4);
    let job = helper_job(t.id, 1);
    let d = delta(t.id, T0, 4, &ids);
    helper
        .put_helper_aggregation_job(&job, &ids, &[d], &add_shares)
        .await
        .expect("put");
    helper
        .put_aggregate_share_job(&share_job(t.id, T0, 1, 4))
        .await
        .expect("put_aggregate_share_job");
    let report = super::report(t.id, T0);
    leader
        .put_reports(std::slice::from_ref(&report))
        .await
        .expect("put_reports");

    assert!(helper.delete_task(&t.id).await.expect("delete_task"));
    assert_eq!(helper.get_task(&t.id).await.expect("get_task"), None);
    assert_eq!(
        helper
            .get_helper_aggregation_job(&t.id, &job.id)
            .await
            .expect("get"),
        None
    );
    assert!(helper
        .seen_report_ids(&t.id, &ids)
        .await
        .expect("seen_report_ids")
        .is_empty());
    assert!(helper
        .list_aggregate_share_jobs(&t.id, &Interval::ALL_TIME)
        .await
        .expect("list")
        .is_empty());
    assert!(helper
        .collected_intervals(&t.id, &Interval::ALL_TIME)
        .await
        .expect("collected_intervals")
        .is_empty());
    let bucket = interval(T0, PRECISION);
    assert!(helper
        .get_batch_aggregations(&t.id, &bucket, &[])
        .await
        .expect("get")
        .is_empty());

    assert_eq!(
        leader.get_task(&t.id).await.expect("get_task"),
        Some(t.clone())
    );
    // The Leader's report is still there: uploaded again, it is a replay.
    leader.put_reports(&[report]).await.expect("put_reports");
    assert_eq!(create_jobs(leader, 10, T0).await, 1);
    let pending = leader
        .count_unaggregated_reports(&t.id, &bucket)
        .await
        .expect("count_unaggregated_reports");
    assert_eq!(pending, 1);
    assert!(leader.delete_task(&t.id).await.expect("delete_task"));
}
