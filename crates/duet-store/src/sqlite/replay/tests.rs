//! Replay sets across processes, merges and task deletion.

use duet_core::AggregatorRole;
use duet_messages::dap09::{AggregationJobId, Time};

use super::*;
use crate::sqlite::SqliteDatastore;
use crate::{Datastore, HelperAggregationJob, NewReport};

/// A handle with its own memory sets on the file in `dir`, as a process would have, merging
/// every `merge_at` IDs in `slices` transactions.
async fn process(dir: &tempfile::TempDir, merge_at: i64, slices: i64) -> SqliteDatastore {
    let path = dir.path().join("duet.sqlite");
    let store = SqliteDatastore::connect(path.to_str().expect("UTF-8 path"))
        .await
        .expect("connect");
    store.replay.leader.set_merge(merge_at, slices);
    store.replay.helper.set_merge(merge_at, slices);
    store
}

async fn two_processes(
    dir: &tempfile::TempDir,
    merge_at: i64,
) -> (SqliteDatastore, SqliteDatastore) {
    (
        process(dir, merge_at, 1).await,
        process(dir, merge_at, 1).await,
    )
}

async fn log_state(store: &SqliteDatastore, log: &ReplayLog) -> (i64, i64, i64) {
    let row = sqlx::query(&format!(
        "SELECT (SELECT COUNT(*) FROM {}) AS logged, (SELECT COUNT(*) FROM {}) AS merged, \
         (SELECT generation FROM replay_logs WHERE name = ?) AS generation",
        log.log, log.table
    ))
    .bind(log.name)
    .fetch_one(&store.pool)
    .await
    .expect("log state");
    (
        col(&row, "logged").expect("logged"),
        col(&row, "merged").expect("merged"),
        col(&row, "generation").expect("generation"),
    )
}

/// Uploads `reports` through `store` and creates jobs from them: the number of jobs created.
async fn put_and_claim(store: &SqliteDatastore, reports: &[NewReport]) -> usize {
    store.put_reports(reports).await.expect("put_reports");
    store
        .create_aggregation_jobs(100, Time(2000))
        .await
        .expect("claim")
}

/// The Leader's job creators in two processes drop every replay, whether its first upload
/// is in the log the other process wrote or already merged into the sorted table, and keep
/// each report's first upload.
#[tokio::test]
async fn leader_replays_across_processes_and_merges() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (a, b) = two_processes(&dir, 4).await;
    let task_id = TaskId::random();
    let ids: Vec<ReportId> = (0..5).map(|_| ReportId::random()).collect();
    let report = |i: usize, payload: u8| NewReport {
        task_id,
        report_id: ids[i],
        time: Time(1000),
        encoded: vec![payload],
    };
    let mut jobs = 0;

    jobs += put_and_claim(&a, &[report(0, 0), report(1, 1), report(2, 2)]).await;
    assert_eq!(log_state(&a, &a.replay.leader).await, (3, 0, 0));

    // B has never read the log: it must find report 0 there. Its new ID fills the log,
    // which B merges.
    jobs += put_and_claim(&b, &[report(0, 9), report(3, 3)]).await;
    assert_eq!(log_state(&b, &b.replay.leader).await, (0, 4, 1));

    // A's memory set is of the old generation: replays of IDs merged since are found in the
    // sorted table, and repeats within one claim keep the first.
    jobs += put_and_claim(
        &a,
        &[report(3, 9), report(1, 9), report(4, 4), report(4, 9)],
    )
    .await;
    assert_eq!(log_state(&a, &a.replay.leader).await, (1, 4, 1));
    // And B, which merged, finds the one logged since.
    assert_eq!(put_and_claim(&b, &[report(4, 9)]).await, 0);

    assert_eq!(jobs, 3);
    let got = crate::sqlite::leader::acquired_reports(&a, Time(2000)).await;
    let mut want: Vec<(ReportId, Vec<u8>)> =
        ids.iter().zip(0..).map(|(id, p)| (*id, vec![p])).collect();
    want.sort_by_key(|(id, _)| id.0);
    assert_eq!(got, want);

    // Deleting the task empties its log rows and bumps the generation.
    // No task row was stored: only the IDs go.
    a.delete_task(&task_id).await.expect("delete_task");
    assert_eq!(log_state(&a, &a.replay.leader).await, (0, 0, 2));
    // The merged IDs went too: a task created again under the same ID takes them all in anew,
    // through either process.
    let again: Vec<NewReport> = (0..5).map(|i| report(i, 7)).collect();
    assert_eq!(put_and_claim(&b, &again).await, 1);
    // Another task's replay set is its own, in the log and in the sorted table.
    let other = TaskId::random();
    let elsewhere: Vec<NewReport> = (0..5)
        .map(|i| NewReport {
            task_id: other,
            ..report(i, 8)
        })
        .collect();
    assert_eq!(put_and_claim(&a, &elsewhere).await, 1);
    a.close().await;
    b.close().await;
}

