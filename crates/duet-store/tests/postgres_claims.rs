//! The Leader's claim cursor on PostgreSQL: job creation claims only uploads older than every
//! running transaction, so that no upload commits behind the cursor.
//!
//! Like `postgres.rs`, these tests need `DATABASE_URL` and pass with a note without it.

mod common;

use common::{interval, next_wakeup, report, PRECISION, T0};
use duet_messages::dap09::{ReportId, TaskId, Time};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::conformance::unaggregated;
use duet_store::postgres::PostgresDatastore;
use duet_store::{Datastore, NewReport, Wakeup};
use sqlx::{Connection, PgConnection};

/// A connection of its own with a transaction begun on it.
async fn begin(url: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    conn
}

/// These tests hold transactions open, which holds back job creation on the whole server (the
/// horizon is the server's): they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Job creation claims only uploads older than every running transaction: a report committed
/// after an older transaction began could otherwise be passed by the claim cursor while an upload
/// of that older transaction was still to commit behind it. Held-back uploads make no partial
/// job (full ones still go ahead), bring a `ReportsStored` wake-up for a later pass, and are
/// claimed, each once, when the older transaction has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_claim_only_uploads_older_than_running_transactions() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "jobs_claim_only_uploads_older_than_running_transactions",
        |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let listener = PostgresDatastore::connect(&url).await.expect("connect");
            let mut rx = listener.wakeups().expect("PostgreSQL has wake-ups");
            assert_eq!(next_wakeup(&mut rx).await, Wakeup::Listening);
            let task_id = TaskId::random();
            let before: Vec<NewReport> = (0..4).map(|i| report(task_id, T0 + i)).collect();
            store.put_reports(&before).await.expect("put_reports");
            assert_eq!(next_wakeup(&mut rx).await, Wakeup::ReportsStored);

            // An older transaction, with an ID, still running while later reports are uploaded.
            let mut older = begin(&url).await;
            sqlx::query("SELECT pg_current_xact_id()")
                .execute(&mut older)
                .await
                .expect("take a transaction ID");
            let after: Vec<NewReport> = (4..7).map(|i| report(task_id, T0 + i)).collect();
            store.put_reports(&after).await.expect("put_reports");
            assert_eq!(next_wakeup(&mut rx).await, Wakeup::ReportsStored);

            let now = Time(T0 + PRECISION);
            assert_eq!(
                store.create_aggregation_jobs(2, now).await.expect("create"),
                2,
                "the two full jobs of the earlier uploads, no partial one of the later"
            );
            // One wake-up per job, and one for the held-back uploads.
            let mut woken = Vec::new();
            while woken.len() < 3 {
                woken.push(next_wakeup(&mut rx).await);
            }
            let created = woken
                .iter()
                .filter(|w| **w == Wakeup::AggregationJobsCreated)
                .count();
            assert_eq!(created, 2, "{woken:?}");
            assert!(
                woken.contains(&Wakeup::ReportsStored),
                "held-back uploads bring the creators back: {woken:?}"
            );
            assert_eq!(
                store
                    .count_unaggregated_reports(&task_id, &interval(T0, PRECISION))
                    .await
                    .expect("count"),
                7
            );

            sqlx::query("COMMIT")
                .execute(&mut older)
                .await
                .expect("commit");
            older.close().await.expect("close");
            assert_eq!(
                store.create_aggregation_jobs(2, now).await.expect("create"),
                2,
                "the later uploads, once the older transaction has ended"
            );
            assert_eq!(
                store.create_aggregation_jobs(2, now).await.expect("create"),
                0
            );
            let jobs = store
                .acquire_aggregation_jobs(now, 300, 10)
                .await
                .expect("acquire");
            let mut sizes: Vec<usize> = jobs.iter().map(|j| j.reports.len()).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, vec![1, 2, 2, 2]);
            let mut claimed: Vec<ReportId> = jobs
                .iter()
                .flat_map(|j| j.reports.iter().map(|r| r.report_id))
                .collect();
            claimed.sort_unstable_by_key(|id| id.0);
            let mut all: Vec<ReportId> = before.iter().chain(&after).map(|r| r.report_id).collect();
            all.sort_unstable_by_key(|id| id.0);
            assert_eq!(claimed, all, "every report in exactly one job");

            // Ending a job deletes its reports (and no others) from the queue.
            for job in &jobs {
                store.abandon_aggregation_job(job).await.expect("abandon");
            }
            assert_eq!(
                store
                    .count_unaggregated_reports(&task_id, &interval(T0, PRECISION))
                    .await
                    .expect("count"),
                0
            );
            listener.close().await;
            store.close().await;
        },
    )
    .await;
}

