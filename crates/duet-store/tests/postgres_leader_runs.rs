//! The Leader's replay set on PostgreSQL, in runs: job creation drops a replay whichever run
//! holds the first claim of its ID and whatever each process's filter knows, creators racing
//! while runs close claim each ID once, and task deletion reaches every run.
//!
//! Like `postgres.rs`, these tests need `DATABASE_URL` and pass with a note without it.

mod common;

use std::time::Duration;

use common::{report, PRECISION, T0};
use duet_messages::dap09::{ReportId, TaskId, Time};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::conformance::unaggregated;
use duet_store::postgres::PostgresDatastore;
use duet_store::{Datastore, NewReport, Wakeup};
use sqlx::{Connection, PgConnection};

const NOW: Time = Time(T0 + PRECISION);

/// One of these tests holds a transaction open, which holds back job creation on the whole
/// server (the horizon is the server's): they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Leader's handle on its own pool, closing its open run after every `run_ids` IDs it claims.
async fn leader(url: &str, run_ids: i64) -> PostgresDatastore {
    let store = PostgresDatastore::connect(url).await.expect("connect");
    store.set_leader_run_ids(run_ids);
    store
}

/// The open run, once it is at least `at_least` (runs close in the background).
async fn open_run(url: &str, at_least: i32) -> i32 {
    common::open_run(url, "leader_replay_state", at_least).await
}

/// A new upload of `id`.
fn upload_of(task_id: TaskId, id: ReportId) -> NewReport {
    NewReport {
        report_id: id,
        ..report(task_id, T0 + 1)
    }
}

/// Uploads `reports`, creates jobs through `store` and ends them: the IDs the jobs claimed.
async fn claim(store: &PostgresDatastore, reports: &[NewReport]) -> Vec<ReportId> {
    store.put_reports(reports).await.expect("put_reports");
    store
        .create_aggregation_jobs(1000, NOW)
        .await
        .expect("create");
    let jobs = store
        .acquire_aggregation_jobs(NOW, 600, 100)
        .await
        .expect("acquire");
    let mut claimed = Vec::new();
    for job in &jobs {
        claimed.extend(job.reports.iter().map(|r| r.report_id));
        store.abandon_aggregation_job(job).await.expect("abandon");
    }
    claimed.sort_unstable_by_key(|id| id.0);
    claimed
}

/// A fresh report and a replay of `replayed`: only the fresh one is claimed, and the replay
/// leaves the queue.
async fn assert_replay_dropped(store: &PostgresDatastore, task_id: TaskId, replayed: ReportId) {
    let fresh = report(task_id, T0 + 2);
    let claimed = claim(store, &[upload_of(task_id, replayed), fresh.clone()]).await;
    assert_eq!(claimed, vec![fresh.report_id], "replay of {replayed:?}");
    assert_eq!(unaggregated(store, task_id, T0, PRECISION).await, 0);
}