fn helper_job(task_id: TaskId) -> HelperAggregationJob {
    HelperAggregationJob {
        task_id,
        id: AggregationJobId::random(),
        request_hash: [1; 32],
        step: 1,
        response: vec![1],
    }
}

fn no_merge(_: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
    Err("no aggregates in this test".into())
}

/// Stores a Helper aggregation job of these report IDs (and no aggregates) for the task.
async fn put(
    store: &SqliteDatastore,
    task_id: TaskId,
    ids: Vec<ReportId>,
) -> Result<(), StoreError> {
    store
        .put_helper_aggregation_job(&helper_job(task_id), &ids, &[], &no_merge)
        .await
}

/// Helpers in two processes turn away a report ID the other one took in, from its log or
/// after a merge; `seen_report_ids` knows the IDs once a write has read the log.
#[tokio::test]
async fn helper_replays_across_processes_and_merges() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (a, b) = two_processes(&dir, 4).await;
    let (a, b) = (
        a.with_role(AggregatorRole::Helper),
        b.with_role(AggregatorRole::Helper),
    );
    let task_id = TaskId::random();
    let ids: Vec<ReportId> = (0..5).map(|_| ReportId::random()).collect();

    put(&a, task_id, ids[0..2].to_vec()).await.expect("put");
    assert_eq!(
        seen(&a, task_id, &ids).await,
        ids[0..2].iter().copied().collect()
    );
    assert!(matches!(
        put(&b, task_id, vec![ids[1], ids[2]]).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        seen(&b, task_id, &ids).await,
        ids[0..2].iter().copied().collect()
    );
    // Fills the log; B merges it.
    put(&b, task_id, ids[2..4].to_vec()).await.expect("put");
    assert_eq!(log_state(&b, &b.replay.helper).await, (0, 4, 1));
    assert_eq!(
        seen(&a, task_id, &ids).await,
        ids[0..4].iter().copied().collect()
    );
    assert!(matches!(
        put(&a, task_id, vec![ids[4], ids[3]]).await,
        Err(StoreError::Conflict)
    ));
    put(&a, task_id, vec![ids[4]]).await.expect("put");
    assert_eq!(log_state(&a, &a.replay.helper).await, (1, 4, 1));
    assert_eq!(
        seen(&b, task_id, &ids).await.len(),
        4,
        "B has not read the log since A's write: the fifth is caught at write time"
    );
    assert!(matches!(
        put(&b, task_id, vec![ids[4]]).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(seen(&b, task_id, &ids).await.len(), 5);

    // No task row was stored: only the IDs go.
    a.delete_task(&task_id).await.expect("delete_task");
    assert!(seen(&a, task_id, &ids).await.is_empty());
    assert_eq!(log_state(&a, &a.replay.helper).await, (0, 0, 2));
    a.close().await;
    b.close().await;
}

/// The IDs among `ids` that `store` knows for `task_id`.
async fn seen(store: &SqliteDatastore, task_id: TaskId, ids: &[ReportId]) -> HashSet<ReportId> {
    store
        .seen_report_ids(&task_id, ids)
        .await
        .expect("seen_report_ids")
}

/// Asserts that `store` turns away each of `ids` as a replay.
async fn all_known(store: &SqliteDatastore, task_id: TaskId, ids: Vec<ReportId>) {
    for id in ids {
        assert!(
            matches!(
                put(store, task_id, vec![id]).await,
                Err(StoreError::Conflict)
            ),
            "{id:?} is a replay"
        );
    }
}

/// A merge spread over two transactions moves one half of the key space in each, and IDs
/// logged while it is under way are merged with their half or stay logged; every ID stays
/// known to every process throughout.
#[tokio::test]
async fn merges_in_slices() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = process(&dir, 4, 2).await.with_role(AggregatorRole::Helper);
    let b = process(&dir, 4, 2).await.with_role(AggregatorRole::Helper);
    let task_id = TaskId::random();
    let id = |first: u8| {
        let mut id = ReportId::random();
        id.0[0] = first;
        id
    };
    let (low, high): (Vec<ReportId>, Vec<ReportId>) = (
        (0..3).map(|i| id(i * 0x30)).collect(),
        (0..3).map(|i| id(0x80 + i * 0x30)).collect(),
    );

    // The fourth ID starts a merge: the low half moves now.
    put(&a, task_id, vec![low[0], low[1], high[0], high[1]])
        .await
        .expect("put");
    assert_eq!(log_state(&a, &a.replay.helper).await, (2, 2, 0));
    all_known(&b, task_id, vec![low[0], low[1], high[0], high[1]]).await;
    // B's next write moves the high half, with the high ID it logs; its low ID stays logged.
    put(&b, task_id, vec![low[2], high[2]]).await.expect("put");
    assert_eq!(log_state(&b, &b.replay.helper).await, (1, 5, 1));
    let everything: Vec<ReportId> = low.iter().chain(&high).copied().collect();
    all_known(&a, task_id, everything.clone()).await;
    let fresh = process(&dir, 4, 2).await.with_role(AggregatorRole::Helper);
    all_known(&fresh, task_id, everything).await;
    a.close().await;
    b.close().await;
    fresh.close().await;
}

/// A Helper's check notes which IDs the sorted table lacked, so that storing the job does
/// not probe for them again; a merge by another process in between voids the note, or an
/// ID merged meanwhile (no longer in the log) would get in twice.
#[tokio::test]
async fn a_merge_between_check_and_write_voids_the_check() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    // Every admission merges the whole log.
    let a = process(&dir, 1, 1).await.with_role(AggregatorRole::Helper);
    let b = process(&dir, 1, 1).await.with_role(AggregatorRole::Helper);
    let task_id = TaskId::random();
    let ids: Vec<ReportId> = (0..2).map(|_| ReportId::random()).collect();
    assert!(seen(&a, task_id, &ids).await.is_empty());
    put(&b, task_id, vec![ids[0]]).await.expect("put");
    assert_eq!(log_state(&b, &b.replay.helper).await, (0, 1, 1));
    assert!(matches!(
        put(&a, task_id, ids.clone()).await,
        Err(StoreError::Conflict)
    ));
    put(&a, task_id, vec![ids[1]]).await.expect("put");
    a.close().await;
    b.close().await;
}