/// Deleting a task moves its claim cursor past its deleted reports, but not past an upload still
/// running: committed later, that upload is claimed (as it would be for the task added again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_task_strands_no_running_upload() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "deleting_a_task_strands_no_running_upload",
        |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            // The store needs no task row for its queue; `delete_task` deletes the queue either way.
            let task_id = TaskId::random();
            store
                .put_reports(&[report(task_id, T0)])
                .await
                .expect("put_reports");
            let task_key: i32 =
                sqlx::query_scalar("SELECT task_key FROM replay_tasks WHERE task_id = $1")
                    .bind(&task_id.0[..])
                    .fetch_one(&mut PgConnection::connect(&url).await.expect("connect"))
                    .await
                    .expect("the task's key");

            // An upload still running (older) while a later one commits and the task is deleted.
            let mut running = begin(&url).await;
            let late = report(task_id, T0 + 1);
            sqlx::query(
                "INSERT INTO report_queue (task_key, client_time, report_id, payload) \
             VALUES ($1, $2, $3, $4)",
            )
            .bind(task_key)
            .bind(i64::try_from(late.time.0).expect("time"))
            .bind(&late.report_id.0[..])
            .bind(&late.encoded[..])
            .execute(&mut running)
            .await
            .expect("upload");
            store
                .put_reports(&[report(task_id, T0 + 2)])
                .await
                .expect("put_reports");
            store.delete_task(&task_id).await.expect("delete_task");
            sqlx::query("COMMIT")
                .execute(&mut running)
                .await
                .expect("commit");
            running.close().await.expect("close");

            let now = Time(T0 + PRECISION);
            assert_eq!(
                store
                    .create_aggregation_jobs(10, now)
                    .await
                    .expect("create"),
                1
            );
            let jobs = store
                .acquire_aggregation_jobs(now, 300, 10)
                .await
                .expect("acquire");
            let claimed: Vec<ReportId> = jobs
                .iter()
                .flat_map(|j| j.reports.iter().map(|r| r.report_id))
                .collect();
            assert_eq!(claimed, vec![late.report_id], "the upload that was running");
            store.close().await;
        },
    )
    .await;
}

/// Deleting a task waits for a creator of the task's job that has claimed but not committed
/// (it holds the task's job-creation lock), so that the job does not outlive its task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_task_waits_for_its_job_creator() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "deleting_a_task_waits_for_its_job_creator",
        |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            store
                .put_reports(&[report(task_id, T0)])
                .await
                .expect("put_reports");
            // A creator of the task's job, between its claim and its commit.
            let mut creator = begin(&url).await;
            let locked: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_xact_lock(1685415284, task_key) FROM replay_tasks \
                 WHERE task_id = $1",
            )
            .bind(&task_id.0[..])
            .fetch_one(&mut creator)
            .await
            .expect("the job-creation lock");
            assert!(locked);
            sqlx::query(
                "INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                   retry_at) VALUES ($1, $2, 'active', 1, 0, 0)",
            )
            .bind(&task_id.0[..])
            .bind(&[7u8; 16][..])
            .execute(&mut creator)
            .await
            .expect("the job");
            let deleting = {
                let store = store.clone();
                tokio::spawn(async move { store.delete_task(&task_id).await })
            };
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert!(!deleting.is_finished(), "deleted under a job creator");
            sqlx::query("COMMIT")
                .execute(&mut creator)
                .await
                .expect("commit");
            creator.close().await.expect("close");
            deleting.await.expect("deleting").expect("delete_task");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let jobs: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM aggregation_jobs WHERE task_id = $1")
                    .bind(&task_id.0[..])
                    .fetch_one(&mut conn)
                    .await
                    .expect("count");
            assert_eq!(jobs, 0, "the creator's job outlived its task");
            conn.close().await.expect("close");
            store.close().await;
        },
    )
    .await;
}

