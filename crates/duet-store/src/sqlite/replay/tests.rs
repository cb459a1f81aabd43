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

/// A Helper's handle, as [`process`] gives, merging every 4 IDs in one transaction.
async fn helper_process(dir: &tempfile::TempDir) -> SqliteDatastore {
    process(dir, 4, 1).await.with_role(AggregatorRole::Helper)
}

/// `n` random report IDs.
fn new_ids(n: usize) -> Vec<ReportId> {
    (0..n).map(|_| ReportId::random()).collect()
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

/// A merge spread over two transactions moves one half of the key space in each, and the log
/// rows from before it started go when it ends; IDs logged while it is under way are merged
/// with their half if it is still to come, and stay logged either way. Every ID stays known to
/// every process throughout.
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
    assert_eq!(log_state(&a, &a.replay.helper).await, (4, 2, 0));
    all_known(&b, task_id, vec![low[0], low[1], high[0], high[1]]).await;
    // B's next write moves the high half, with the high ID it logs, and ends the merge: the
    // two IDs it logs stay logged.
    put(&b, task_id, vec![low[2], high[2]]).await.expect("put");
    assert_eq!(log_state(&b, &b.replay.helper).await, (2, 5, 1));
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
/// so the IDs the filter holds are probed in every run until it is built again), or read by a
/// build, in chunks.
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
    assert_eq!(log_state(&a, &a.replay.leader).await, (4, 2, 0));
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
    assert_eq!(log_state(&b, &b.replay.leader).await, (5, 7, 1));
    // A's filter does not cover the state B left: A probes, and finds ID 0 there (B's IDs are
    // still logged). Its write moves the high half and ends the merge.
    assert_eq!(put_and_claim(&a, &reports(&[0], 9)).await, 0);
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

/// The runs of `log`'s sorted table, each with its row count, and the runs `replay_runs` lists.
async fn runs(store: &SqliteDatastore, log: &ReplayLog) -> (Vec<(i64, i64)>, Vec<i64>) {
    let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "SELECT run, COUNT(*) FROM {} GROUP BY run ORDER BY run",
        log.table
    ))
    .fetch_all(&store.pool)
    .await
    .expect("runs");
    let listed: Vec<i64> =
        sqlx::query_scalar("SELECT run FROM replay_runs WHERE name = ? ORDER BY run")
            .bind(log.name)
            .fetch_all(&store.pool)
            .await
            .expect("replay_runs");
    (rows, listed)
}

/// Each merge appends a run of its own; a check finds IDs in every run, and deleting a task
/// drops the runs it leaves empty.
#[tokio::test]
async fn each_merge_appends_a_run() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = helper_process(&dir).await;
    let log = &a.replay.helper;
    let (task_id, other) = (TaskId::random(), TaskId::random());

    // Run 0 comes from the schema (the IDs merged before runs), empty here.
    assert_eq!(runs(&a, log).await, (vec![], vec![0]));
    let first = new_ids(4);
    put(&a, task_id, first.clone()).await.expect("put");
    assert_eq!(runs(&a, log).await, (vec![(1, 4)], vec![0, 1]));
    let (second, third) = (new_ids(2), new_ids(2));
    put(&a, task_id, second.clone()).await.expect("put");
    put(&a, other, third.clone()).await.expect("put");
    assert_eq!(runs(&a, log).await, (vec![(1, 4), (2, 4)], vec![0, 1, 2]));
    assert_eq!(log_state(&a, log).await, (0, 8, 2));

    // Another process, whose filter does not cover this state yet, finds every ID by probing
    // each run.
    let b = helper_process(&dir).await;
    all_known(&b, task_id, first.iter().chain(&second).copied().collect()).await;
    all_known(&b, other, third.clone()).await;
    assert!(
        seen(&b, task_id, &third).await.is_empty(),
        "IDs are per task"
    );

    // Deleting the task empties run 1, which goes with the empty run 0; run 2 keeps the other
    // task's IDs.
    a.delete_task(&task_id).await.expect("delete_task");
    assert_eq!(runs(&a, log).await, (vec![(2, 2)], vec![2]));
    assert!(seen(&b, task_id, &first).await.is_empty());
    all_known(&b, other, third).await;
    a.close().await;
    b.close().await;
}

