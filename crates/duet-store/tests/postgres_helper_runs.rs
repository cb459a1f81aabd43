//! The Helper's replay set on PostgreSQL, in runs: replays are found in closed runs whatever
//! each process's filter knows, two writers never store one ID twice while runs close under
//! them, and task deletion reaches every run.
//!
//! Like `postgres.rs`, these tests need `DATABASE_URL` and pass with a note without it.

mod common;

use std::time::Duration;

use duet_core::AggregatorRole;
use duet_messages::dap09::{AggregationJobId, ReportId, TaskId};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::postgres::PostgresDatastore;
use duet_store::{Datastore, HelperAggregationJob, StoreError};
use sqlx::{Connection, PgConnection};

fn job(task_id: TaskId) -> HelperAggregationJob {
    HelperAggregationJob {
        task_id,
        id: AggregationJobId::random(),
        request_hash: [0; 32],
        step: 0,
        response: Vec::new(),
    }
}

fn no_merge(_: &[u8], _: &[u8]) -> Result<Vec<u8>, String> {
    Err("no aggregates in these tests".into())
}

fn new_ids(n: usize) -> Vec<ReportId> {
    (0..n).map(|_| ReportId::random()).collect()
}

/// A Helper's handle on its own pool, closing its open run after every `run_ids` IDs it writes.
async fn helper(url: &str, run_ids: i64) -> PostgresDatastore {
    let store = PostgresDatastore::connect(url)
        .await
        .expect("connect")
        .with_role(AggregatorRole::Helper);
    store.set_helper_run_ids(run_ids);
    store
}

/// The open run, once it is at least `at_least` (runs close in the background).
async fn open_run(url: &str, at_least: i32) -> i32 {
    common::open_run(url, "helper_replay_state", at_least).await
}

/// Stores a job of `ids`; `Conflict` if any was stored before.
async fn put(
    store: &PostgresDatastore,
    task_id: TaskId,
    ids: &[ReportId],
) -> Result<(), StoreError> {
    store
        .put_helper_aggregation_job(&job(task_id), ids, &[], &no_merge)
        .await
}

/// Replays are refused whichever run holds the first copy and whatever the writer's filter
/// knows: none yet, all the closed runs, or only some of them (another process closed more
/// since). `seen_report_ids` finds IDs in every run, and deleting the task removes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_found_in_every_run() {
    with_fresh_database("replays_are_found_in_every_run", |url| async move {
        let a = helper(&url, 10).await;
        let task_id = TaskId::random();
        // Four jobs of ten, each closing its run: runs 1 to 4.
        let mut stored = Vec::new();
        for run in 1..=4 {
            let ids = new_ids(10);
            put(&a, task_id, &ids).await.expect("fresh IDs");
            assert_eq!(open_run(&url, run + 1).await, run + 1);
            stored.push(ids);
        }

        // A process whose filter covers every closed run (warmed up), and one with none.
        let b = helper(&url, 1_000_000).await;
        b.warm_up().await.expect("warm up");
        let c = helper(&url, 1_000_000).await;
        for store in [&a, &b, &c] {
            for ids in &stored {
                let replay = put(store, task_id, &[ReportId::random(), ids[3]]).await;
                assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
            }
        }

        // `a` closes two more runs; `b`'s filter does not know them yet.
        for run in 5..=6 {
            let ids = new_ids(10);
            put(&a, task_id, &ids).await.expect("fresh IDs");
            assert_eq!(open_run(&url, run + 1).await, run + 1);
            stored.push(ids);
        }
        for ids in &stored[4..] {
            let late = [ReportId::random(), ids[7]];
            let replay = put(&b, task_id, &late).await;
            assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
        }
        // Once `b` has loaded them too, the same replays are IDs its filter may hold.
        b.warm_up().await.expect("load the new runs");
        for ids in &stored[4..] {
            let late = [ReportId::random(), ids[8]];
            let replay = put(&b, task_id, &late).await;
            assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
        }
        // An ID in the open run.
        let open = new_ids(3);
        put(&a, task_id, &open).await.expect("fresh IDs");
        let replay = put(&b, task_id, &open[1..2]).await;
        assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
        // Fresh IDs still go in, from every process.
        for store in [&a, &b, &c] {
            put(store, task_id, &new_ids(5)).await.expect("fresh IDs");
        }

        let probe: Vec<ReportId> = stored
            .iter()
            .map(|ids| ids[0])
            .chain([open[0], ReportId::random()])
            .collect();
        for store in [&b, &c] {
            let seen = store.seen_report_ids(&task_id, &probe).await.expect("seen");
            assert_eq!(seen, probe[..probe.len() - 1].iter().copied().collect());
        }

        // No task row was stored: only the IDs go.
        c.delete_task(&task_id).await.expect("delete_task");
        assert!(c
            .seen_report_ids(&task_id, &probe)
            .await
            .expect("seen")
            .is_empty());
        let everything: Vec<ReportId> = stored.concat();
        put(&a, task_id, &everything)
            .await
            .expect("a deleted task's IDs are gone from every run");
        // `b`'s filter still holds them, from before the deletion; now they are in a run
        // closed after its last load, and found there.
        let reopened = open_run(&url, 0).await;
        put(&a, task_id, &new_ids(10)).await.expect("fresh IDs");
        open_run(&url, reopened + 1).await;
        let replay = put(&b, task_id, &stored[2][4..5]).await;
        assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
        for store in [a, b, c] {
            store.close().await;
        }
    })
    .await;
}

