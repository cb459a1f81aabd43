//! The PostgreSQL schema: upgrades from older versions keep their data, and how rows are stored.
//!
//! Like `postgres.rs`, these tests need `DATABASE_URL` and pass with a note without it.

mod common;

use std::collections::HashSet;

use common::{interval, report, PRECISION, T0};
use duet_core::AggregatorRole;
use duet_messages::dap09::{AggregationJobId, ReportId, TaskId, Time};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::postgres::PostgresDatastore;
use duet_store::{AcquiredAggregationJob, Datastore, HelperAggregationJob, StoreError};
use sqlx::{Connection, PgConnection};

/// Puts every queued report (at most 10) into one new job and leases it.
async fn queued_into_one_job(store: &PostgresDatastore) -> AcquiredAggregationJob {
    assert_eq!(
        store
            .create_aggregation_jobs(10, Time(T0))
            .await
            .expect("create"),
        1,
        "one job"
    );
    let mut jobs = store
        .acquire_aggregation_jobs(Time(T0), 600, 10)
        .await
        .expect("acquire");
    assert_eq!(jobs.len(), 1, "one job to lease");
    jobs.remove(0)
}

/// A database written by schema version 1 (reports as one row each, assigned by `job_id`)
/// keeps every report when it is upgraded: IDs (the Leader's and the Helper's) stay
/// replay-protected, unassigned reports are queued (and aggregated once), and an active job keeps
/// its reports in order until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_data_survives_the_upgrade() {
    with_fresh_database("version_1_data_survives_the_upgrade", |url| async move {
        let migrations_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
        let all = sqlx::migrate::Migrator::new(migrations_dir)
            .await
            .expect("read migrations");
        let version_1 = sqlx::migrate::Migrator {
            migrations: all
                .migrations
                .iter()
                .filter(|m| m.version == 1)
                .cloned()
                .collect::<Vec<_>>()
                .into(),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        version_1.run(&pool).await.expect("migrate to version 1");

        let task_id = TaskId::random();
        let (active, finished) = (AggregationJobId::random(), AggregationJobId::random());
        // (report, job, still has its payload)
        let rows = [
            (report(task_id, T0 + 5), None, true),
            (report(task_id, T0 + 1), None, true),
            (report(task_id, T0 + 3), Some(active), true),
            (report(task_id, T0 + 2), Some(active), true),
            (report(task_id, T0), Some(finished), false),
        ];
        for (r, job, has_payload) in &rows {
            sqlx::query(
                "INSERT INTO reports (task_id, report_id, client_time, payload, job_id) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&r.task_id.0[..])
            .bind(&r.report_id.0[..])
            .bind(r.time.0 as i64)
            .bind(has_payload.then_some(&r.encoded[..]))
            .bind(job.map(|j| j.0.to_vec()))
            .execute(&pool)
            .await
            .expect("insert a version 1 report");
        }
        for (job, state, count) in [(active, "active", 2i64), (finished, "finished", 1)] {
            sqlx::query(
                "INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                 retry_at) VALUES ($1, $2, $3, $4, 0, 0)",
            )
            .bind(&task_id.0[..])
            .bind(&job.0[..])
            .bind(state)
            .bind(count)
            .execute(&pool)
            .await
            .expect("insert a version 1 job");
        }
        // The Helper's side of another task: one report ID it has aggregated.
        let (helper_task, helper_seen) = (TaskId::random(), ReportId::random());
        sqlx::query("INSERT INTO helper_report_ids (task_id, report_id) VALUES ($1, $2)")
            .bind(&helper_task.0[..])
            .bind(&helper_seen.0[..])
            .execute(&pool)
            .await
            .expect("insert a version 1 Helper report ID");
        pool.close().await;

        let store = PostgresDatastore::connect(&url).await.expect("upgrade");
        let everything = interval(T0, PRECISION);
        assert_eq!(
            store
                .count_unaggregated_reports(&task_id, &everything)
                .await
                .expect("count"),
            4,
            "two queued and two in the active job"
        );
        let fresh = store
            .put_reports(&rows.iter().map(|(r, _, _)| r.clone()).collect::<Vec<_>>())
            .await
            .expect("put_reports");
        assert_eq!(
            fresh,
            vec![true; 5],
            "accepted: job creation finds the replays"
        );

        let jobs = store
            .acquire_aggregation_jobs(Time(T0), 600, 10)
            .await
            .expect("acquire");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].job_id, active);
        let held: Vec<_> = jobs[0]
            .reports
            .iter()
            .map(|r| (r.report_id, r.time, r.encoded.clone()))
            .collect();
        assert_eq!(
            held,
            vec![
                (
                    rows[3].0.report_id,
                    rows[3].0.time,
                    rows[3].0.encoded.clone()
                ),
                (
                    rows[2].0.report_id,
                    rows[2].0.time,
                    rows[2].0.encoded.clone()
                ),
            ],
            "the active job keeps its reports, oldest first"
        );
        // Ending it (it carries its reports itself, from before schema version 6) leaves the
        // queued reports alone.
        store
            .abandon_aggregation_job(&jobs[0])
            .await
            .expect("abandon");
        assert_eq!(
            store
                .count_unaggregated_reports(&task_id, &everything)
                .await
                .expect("count"),
            7,
            "the queued: two, and the five uploaded again"
        );

        // The old IDs are replays: the queued reports are aggregated once (their IDs, recorded
        // on upload by version 1, were moved out of the way by version 5), the others not again.
        let job = queued_into_one_job(&store).await;
        let queued: Vec<_> = job.reports.iter().map(|r| r.report_id).collect();
        assert_eq!(queued, vec![rows[1].0.report_id, rows[0].0.report_id]);
        // Uploaded once more, they are replays through a loaded filter too.
        store.warm_up().await.expect("warm up");
        store
            .put_reports(&[rows[4].0.clone(), rows[2].0.clone()])
            .await
            .expect("put_reports");
        assert_eq!(
            store
                .create_aggregation_jobs(10, Time(T0))
                .await
                .expect("create"),
            0,
            "no job of replays"
        );

        let helper = store.with_role(AggregatorRole::Helper);
        let other = ReportId::random();
        let seen = helper
            .seen_report_ids(&helper_task, &[helper_seen, other])
            .await
            .expect("seen_report_ids");
        assert_eq!(
            seen,
            HashSet::from([helper_seen]),
            "the Helper's IDs stay replay-protected"
        );
        // A job that takes one in again is refused, before and after the filter is loaded.
        for warm in [false, true] {
            if warm {
                helper.warm_up().await.expect("warm up");
            }
            let job = HelperAggregationJob {
                task_id: helper_task,
                id: AggregationJobId::random(),
                request_hash: [0; 32],
                step: 0,
                response: Vec::new(),
            };
            let no_merge = |_: &[u8], _: &[u8]| Err("no aggregates".to_string());
            let put = helper
                .put_helper_aggregation_job(
                    &job,
                    &[ReportId::random(), helper_seen],
                    &[],
                    &no_merge,
                )
                .await;
            assert!(matches!(put, Err(StoreError::Conflict)), "{put:?}");
        }
        store.close().await;
    })
    .await;
}