/// Version 5 of the schema keeps the IDs a database already has, as run 0, and version 6 numbers
/// the next run 1.
#[tokio::test]
async fn the_schema_keeps_merged_ids_as_run_zero() {
    let pool = sqlx::SqlitePool::connect("sqlite::memory:")
        .await
        .expect("connect");
    let migrations: Vec<_> = crate::sqlite::MIGRATOR.iter().collect();
    let versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
    assert_eq!(versions[..6], [1, 2, 3, 4, 5, 6]);
    for migration in &migrations[..4] {
        sqlx::raw_sql(&migration.sql)
            .execute(&pool)
            .await
            .expect("migration");
    }
    sqlx::raw_sql(
        "INSERT INTO replay_tasks (task_key, task_id) VALUES (1, x'01'), (2, x'02');
         INSERT INTO report_ids (task_key, report_id) VALUES (1, x'0a'), (1, x'0b'), (2, x'0a');
         INSERT INTO helper_report_ids (task_key, report_id) VALUES (2, x'0c');",
    )
    .execute(&pool)
    .await
    .expect("rows");
    for migration in &migrations[4..] {
        sqlx::raw_sql(&migration.sql)
            .execute(&pool)
            .await
            .expect("migrations 5 and later");
    }
    let rows: Vec<(i64, i64, Vec<u8>)> =
        sqlx::query_as("SELECT run, task_key, report_id FROM report_ids ORDER BY 1, 2, 3")
            .fetch_all(&pool)
            .await
            .expect("report_ids");
    assert_eq!(
        rows,
        [(0, 1, vec![0x0a]), (0, 1, vec![0x0b]), (0, 2, vec![0x0a])]
    );
    let rows: Vec<(i64, i64, Vec<u8>)> =
        sqlx::query_as("SELECT run, task_key, report_id FROM helper_report_ids")
            .fetch_all(&pool)
            .await
            .expect("helper_report_ids");
    assert_eq!(rows, [(0, 2, vec![0x0c])]);
    let runs: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT name, run, ids, into_run FROM replay_runs ORDER BY name")
            .fetch_all(&pool)
            .await
            .expect("replay_runs");
    assert_eq!(
        runs,
        [("helper".into(), 0, 1, 0), ("leader".into(), 0, 3, 0)]
    );
    let compactions: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT compact_run, compact_slice, compact_slices FROM replay_logs ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .expect("replay_logs");
    assert_eq!(compactions, [(0, 0, 0), (0, 0, 0)]);
    let next: Vec<i64> = sqlx::query_scalar("SELECT next_run FROM replay_logs ORDER BY name")
        .fetch_all(&pool)
        .await
        .expect("next_run");
    assert_eq!(next, [1, 1], "after run 0");
}

/// `(compact_run, compact_slice, compact_slices)` of `log`.
async fn compaction(store: &SqliteDatastore, log: &ReplayLog) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT compact_run, compact_slice, compact_slices FROM replay_logs WHERE name = ?",
    )
    .bind(log.name)
    .fetch_one(&store.pool)
    .await
    .expect("compaction")
}