/// Replays are dropped whichever run holds the first claim and whatever the creator's filter
/// knows: none yet, all the closed runs, or only some of them (another process closed more
/// since); and deleting the task removes its IDs from every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_dropped_whatever_run_holds_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "replays_are_dropped_whatever_run_holds_them",
        |url| async move {
            let a = leader(&url, 10).await;
            let task_id = TaskId::random();
            // Four jobs of ten, each closing its run: runs 1 to 4.
            let mut stored: Vec<Vec<ReportId>> = Vec::new();
            for run in 1..=4 {
                let reports: Vec<NewReport> = (0..10).map(|i| report(task_id, T0 + i)).collect();
                assert_eq!(claim(&a, &reports).await.len(), 10);
                assert_eq!(open_run(&url, run + 1).await, run + 1);
                stored.push(reports.iter().map(|r| r.report_id).collect());
            }

            // A process whose filter covers every closed run (warmed up), and one with none.
            let b = leader(&url, 1_000_000).await;
            b.warm_up().await.expect("warm up");
            let c = leader(&url, 1_000_000).await;
            for (i, store) in [&a, &b, &c].into_iter().enumerate() {
                for ids in &stored {
                    assert_replay_dropped(store, task_id, ids[i]).await;
                }
            }

            // `a` closes two more runs; `b`'s filter does not know them yet.
            for run in 5..=6 {
                let reports: Vec<NewReport> = (0..10).map(|i| report(task_id, T0 + i)).collect();
                assert_eq!(claim(&a, &reports).await.len(), 10);
                assert_eq!(open_run(&url, run + 1).await, run + 1);
                stored.push(reports.iter().map(|r| r.report_id).collect());
            }
            for ids in &stored[4..] {
                assert_replay_dropped(&b, task_id, ids[7]).await;
            }
            // Once `b` has loaded them too, the same replays are IDs its filter may hold.
            b.warm_up().await.expect("load the new runs");
            for ids in &stored[4..] {
                assert_replay_dropped(&b, task_id, ids[8]).await;
            }
            // An ID in the open run; and two uploads of one ID in one claim.
            let open = report(task_id, T0 + 3);
            assert_eq!(claim(&a, std::slice::from_ref(&open)).await.len(), 1);
            assert_replay_dropped(&b, task_id, open.report_id).await;
            let twice = report(task_id, T0 + 4);
            let claimed = claim(&c, &[twice.clone(), upload_of(task_id, twice.report_id)]).await;
            assert_eq!(claimed, vec![twice.report_id]);

            // Deleting the task removes its IDs from every run: uploaded again, they are fresh.
            c.delete_task(&task_id).await.expect("delete_task");
            let again: Vec<NewReport> = stored
                .iter()
                .map(|ids| upload_of(task_id, ids[0]))
                .collect();
            assert_eq!(claim(&b, &again).await.len(), again.len());
            for store in [a, b, c] {
                store.close().await;
            }
        },
    )
    .await;
}

/// Leaders on two pools create jobs at once for tasks whose uploads replay IDs of earlier
/// rounds, while their runs close every few IDs: every fresh ID is claimed once, no replay is
/// claimed, and no ID is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creators_claim_each_id_once_while_runs_close() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "racing_creators_claim_each_id_once_while_runs_close",
        |url| async move {
            let replicas = [leader(&url, 7).await, leader(&url, 7).await];
            let tasks = [TaskId::random(), TaskId::random()];
            let mut earlier: Vec<(TaskId, ReportId)> = Vec::new();
            let mut fresh = 0;
            let mut claimed = Vec::new();
            for round in 0..15 {
                let mut uploads = Vec::new();
                for (t, task_id) in tasks.iter().enumerate() {
                    let reports: Vec<NewReport> =
                        (0..3).map(|i| report(*task_id, T0 + i)).collect();
                    fresh += reports.len();
                    uploads.extend(reports);
                    // A replay of an ID this task's jobs claimed in an earlier round.
                    if let Some((_, id)) = earlier
                        .iter()
                        .filter(|(owner, _)| owner == task_id)
                        .nth(round * 2 + t)
                    {
                        uploads.push(upload_of(*task_id, *id));
                    }
                }
                replicas[round % 2]
                    .put_reports(&uploads)
                    .await
                    .expect("put_reports");
                let creators = replicas.clone().map(|store| {
                    tokio::spawn(async move {
                        store.create_aggregation_jobs(2, NOW).await.expect("create")
                    })
                });
                for creator in creators {
                    creator.await.expect("creator");
                }
                let jobs = replicas[0]
                    .acquire_aggregation_jobs(NOW, 600, 100)
                    .await
                    .expect("acquire");
                for job in &jobs {
                    for r in &job.reports {
                        earlier.push((job.task_id, r.report_id));
                        claimed.push(r.report_id);
                    }
                    replicas[0]
                        .abandon_aggregation_job(job)
                        .await
                        .expect("abandon");
                }
            }
            for task_id in tasks {
                assert_eq!(
                    unaggregated(&replicas[0], task_id, T0, PRECISION).await,
                    0,
                    "a report left in the queue"
                );
            }
            assert_eq!(claimed.len(), fresh, "every fresh ID claimed, no replay");
            claimed.sort_unstable_by_key(|id| id.0);
            claimed.dedup();
            assert_eq!(claimed.len(), fresh, "an ID claimed twice");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let (rows, distinct, runs): (i64, i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COUNT(DISTINCT report_id), COUNT(DISTINCT run) \
                 FROM claimed_report_ids",
            )
            .fetch_one(&mut conn)
            .await
            .expect("count");
            assert_eq!(rows, distinct, "an ID stored twice");
            assert_eq!(rows as usize, fresh);
            assert!(runs > 3, "runs closed during the race: {runs}");
            conn.close().await.expect("close");
            for store in replicas {
                store.close().await;
            }
        },
    )
    .await;
}