/// With its filter warm, a process takes in fresh IDs without probing the sorted table, and
/// still finds every replay of an ID there: merged by this process, slice by slice (the filter
/// gains each slice's IDs once it commits), merged by another process (the merge state moved,
/// so every ID is probed until the filter is built again), or read by a build, in chunks.
#[tokio::test]
async fn the_filter_spares_probes_and_hides_no_merged_id() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = process(&dir, 4, 2).await;
    let b = process(&dir, 4, 2).await;
    let filter = &a.replay.leader.filter;
    filter.set_build_chunk(2);
    a.warm_up().await.expect("warm up");
    let task_id = TaskId::random();
    // Even-numbered IDs in the low half of the key space (the first slice of a merge), odd ones
    // in the high half.
    let ids: Vec<ReportId> = (0..12u8)
        .map(|i| {
            let mut id = ReportId::random();
            id.0[0] = if i % 2 == 0 { i } else { 0x80 | i };
            id
        })
        .collect();
    let reports = |which: &[usize], payload: u8| -> Vec<NewReport> {
        which
            .iter()
            .map(|&i| NewReport {
                task_id,
                report_id: ids[i],
                time: Time(1000),
                encoded: vec![payload],
            })
            .collect()
    };
    let probed = || a.replay.leader.probed.load(Ordering::Relaxed);

    // Nothing is probed in an empty table's filter. The fourth ID starts a merge, whose first
    // slice moves the low half.
    assert_eq!(put_and_claim(&a, &reports(&[0, 1, 2, 3], 0)).await, 1);
    assert_eq!(log_state(&a, &a.replay.leader).await, (2, 2, 0));
    assert_eq!(probed(), 0);
    // The next write moves the high half and ends the merge; ID 4 (low) stays logged. The
    // replays are in the memory set, and the fresh ID is not probed.
    assert_eq!(put_and_claim(&a, &reports(&[0, 1, 2, 3, 4], 9)).await, 1);
    assert_eq!(log_state(&a, &a.replay.leader).await, (1, 4, 1));
    assert_eq!(probed(), 0);
    assert!(filter.covers((1, 0)));
    // The memory set starts over after a merge: the merged IDs are found by probing the
    // table, since the filter holds them; the fresh ID 5 is not probed.
    assert_eq!(put_and_claim(&a, &reports(&[0, 1, 2, 3, 4, 5], 9)).await, 1);
    assert_eq!(probed(), 4);

    // B's writes start a merge and move the low half (IDs 4, 6 and 8).
    assert_eq!(put_and_claim(&b, &reports(&[6, 7, 8], 0)).await, 1);
    assert_eq!(log_state(&b, &b.replay.leader).await, (2, 7, 1));
    // A's filter does not cover the state B left: A probes, and finds ID 6 there. (Its write
    // moves the high half and ends the merge.)
    assert_eq!(put_and_claim(&a, &reports(&[6], 9)).await, 0);
    assert_eq!(probed(), 5);
    assert_eq!(log_state(&a, &a.replay.leader).await, (0, 9, 2));
    assert!(!filter.covers((2, 0)));

    // Built again, from the table, two IDs a statement: every merged ID is a replay, and
    // fresh IDs are not probed.
    filter.settle().await;
    filter.rebuild().await.expect("rebuild");
    assert!(filter.covers((2, 0)));
    assert_eq!(
        put_and_claim(&a, &reports(&[0, 1, 2, 3, 4, 5, 6, 7, 8], 9)).await,
        0
    );
    let before = probed();
    assert_eq!(put_and_claim(&a, &reports(&[9, 10, 11], 0)).await, 1);
    assert_eq!(probed(), before);
    a.close().await;
    b.close().await;
}