/// Once a level holds `fanout` runs they are compacted into one run of the next level, a slice
/// per write that merges nothing; every ID stays known throughout, to a process that probes.
#[tokio::test]
async fn runs_are_compacted_by_level() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = helper_process(&dir).await;
    let b = helper_process(&dir).await;
    let log = &a.replay.helper;
    // Two runs per level, 4 IDs a slice; runs of 8 IDs or more are of level 1, 16 or more of
    // level 2.
    log.set_compaction(2, 4);
    b.replay.helper.set_compaction(2, 4);
    let task_id = TaskId::random();
    let mut taken: Vec<ReportId> = Vec::new();
    // Puts `n` new IDs through `store`: each put is a write transaction, which merges the log or
    // moves a slice of a compaction under way.
    let mut put_new = async |store: &SqliteDatastore, n: usize| {
        let ids: Vec<ReportId> = (0..n).map(|_| ReportId::random()).collect();
        taken.extend(&ids);
        put(store, task_id, ids).await.expect("put");
        taken.clone()
    };
    // B probes the sorted table for the IDs merged into it (outside a write transaction it may
    // miss IDs only logged since its last write).
    let known_to_b = async |ids: &[ReportId]| {
        assert_eq!(
            seen(&b, task_id, ids).await.len(),
            ids.len(),
            "every ID is known"
        );
    };

    // One run of level 0 is not enough; the empty run 0 does not count.
    let merged = put_new(&a, 4).await;
    assert_eq!(compaction(&a, log).await, (0, 0, 0));
    assert_eq!(runs(&a, log).await, (vec![(1, 4)], vec![0, 1]));
    known_to_b(&merged).await;
    // A second one (B merges it) starts a compaction of 8 IDs into run 3, in three slices.
    let merged = put_new(&b, 4).await;
    assert_eq!(compaction(&a, log).await, (3, 1, 3));
    assert_eq!(
        runs(&a, log).await,
        (vec![(1, 4), (2, 4)], vec![0, 1, 2, 3])
    );
    known_to_b(&merged).await;
    for slice in 2..=4 {
        put_new(&a, 1).await;
        assert_eq!(
            compaction(&a, log).await.1,
            if slice < 4 { slice } else { 0 }
        );
        known_to_b(&merged).await;
    }
    assert_eq!(runs(&a, log).await, (vec![(3, 8)], vec![3]));

    // Two more merges make two runs of level 0 (4 and 5), compacted into run 6, of level 1,
    // which makes two of level 1: run 7, of level 2, takes them in as the next compaction.
    put_new(&a, 1).await;
    let merged = put_new(&a, 4).await;
    assert_eq!(runs(&a, log).await.1, vec![3, 4, 5, 6]);
    while compaction(&a, log).await.0 == 6 {
        put_new(&a, 1).await;
        known_to_b(&merged).await;
    }
    assert_eq!(compaction(&a, log).await.0, 7);
    let merged = put_new(&a, 1).await;
    while compaction(&a, log).await.0 != 0 {
        put_new(&a, 1).await;
        known_to_b(&merged[..16]).await;
    }
    assert_eq!(runs(&a, log).await.0[0], (7, 16));
    all_known(&a, task_id, taken.clone()).await;

    a.close().await;
    b.close().await;
}

/// A task deleted just as a compaction starts empties the runs it moves, which go; the
/// compaction's own run, still empty, stays listed, and the other task's IDs it then takes in
/// stay known.
#[tokio::test]
async fn a_task_deletion_keeps_the_run_a_compaction_writes() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = helper_process(&dir).await;
    let log = &a.replay.helper;
    log.set_compaction(2, 4);
    let (task_id, other) = (TaskId::random(), TaskId::random());
    let deleted = new_ids(4);
    put(&a, task_id, deleted.clone()).await.expect("put");
    let kept = new_ids(4);
    put(&a, other, kept.clone()).await.expect("put");
    // The second run of level 0 started a compaction into run 3, which has moved nothing yet.
    assert_eq!(compaction(&a, log).await, (3, 1, 3));
    assert_eq!(
        runs(&a, log).await,
        (vec![(1, 4), (2, 4)], vec![0, 1, 2, 3])
    );

    a.delete_task(&task_id).await.expect("delete_task");
    assert_eq!(runs(&a, log).await, (vec![(2, 4)], vec![2, 3]));
    while compaction(&a, log).await.0 != 0 {
        put(&a, other, new_ids(1)).await.expect("put");
    }
    assert_eq!(runs(&a, log).await.0[0], (3, 4));
    let b = helper_process(&dir).await;
    assert_eq!(seen(&b, other, &kept).await.len(), 4, "run 3 is probed");
    assert!(seen(&b, task_id, &deleted).await.is_empty());
    a.close().await;
    b.close().await;
}