/// A creator whose statement took its snapshot before another creator moved the task's cursor,
/// and its lock after that creator committed, claims nothing in that statement; it runs again
/// and claims the reports left, rather than leaving them for the next pass (the creator that
/// moved the cursor may have skipped the task while the lock was held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creator_that_loses_the_cursor_race_claims_what_is_left() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "a_creator_that_loses_the_cursor_race_claims_what_is_left",
        |url| async move {
            let a = leader(&url, 1_000_000).await;
            let task_id = TaskId::random();
            let reports: Vec<NewReport> = (0..3).map(|i| report(task_id, T0 + i)).collect();
            a.put_reports(&reports).await.expect("put_reports");
            // Another creator moves the cursor past the first report and has not committed.
            let mut other = PgConnection::connect(&url).await.expect("connect");
            for sql in [
                "BEGIN",
                "UPDATE replay_tasks AS t SET (claimed_xid, claimed_time, claimed_id) = ( \
                   SELECT upload_xid, client_time, report_id FROM report_queue AS q \
                   WHERE q.task_key = t.task_key \
                   ORDER BY upload_xid, client_time, report_id LIMIT 1)",
            ] {
                sqlx::query(sql).execute(&mut other).await.expect(sql);
            }
            let creator = {
                let a = a.clone();
                tokio::spawn(async move { a.create_aggregation_jobs(1000, NOW).await })
            };
            // The creator's statement has its snapshot and the task's lock, and waits for the
            // cursor's row.
            common::waiting_on_lock(&url, "create_aggregation_jobs").await;
            assert!(
                !creator.is_finished(),
                "the creator did not wait for the cursor"
            );
            common::end_transaction(other, "COMMIT").await;
            assert_eq!(creator.await.expect("creator").expect("create"), 1);
            let jobs = a
                .acquire_aggregation_jobs(NOW, 600, 100)
                .await
                .expect("acquire");
            let mut claimed: Vec<ReportId> = jobs
                .iter()
                .flat_map(|job| job.reports.iter().map(|r| r.report_id))
                .collect();
            claimed.sort_unstable_by_key(|id| id.0);
            let mut left: Vec<ReportId> = reports[1..].iter().map(|r| r.report_id).collect();
            left.sort_unstable_by_key(|id| id.0);
            assert_eq!(claimed, left, "the reports after the moved cursor");
            a.close().await;
        },
    )
    .await;
}

/// Each job is announced as its transaction commits: a replica hears of a pass's first job while
/// the pass is held up on another task, not only once the pass ends (or never, if it fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_is_announced_when_it_commits() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database("each_job_is_announced_when_it_commits", |url| async move {
        let a = leader(&url, 1_000_000).await;
        let replica = leader(&url, 1_000_000).await;
        let mut rx = replica.wakeups().expect("PostgreSQL has wake-ups");
        assert_eq!(common::next_wakeup(&mut rx).await, Wakeup::Listening);
        // The first task's key is stored first, and a pass takes the tasks in that order.
        let (first, second) = (TaskId::random(), TaskId::random());
        for task_id in [first, second] {
            a.put_reports(&[report(task_id, T0)])
                .await
                .expect("put_reports");
        }
        // Another creator holds the second task's cursor.
        let mut other = PgConnection::connect(&url).await.expect("connect");
        for sql in [
            "BEGIN",
            "SELECT 1 FROM replay_tasks WHERE task_id = $1 FOR UPDATE",
        ] {
            sqlx::query(sql)
                .bind(&second.0[..])
                .execute(&mut other)
                .await
                .expect(sql);
        }
        let creator = {
            let a = a.clone();
            tokio::spawn(async move { a.create_aggregation_jobs(1000, NOW).await })
        };
        common::waiting_on_lock(&url, "create_aggregation_jobs").await;
        loop {
            match common::next_wakeup(&mut rx).await {
                Wakeup::AggregationJobsCreated => break,
                Wakeup::ReportsStored => continue,
                other => panic!("unexpected wake-up {other:?}"),
            }
        }
        assert!(!creator.is_finished(), "the pass ended before the wake-up");
        common::end_transaction(other, "ROLLBACK").await;
        assert_eq!(creator.await.expect("creator").expect("create"), 2);
        for store in [a, replica] {
            store.close().await;
        }
    })
    .await;
}