/// Unaggregated reports are counted from the first active job's range (or the claim cursor):
/// an active job between ended ones still counts, behind the cursor, from the first report of
/// its range even when that shares its upload transaction with an ended job's last one; so do
/// reports not yet claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaggregated_reports_count_from_the_first_active_range() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "unaggregated_reports_count_from_the_first_active_range",
        |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            // Three uploads, each its own transaction: 4 reports, 6, 4.
            for (start, n) in [(0, 4), (10, 6), (20, 4)] {
                let batch: Vec<NewReport> =
                    (0..n).map(|i| report(task_id, T0 + start + i)).collect();
                store.put_reports(&batch).await.expect("put_reports");
            }
            // Jobs of 5 in claim order: the first takes the second upload's first report.
            let now = Time(T0 + PRECISION);
            assert_eq!(
                store.create_aggregation_jobs(5, now).await.expect("create"),
                3
            );
            let jobs = store
                .acquire_aggregation_jobs(now, 600, 10)
                .await
                .expect("acquire");
            let starting_at = |t: u64| {
                jobs.iter()
                    .find(|j| j.reports[0].time == Time(T0 + t))
                    .expect("a job starting there")
            };
            let keep_first = |a: &[u8], _: &[u8]| Ok(a.to_vec());
            store
                .finish_aggregation_job(starting_at(0), &[], &keep_first)
                .await
                .expect("finish");
            // The second job's row is rewritten after the third's, so that it comes later in
            // the active jobs' index.
            store
                .release_aggregation_job(starting_at(11), now)
                .await
                .expect("release");
            let unclaimed: Vec<NewReport> = (0..2).map(|i| report(task_id, T0 + 30 + i)).collect();
            store.put_reports(&unclaimed).await.expect("put_reports");

            let count = |start, duration| unaggregated(&store, task_id, start, duration);
            assert_eq!(
                count(T0, PRECISION).await,
                11,
                "two active jobs and the unclaimed"
            );
            assert_eq!(count(T0, 11).await, 0, "the ended job's");
            assert_eq!(count(T0 + 11, 9).await, 5, "the second job's");
            assert_eq!(count(T0 + 20, 10).await, 4, "the third job's");
            assert_eq!(count(T0 + 30, 10).await, 2, "the unclaimed");
            store.close().await;
        },
    )
    .await;
}

/// Moves every stored transaction ID 2⁴⁰ past the server's, as a restore into another server
/// leaves them (`pg_dump` keeps the values; the new server numbers its own from far below).
async fn as_if_restored_elsewhere(url: &str) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let shifted = |column: &str| format!("({column}::text::numeric + 1099511627776)::text::xid8");
    for statement in [
        format!(
            "UPDATE replay_tasks SET claimed_xid = {}",
            shifted("claimed_xid")
        ),
        format!(
            "UPDATE aggregation_jobs SET from_xid = {}, to_xid = {} WHERE from_xid IS NOT NULL",
            shifted("from_xid"),
            shifted("to_xid")
        ),
        format!(
            "UPDATE report_queue SET upload_xid = {}",
            shifted("upload_xid")
        ),
    ] {
        sqlx::query(&statement)
            .execute(&mut conn)
            .await
            .expect("shift the transaction IDs");
    }
    conn.close().await.expect("close");
}

/// Every stored transaction ID, as text, in a fixed order.
async fn stored_xids(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let xids = sqlx::query_scalar(
        "SELECT x FROM (SELECT 1 AS t, claimed_xid::text AS x, task_key::text AS k \
           FROM replay_tasks \
         UNION ALL SELECT 2, from_xid::text || '-' || to_xid::text, encode(job_id, 'hex') \
           FROM aggregation_jobs \
         UNION ALL SELECT 3, upload_xid::text, encode(report_id, 'hex') FROM report_queue) AS a \
         ORDER BY t, k",
    )
    .fetch_all(&mut conn)
    .await
    .expect("stored transaction IDs");
    conn.close().await.expect("close");
    xids
}