/// Closing a run waits for the writers of that run: while one has not committed, the run stays
/// open, and a writer that comes after the close finds that writer's IDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_run_waits_for_its_writers() {
    with_fresh_database("closing_a_run_waits_for_its_writers", |url| async move {
        let a = helper(&url, 10).await;
        let b = helper(&url, 1_000_000).await;
        let task_id = TaskId::random();
        put(&b, task_id, &new_ids(1)).await.expect("fresh IDs");
        let mut writer = PgConnection::connect(&url).await.expect("connect");
        let key: i32 = sqlx::query_scalar("SELECT task_key FROM replay_tasks WHERE task_id = $1")
            .bind(&task_id.0[..])
            .fetch_one(&mut writer)
            .await
            .expect("task key");
        // A writer of the open run, as a Helper job writes, not yet committed.
        let held = ReportId::random();
        for sql in [
            "BEGIN",
            "SELECT pg_advisory_xact_lock_shared(x'6475657452554e53'::int8)",
        ] {
            sqlx::query(sql).execute(&mut writer).await.expect(sql);
        }
        sqlx::query(
            "INSERT INTO helper_report_ids (run, task_key, report_id) \
             SELECT open_run, $1, $2 FROM helper_replay_state",
        )
        .bind(key)
        .bind(&held.0[..])
        .execute(&mut writer)
        .await
        .expect("insert");
        // `a` fills the run and tries to close it: the close waits.
        let run = open_run(&url, 1).await;
        put(&a, task_id, &new_ids(10)).await.expect("fresh IDs");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(open_run(&url, 1).await, run, "closed under an open writer");
        // `b`'s write queues behind the close; the writer commits; the run closes; `b` finds
        // the writer's ID in the closed run.
        let late = {
            let b = b.clone();
            tokio::spawn(async move { put(&b, task_id, &[ReportId::random(), held]).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        sqlx::query("COMMIT")
            .execute(&mut writer)
            .await
            .expect("commit");
        let replay = late.await.expect("writer");
        assert!(matches!(replay, Err(StoreError::Conflict)), "{replay:?}");
        assert_eq!(open_run(&url, run + 1).await, run + 1);
        writer.close().await.expect("close");
        for store in [a, b] {
            store.close().await;
        }
    })
    .await;
}

/// Helpers on two pools race to store jobs that share one ID while their runs close every few
/// IDs: each round exactly one job stores it, and no ID is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_store_an_id_once_while_runs_close() {
    with_fresh_database(
        "racing_writers_store_an_id_once_while_runs_close",
        |url| async move {
            const RACERS: usize = 6;
            let replicas = [helper(&url, 7).await, helper(&url, 7).await];
            let task_id = TaskId::random();
            for round in 0..20 {
                let shared = ReportId::random();
                let mut racers = Vec::new();
                for r in 0..RACERS {
                    let store = replicas[r % 2].clone();
                    let mut ids = new_ids(3);
                    ids.insert(r % 4, shared);
                    racers.push(tokio::spawn(
                        async move { put(&store, task_id, &ids).await },
                    ));
                }
                let mut winners = 0;
                for racer in racers {
                    match racer.await.expect("racer") {
                        Ok(()) => winners += 1,
                        Err(StoreError::Conflict) => {}
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                assert_eq!(winners, 1, "round {round}");
            }
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let (rows, distinct, runs): (i64, i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COUNT(DISTINCT report_id), COUNT(DISTINCT run) \
                 FROM helper_report_ids",
            )
            .fetch_one(&mut conn)
            .await
            .expect("count");
            assert_eq!(rows, distinct, "an ID stored twice");
            assert_eq!(rows, 20 * 4);
            assert!(runs > 3, "runs closed during the race: {runs}");
            conn.close().await.expect("close");
            for store in replicas {
                store.close().await;
            }
        },
    )
    .await;
}

/// A database that goes back in time (a failover to a replica that lagged, a restore to an
/// earlier point) reopens a run that a process's filter had loaded as closed; other processes
/// then write it again and close it. The first write that sees the open run behind its filter
/// answers `Conflict` (its probe trusted the filter) and drops the filter, and a replay of an ID
/// written into the reopened run is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_is_dropped_when_the_database_goes_back_in_time() {
    with_fresh_database(
        "helper_filter_dropped_when_the_database_goes_back_in_time",
        |url| async move {
            let a = helper(&url, 10).await;
            let task_id = TaskId::random();
            for run in 1..=3 {
                put(&a, task_id, &new_ids(10)).await.expect("fresh IDs");
                assert_eq!(open_run(&url, run + 1).await, run + 1);
            }
            // `b`'s filter covers runs 0 to 3.
            let b = helper(&url, 1_000_000).await;
            b.warm_up().await.expect("warm up");

            // The database loses the close of run 3 and the IDs in it.
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            for sql in [
                "DELETE FROM helper_report_ids WHERE run = 3",
                "UPDATE helper_replay_state SET open_run = 3",
            ] {
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            conn.close().await.expect("close");
            let fresh = new_ids(1);
            assert!(matches!(
                put(&b, task_id, &fresh).await,
                Err(StoreError::Conflict)
            ));
            put(&b, task_id, &fresh)
                .await
                .expect("fresh, once the filter is dropped");

            // Another process writes run 3 again, with IDs `b` never saw, and closes it.
            let c = helper(&url, 10).await;
            let rewritten = new_ids(10);
            put(&c, task_id, &rewritten).await.expect("fresh IDs");
            assert_eq!(open_run(&url, 4).await, 4);
            assert!(matches!(
                put(&b, task_id, &rewritten[..1]).await,
                Err(StoreError::Conflict)
            ));
            assert!(b
                .seen_report_ids(&task_id, &rewritten[..1])
                .await
                .expect("seen")
                .contains(&rewritten[0]));
            for store in [a, b, c] {
                store.close().await;
            }
        },
    )
    .await;
}

/// A stored ID of another length than a report's (written by hand, or by a damaged database)
/// matches no report: loads skip it, with a warning, instead of failing every time, so the
/// filter still covers the closed runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stored_id_does_not_stop_loads() {
    with_fresh_database(
        "a_malformed_stored_id_does_not_stop_loads",
        |url| async move {
            let a = helper(&url, 10).await;
            let task_id = TaskId::random();
            let ids = new_ids(10);
            put(&a, task_id, &ids).await.expect("fresh IDs");
            assert_eq!(open_run(&url, 2).await, 2);
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            sqlx::query(
                "INSERT INTO helper_report_ids (run, task_key, report_id) \
             SELECT 1, task_key, '\\x0102'::bytea FROM helper_report_ids LIMIT 1",
            )
            .execute(&mut conn)
            .await
            .expect("insert");
            conn.close().await.expect("close");

            let b = helper(&url, 1_000_000).await;
            b.warm_up().await.expect("a load past the malformed ID");
            assert!(matches!(
                put(&b, task_id, &ids[3..4]).await,
                Err(StoreError::Conflict)
            ));
            put(&b, task_id, &new_ids(2)).await.expect("fresh IDs");
            for store in [a, b] {
                store.close().await;
            }
        },
    )
    .await;
}