/// Job creation waits while a run is being closed (the close holds the runs' lock exclusive), so
/// that its IDs go into the run that is open when it commits; then it claims the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_creation_waits_for_a_closing_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database("job_creation_waits_for_a_closing_run", |url| async move {
        let a = leader(&url, 1_000_000).await;
        let task_id = TaskId::random();
        let reports: Vec<NewReport> = (0..3).map(|i| report(task_id, T0 + i)).collect();
        a.put_reports(&reports).await.expect("put_reports");
        // A close in progress, as another process closes the open run.
        let mut closer = PgConnection::connect(&url).await.expect("connect");
        for sql in [
            "BEGIN",
            "SELECT pg_advisory_xact_lock(x'64756574434c4d53'::int8)",
            "UPDATE leader_replay_state SET open_run = open_run + 1",
        ] {
            sqlx::query(sql).execute(&mut closer).await.expect(sql);
        }
        let creator = {
            let a = a.clone();
            tokio::spawn(async move { a.create_aggregation_jobs(1000, NOW).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!creator.is_finished(), "a job created under a closing run");
        common::end_transaction(closer, "COMMIT").await;
        assert_eq!(creator.await.expect("creator").expect("create"), 1);
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let runs: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT run FROM claimed_report_ids")
            .fetch_all(&mut conn)
            .await
            .expect("runs");
        assert_eq!(
            runs,
            vec![2],
            "the IDs went into the run opened by the close"
        );
        conn.close().await.expect("close");
        a.close().await;
    })
    .await;
}

/// A database that goes back in time (a failover to a replica that lagged, a restore to an
/// earlier point) reopens a run that a process's filter had loaded as closed; other processes
/// then write it again and close it. A process that wrote in between, and so saw the open run
/// behind its filter, drops the filter, and still drops a replay of an ID written into the
/// reopened run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_is_dropped_when_the_database_goes_back_in_time() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "a_filter_is_dropped_when_the_database_goes_back_in_time",
        |url| async move {
            let a = leader(&url, 10).await;
            let task_id = TaskId::random();
            for run in 1..=3 {
                let reports: Vec<NewReport> = (0..10).map(|i| report(task_id, T0 + i)).collect();
                assert_eq!(claim(&a, &reports).await.len(), 10);
                assert_eq!(open_run(&url, run + 1).await, run + 1);
            }
            // `b`'s filter covers runs 0 to 3.
            let b = leader(&url, 1_000_000).await;
            b.warm_up().await.expect("warm up");

            // The database loses the close of run 3 and the IDs in it.
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            for sql in [
                "DELETE FROM claimed_report_ids WHERE run = 3",
                "UPDATE leader_replay_state SET open_run = 3",
            ] {
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            // `b` claims a report: its open run is behind its filter.
            assert_eq!(claim(&b, &[report(task_id, T0 + 5)]).await.len(), 1);
            // Another process writes run 3 again, with an ID `b` never saw, and closes it.
            let c = leader(&url, 10).await;
            let rewritten: Vec<NewReport> = (0..10).map(|i| report(task_id, T0 + i)).collect();
            assert_eq!(claim(&c, &rewritten).await.len(), 10);
            assert_eq!(open_run(&url, 4).await, 4);
            let in_run_3: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM claimed_report_ids WHERE run = 3 AND report_id = $1",
            )
            .bind(&rewritten[0].report_id.0[..])
            .fetch_one(&mut conn)
            .await
            .expect("count");
            assert_eq!(in_run_3, 1);
            conn.close().await.expect("close");

            assert_replay_dropped(&b, task_id, rewritten[0].report_id).await;
            for store in [a, b, c] {
                store.close().await;
            }
        },
    )
    .await;
}