/// A database restored into another server holds transaction IDs past that server's: its uploads
/// would sort behind every claim cursor and its queue would wait for transactions that never
/// end. Connecting renumbers the stored IDs in their order, so that an active job still reads its
/// own reports (its range begins and ends inside upload batches), the queued reports are claimed
/// after it, and new uploads after them, each once, and so are reports that a version without
/// the renumbering accepted after the restore; a later connection changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_into_another_server_claims_every_report() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "a_database_restored_into_another_server_claims_every_report",
        |url| async move {
            let before = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            let mut all: Vec<ReportId> = Vec::new();
            let mut upload = |store: PostgresDatastore, start: u64, n: u64| {
                let batch: Vec<NewReport> =
                    (0..n).map(|i| report(task_id, T0 + start + i)).collect();
                all.extend(batch.iter().map(|r| r.report_id));
                async move { store.put_reports(&batch).await.expect("put_reports") }
            };
            // Five uploads of two reports, cut into jobs of 5: the first job ends; the second,
            // active, begins and ends inside an upload and spans the one between.
            for start in [0, 10, 20, 30, 40] {
                upload(before.clone(), start, 2).await;
            }
            let now = Time(T0 + PRECISION);
            assert_eq!(
                before
                    .create_aggregation_jobs(5, now)
                    .await
                    .expect("create"),
                2
            );
            let jobs = before
                .acquire_aggregation_jobs(now, 600, 10)
                .await
                .expect("acquire");
            let first = jobs
                .iter()
                .find(|j| j.reports[0].time == Time(T0))
                .expect("the first job");
            let second = jobs
                .iter()
                .find(|j| j.reports[0].time == Time(T0 + 21))
                .expect("the second job");
            let keep_first = |a: &[u8], _: &[u8]| Ok(a.to_vec());
            before
                .finish_aggregation_job(first, &[], &keep_first)
                .await
                .expect("finish");
            before
                .release_aggregation_job(second, now)
                .await
                .expect("release");
            // Two more uploads, not yet claimed, the first with client times before the
            // cursor's (claim order is by upload transaction first).
            upload(before.clone(), 5, 4).await;
            upload(before.clone(), 50, 2).await;

            as_if_restored_elsewhere(&url).await;
            assert_eq!(
                before
                    .create_aggregation_jobs(5, now)
                    .await
                    .expect("create"),
                0,
                "without renumbering the queue waits"
            );
            // An upload served before renumbering (by a version without it) sorts behind the
            // cursor, in no job's range.
            upload(before.clone(), 55, 2).await;
            assert_eq!(
                before
                    .create_aggregation_jobs(5, now)
                    .await
                    .expect("create"),
                0
            );
            before.close().await;

            let store = PostgresDatastore::connect(&url).await.expect("connect");
            upload(store.clone(), 60, 2).await;
            assert_eq!(
                store.create_aggregation_jobs(5, now).await.expect("create"),
                2,
                "the queued reports, the stranded ones and the new uploads"
            );
            let renumbered = stored_xids(&url).await;
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let past: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM replay_tasks WHERE claimed_xid >= x) \
                   + (SELECT count(*) FROM aggregation_jobs WHERE to_xid >= x OR from_xid >= x) \
                   + (SELECT count(*) FROM report_queue WHERE upload_xid >= x) \
                 FROM (SELECT pg_snapshot_xmax(pg_current_snapshot()) AS x) AS s",
            )
            .fetch_one(&mut conn)
            .await
            .expect("count");
            conn.close().await.expect("close");
            assert_eq!(past, 0, "no ID past the server's, the ended job's included");
            let again = PostgresDatastore::connect(&url).await.expect("connect");
            again.close().await;
            assert_eq!(stored_xids(&url).await, renumbered, "renumbered once");

            let jobs = store
                .acquire_aggregation_jobs(now, 600, 10)
                .await
                .expect("acquire");
            let mut sizes: Vec<usize> = jobs.iter().map(|j| j.reports.len()).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, vec![5, 5, 5]);
            let mut claimed: Vec<ReportId> = jobs
                .iter()
                .flat_map(|j| j.reports.iter().map(|r| r.report_id))
                .collect();
            claimed.sort_unstable_by_key(|id| id.0);
            let ended: Vec<ReportId> = first.reports.iter().map(|r| r.report_id).collect();
            all.retain(|id| !ended.contains(id));
            all.sort_unstable_by_key(|id| id.0);
            assert_eq!(
                claimed, all,
                "every report not yet aggregated, in exactly one job"
            );
            let count = || unaggregated(&store, task_id, T0, PRECISION);
            assert_eq!(count().await, 15);
            for job in &jobs {
                store.abandon_aggregation_job(job).await.expect("abandon");
            }
            assert_eq!(count().await, 0);
            store.close().await;
        },
    )
    .await;
}

/// A report uploaded twice (a client's retry: same ID, same time) before a restore gets, with
/// its copy, one renumbered transaction ID, so that the two copies tie in claim order. Only one
/// is kept: a job claiming the first would otherwise read the second in its range too, and name
/// the report twice to the Helper, which refuses the whole job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_uploaded_twice_before_a_restore_is_claimed_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    with_fresh_database(
        "a_report_uploaded_twice_before_a_restore_is_claimed_once",
        |url| async move {
            let before = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            let twice = report(task_id, T0 + 1);
            let other = report(task_id, T0 + 2);
            for batch in [
                vec![twice.clone()],
                vec![twice.clone()],
                vec![other.clone()],
            ] {
                before.put_reports(&batch).await.expect("put_reports");
            }
            before.close().await;
            as_if_restored_elsewhere(&url).await;

            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let now = Time(T0 + PRECISION);
            assert_eq!(
                store.create_aggregation_jobs(1, now).await.expect("create"),
                2
            );
            let jobs = store
                .acquire_aggregation_jobs(now, 600, 10)
                .await
                .expect("acquire");
            let mut claimed: Vec<[u8; 16]> = jobs
                .iter()
                .flat_map(|j| j.reports.iter().map(|r| r.report_id.0))
                .collect();
            claimed.sort_unstable();
            let mut expected = vec![twice.report_id.0, other.report_id.0];
            expected.sort_unstable();
            assert_eq!(claimed, expected, "each report in one job, once");
            for job in &jobs {
                store.abandon_aggregation_job(job).await.expect("abandon");
            }
            assert_eq!(unaggregated(&store, task_id, T0, PRECISION).await, 0);
            store.close().await;
        },
    )
    .await;
}