/// A task deletion drops a memory set older than itself, not one a transaction has
/// resynchronised since (which may hold IDs committed after the deletion).
#[tokio::test]
async fn a_deletion_forgets_only_older_memory_sets() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = process(&dir, 1_000, 1)
        .await
        .with_role(AggregatorRole::Helper);
    let log = &a.replay.helper;
    let task_id = TaskId::random();
    let ids: Vec<ReportId> = (0..2).map(|_| ReportId::random()).collect();
    put(&a, task_id, ids.clone()).await.expect("put");
    let generation = log.recent().generation.expect("synchronised");
    log.forget_task(generation);
    assert!(ids.iter().all(|id| log.recent().contains(&task_id, id)));
    log.forget_task(generation + 1);
    assert!(log.recent().generation.is_none());
    assert!(!ids.iter().any(|id| log.recent().contains(&task_id, id)));
    // The log still has them: the next write reads them back.
    all_known(&a, task_id, ids).await;
    a.close().await;
}

/// A filter that another process's merge left behind still rules its IDs out of the runs it
/// was built from: the IDs it lacks are probed only in the runs written since, where that
/// merge's IDs are found; an ID it holds is probed in every run.
#[tokio::test]
async fn a_stale_filter_probes_only_the_runs_written_since() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = helper_process(&dir).await;
    let b = helper_process(&dir).await;
    let log = &a.replay.helper;
    let task_id = TaskId::random();
    let ours = new_ids(4);
    put(&a, task_id, ours.clone()).await.expect("put");
    // Built from run 1 (the first write started a build in the background: let it end first).
    log.filter.settle().await;
    log.filter.rebuild().await.expect("rebuild");
    assert!(log.filter.covers((1, 0)), "built after the first merge");
    // B merges its IDs into run 2: A's filter does not cover the state that leaves.
    let theirs = new_ids(4);
    put(&b, task_id, theirs.clone()).await.expect("put");
    let probed = || {
        (
            log.probed.load(Ordering::Relaxed),
            log.probed_later.load(Ordering::Relaxed),
        )
    };
    let before = probed();
    assert!(matches!(
        put(&a, task_id, vec![theirs[0], ReportId::random()]).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        probed(),
        (before.0, before.1 + 2),
        "both only in runs above 1"
    );
    assert!(matches!(
        put(&a, task_id, vec![ours[0]]).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        probed().0,
        before.0 + 1,
        "an ID the filter holds, in every run"
    );
    a.close().await;
    b.close().await;
}

/// Run numbers are never used twice, even once a task deletion has dropped the highest run: a
/// stale filter probes only the runs numbered above those it was built from, so a reused number
/// would hide the IDs of the run that took it.
#[tokio::test]
async fn run_numbers_are_never_reused() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let a = helper_process(&dir).await;
    let b = helper_process(&dir).await;
    let log = &a.replay.helper;
    let (deleted, task_id) = (TaskId::random(), TaskId::random());
    put(&a, deleted, new_ids(4)).await.expect("put");
    log.filter.settle().await;
    log.filter.rebuild().await.expect("rebuild");
    assert!(log.filter.covers((1, 0)), "built after the first merge");
    // Run 1, the highest, is emptied and goes; B's merge still writes run 2.
    a.delete_task(&deleted).await.expect("delete_task");
    assert_eq!(runs(&a, log).await, (vec![], vec![]));
    let theirs = new_ids(4);
    put(&b, task_id, theirs.clone()).await.expect("put");
    assert_eq!(runs(&a, log).await, (vec![(2, 4)], vec![2]));
    // A's filter, built when run 1 was the highest, lacks B's IDs: run 2 is probed for them.
    assert!(matches!(
        put(&a, task_id, vec![theirs[0]]).await,
        Err(StoreError::Conflict)
    ));
    a.close().await;
    b.close().await;
}