/// Queued payloads are stored as they are: never compressed (ciphertexts do not compress, so
/// trying only costs), in their row up to nearly a page, out of line only beyond that. Zeros
/// would compress well, so a compression attempt would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_payloads_stay_in_line_uncompressed() {
    with_fresh_database("queued_payloads_stay_in_line", |url| async move {
        let store = PostgresDatastore::connect(&url).await.expect("connect");
        let task_id = TaskId::random();
        let mut reports = Vec::new();
        for (size, offset) in [(3_000, 0), (6_000, 1), (20_000, 2)] {
            let mut r = report(task_id, T0 + offset);
            r.encoded = vec![0; size];
            r.encoded[..16].copy_from_slice(&r.report_id.0);
            reports.push(r);
        }
        store.put_reports(&reports).await.expect("put_reports");

        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let stored: Vec<(i32, Option<String>)> = sqlx::query_as(
            "SELECT octet_length(payload), pg_column_compression(payload) \
             FROM report_queue ORDER BY client_time",
        )
        .fetch_all(&mut conn)
        .await
        .expect("read the queue");
        assert_eq!(
            stored,
            vec![(3_000, None), (6_000, None), (20_000, None)],
            "stored uncompressed"
        );
        let toast: String = sqlx::query_scalar(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'report_queue'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("find the TOAST table");
        let out_of_line: i64 =
            sqlx::query_scalar(&format!("SELECT count(DISTINCT chunk_id) FROM {toast}"))
                .fetch_one(&mut conn)
                .await
                .expect("read the TOAST table");
        assert_eq!(
            out_of_line, 1,
            "only the payload larger than a page is out of line"
        );
        conn.close().await.expect("close");

        let held: Vec<_> = queued_into_one_job(&store)
            .await
            .reports
            .iter()
            .map(|r| (r.report_id, r.encoded.clone()))
            .collect();
        let sent: Vec<_> = reports
            .iter()
            .map(|r| (r.report_id, r.encoded.clone()))
            .collect();
        assert_eq!(held, sent, "the job gets every payload back intact");
        store.close().await;
    })
    .await;
}

/// Columns holding ciphertexts, random IDs or secret shares are stored without a compression
/// attempt (`STORAGE EXTERNAL`): such bytes never compress, so trying only costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompressible_columns_skip_compression() {
    with_fresh_database(
        "incompressible_columns_skip_compression",
        |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let mut columns: Vec<(String, String)> = sqlx::query_as(
                "SELECT c.relname::text, a.attname::text FROM pg_attribute AS a \
             JOIN pg_class AS c ON c.oid = a.attrelid \
             JOIN pg_namespace AS n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind = 'r' AND a.attnum > 0 \
               AND a.attstorage = 'e'",
            )
            .fetch_all(&mut conn)
            .await
            .expect("read the catalog");
            columns.sort();
            let expected = [
                ("aggregation_jobs", "client_times"),
                ("aggregation_jobs", "payloads"),
                ("aggregation_jobs", "report_ids"),
                ("batch_aggregations", "aggregate_share"),
                ("helper_aggregation_jobs", "response"),
                ("report_queue", "payload"),
            ];
            assert_eq!(
                columns,
                expected.map(|(t, c)| (t.to_string(), c.to_string())),
            );
            conn.close().await.expect("close");
            store.close().await;
        },
    )
    .await;
}
