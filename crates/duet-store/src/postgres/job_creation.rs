//! Leader: aggregation job creation. Each job is one transaction: it claims the next queued
//! reports of a task, admits their IDs into the open replay run, probes the closed runs for the
//! IDs the filter cannot rule out, moves the task's claim cursor and inserts the job row (see
//! [`leader`](super::leader) for the queue and [`runs`](super::runs) for the replay runs).

use std::time::Duration;

use duet_messages::dap09::{AggregationJobId, TaskId, Time};
use sqlx::PgConnection;

use super::{
    col, col_array, col_u64, is_unique_violation, limit_i64, notify, runs, to_i64,
    PostgresDatastore, TxError,
};
use crate::{CreatedJobs, JobSizes, StoreError, Wakeup};

/// The reports the job of task `$1` (replay key `$5`) claims: up to `$2` reports in claim order
/// (upload transaction, time, ID) after the task's claim cursor, read from the index in that
/// order (`next` reads one more, to see whether later uploads are held back). Only reports
/// uploaded by transactions older than every transaction still running are claimed (`horizon`),
/// so no upload can commit behind the cursor later; in claim order they come before all others.
/// None are claimed if another creator holds the task's job-creation lock (an advisory lock held
/// until the statement's transaction ends, taken without waiting; task deletion waits for it), and none if fewer than `$2`
/// are claimable while later uploads are held back (`waiting`), unless `$6`: the caller waits for
/// the horizon instead of creating a partial job. `moved` advances the cursor past the claimed
/// reports, unless a concurrent creator moved it since this statement's snapshot; everything
/// else the statement writes depends on `moved`. So a task's jobs are created one transaction
/// after another, each claiming the oldest uploads left, and of two uploads of one ID the first
/// is claimed first: the second is the replay that job creation drops.
macro_rules! claim {
    () => {
        "WITH cursor AS ( \
           SELECT claimed_xid, claimed_time, claimed_id FROM replay_tasks \
           WHERE task_key = $5 AND (SELECT pg_try_advisory_xact_lock(1685415284, $5))), \
         horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin), \
         next AS ( \
           SELECT ctid AS pos, upload_xid, client_time, report_id FROM report_queue \
           WHERE task_key = $5 AND (upload_xid, client_time, report_id) > ( \
             (SELECT claimed_xid FROM cursor), (SELECT claimed_time FROM cursor), \
             (SELECT claimed_id FROM cursor)) \
           ORDER BY upload_xid, client_time, report_id LIMIT $2 + 1), \
         picked AS ( \
           SELECT * FROM next WHERE upload_xid < (SELECT xmin FROM horizon) \
           ORDER BY upload_xid, client_time, report_id LIMIT $2), \
         held AS ( \
           SELECT EXISTS ( \
             SELECT 1 FROM next WHERE upload_xid >= (SELECT xmin FROM horizon)) AS back), \
         waiting AS ( \
           SELECT EXISTS (SELECT 1 FROM cursor) AND (SELECT COUNT(*) FROM picked) < $2 \
             AND back AND NOT $6 AS wait FROM held), \
         moved AS ( \
           UPDATE replay_tasks AS t SET claimed_xid = l.upload_xid, \
             claimed_time = l.client_time, claimed_id = l.report_id \
           FROM (SELECT upload_xid, client_time, report_id FROM picked \
                 ORDER BY upload_xid DESC, client_time DESC, report_id DESC LIMIT 1) AS l, \
             cursor AS c, waiting AS w \
           WHERE t.task_key = $5 AND NOT w.wait AND t.claimed_xid = c.claimed_xid \
             AND t.claimed_time = c.claimed_time AND t.claimed_id = c.claimed_id \
           RETURNING c.claimed_xid AS from_xid, c.claimed_time AS from_time, \
             c.claimed_id AS from_id, t.claimed_xid AS to_xid, t.claimed_time AS to_time, \
             t.claimed_id AS to_id), "
    };
}

/// The job `$3` (created at `$4`) holding the claimed reports in `$kept` (a CTE of `pos`
/// values), and the statement's result: how many reports it claimed, how many jobs it created
/// (0 or 1), whether it waited, whether later uploads are held back, whether it lost a race for
/// the cursor (`raced`: it picked reports, did not wait, and moved nothing, because a creator
/// that committed after this statement's snapshot but before it took the task's lock moved the
/// cursor, or deleted the task; the statement then runs again on a fresh snapshot), the IDs it
/// inserted into the open replay run (`$ids`, rows of `report_id` values) and that run.
macro_rules! job_of {
    ($kept:literal, $ids:literal) => {
        concat!(
            "job AS ( \
               INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, created_at, \
                 retry_at, from_xid, from_time, from_id, to_xid, to_time, to_id) \
               SELECT $1, $3, 'active', (SELECT COUNT(*) FROM ",
            $kept,
            "), $4, $4, from_xid, from_time, from_id, to_xid, to_time, to_id FROM moved \
               WHERE EXISTS (SELECT 1 FROM ",
            $kept,
            ") RETURNING 1) \
             SELECT (SELECT COUNT(*) FROM picked) * (SELECT COUNT(*) FROM moved) AS claimed, \
               (SELECT COUNT(*) FROM job) AS jobs, (SELECT wait FROM waiting) AS waiting, \
               (SELECT back FROM held) AS held_back, \
               (EXISTS (SELECT 1 FROM picked) AND NOT EXISTS (SELECT 1 FROM moved) \
                 AND NOT (SELECT wait FROM waiting)) AS raced, \
               ARRAY(SELECT report_id FROM ",
            $ids,
            ") AS ids, (SELECT open_run FROM open) AS open_run"
        )
    };
}

/// Claims the reports of a job and admits their IDs into the open replay run (see `runs`),
/// expecting no replay: a plain insert, one unique-index probe per ID, which fails the statement
/// on a replay within the open run. The closed runs are probed after it, by [`CLOSED_RUNS`].
const CREATE_JOB: &str = concat!(
    "-- create_aggregation_jobs\n",
    claim!(),
    "open AS (SELECT open_run FROM leader_replay_state), \
     ids AS ( \
       INSERT INTO claimed_report_ids (run, task_key, report_id, client_time) \
       SELECT (SELECT open_run FROM open), $5, report_id, client_time FROM picked \
       WHERE EXISTS (SELECT 1 FROM moved) ORDER BY report_id), ",
    job_of!("picked", "picked WHERE EXISTS (SELECT 1 FROM moved)")
);

/// Claims the reports of a job and drops the replays among them from the queue: of an ID claimed
/// more than once the first upload is kept, and an ID already in the open run (claimed before,
/// or by a concurrent creator that has committed since) or found in a closed one (`$7`) is
/// dropped.
const CREATE_JOB_DROPPING_REPLAYS: &str = concat!(
    "-- create_aggregation_jobs\n",
    claim!(),
    "open AS (SELECT open_run FROM leader_replay_state), \
     once AS ( \
       SELECT DISTINCT ON (report_id) pos, report_id, client_time FROM picked \
       WHERE EXISTS (SELECT 1 FROM moved) AND report_id <> ALL($7::bytea[]) \
       ORDER BY report_id, upload_xid), \
     fresh AS ( \
       INSERT INTO claimed_report_ids (run, task_key, report_id, client_time) \
       SELECT (SELECT open_run FROM open), $5, report_id, client_time FROM once \
       ORDER BY report_id ON CONFLICT DO NOTHING RETURNING report_id), \
     kept AS (SELECT once.pos FROM once JOIN fresh USING (report_id)), \
     dropped AS ( \
       DELETE FROM report_queue WHERE ctid = ANY(ARRAY( \
         SELECT pos FROM picked \
         WHERE EXISTS (SELECT 1 FROM moved) AND pos NOT IN (SELECT pos FROM kept)))), ",
    job_of!("kept", "fresh")
);

/// Which of the IDs a job claims for task key `$1` are in a closed replay run: those of `$2`
/// (the filter may hold them) in any run below the open one, `$4`, and those of `$3` (the filter
/// lacks them) in the runs from `$5`, the first the filter does not cover. One primary-key probe
/// per ID and run, as in the Helper's check.
const CLOSED_RUNS: &str = "-- create_aggregation_jobs\n\
     SELECT u.id AS report_id FROM UNNEST($2::bytea[]) AS u(id) \
     CROSS JOIN LATERAL ( \
       SELECT 1 FROM claimed_report_ids c \
       WHERE c.run = ANY(ARRAY(SELECT generate_series(0, $4 - 1))) \
         AND c.task_key = $1 AND c.report_id = u.id LIMIT 1) AS seen \
     UNION ALL \
     SELECT u.id FROM UNNEST($3::bytea[]) AS u(id) \
     CROSS JOIN LATERAL ( \
       SELECT 1 FROM claimed_report_ids c \
       WHERE c.run = ANY(ARRAY(SELECT generate_series($5, $4 - 1))) \
         AND c.task_key = $1 AND c.report_id = u.id LIMIT 1) AS seen";

/// Opens a job's transaction: takes the replay runs' lock shared (see `runs`) and turns
/// sequential and bitmap scans off for the rest of the transaction. A claim must read the task's
/// queue in claim order from `report_queue_order` and stop after the job's reports. The
/// planner's estimate of the reports past the cursor can be a few dozen however many are queued
/// (a guess for the row comparison, scaled by statistics taken when the queue's pages were
/// mostly empty), and then the custom plan (a connection's first five runs of a statement) reads
/// every queued report, by a sequential or bitmap scan, and sorts them: a cost that grows with
/// the backlog (in the bench, claims of 1,000 reports read up to 15,000, and after job creation
/// stopped for a while they would read millions). The transaction's other reads are
/// primary-key probes, and the sequential scans of one-row tables stay as they are; but
/// the cost the settings add to those scans would make the statement worth compiling to the
/// planner, which takes a third of a second, so just-in-time compilation is off too.
const LOCK_RUNS: &str = "-- create_aggregation_jobs\n\
     SELECT pg_advisory_xact_lock_shared($1), set_config('enable_seqscan', 'off', true), \
       set_config('enable_bitmapscan', 'off', true), set_config('jit', 'off', true)";

/// The tasks that have unclaimed reports (every task with queued reports has a cursor:
/// `put_reports` creates it): one index probe per task, at its claim cursor, past the reports
/// of its active jobs and the index entries of deleted ones.
const TASKS_WITH_UNCLAIMED: &str = "-- create_aggregation_jobs\n\
     SELECT k.task_id FROM replay_tasks AS k CROSS JOIN LATERAL ( \
       SELECT 1 FROM report_queue AS q \
       WHERE q.task_key = k.task_key AND (q.upload_xid, q.client_time, q.report_id) \
         > (k.claimed_xid, k.claimed_time, k.claimed_id) \
       ORDER BY q.upload_xid, q.client_time, q.report_id LIMIT 1) AS unclaimed \
     ORDER BY k.task_key";

/// The first wait for older transactions to end, when they hold back uploads a partial job
/// would claim; each next wait is twice as long, up to `MAX_HORIZON_WAIT` in all.
const FIRST_HORIZON_WAIT: Duration = Duration::from_millis(1);
/// How long a job-creation pass waits, over all tasks, for held-back uploads before it creates
/// partial jobs without them.
const MAX_HORIZON_WAIT: Duration = Duration::from_secs(1);

/// READ COMMITTED plus a per-task advisory lock, tried without waiting: a creator skips a task
/// whose job another creator is creating. Each job is its own transaction: the replay runs' lock
/// shared (see `runs`), then one statement that claims up to `max_job_size` reports, admits their
/// IDs into the open replay run (in key order, so that consecutive inserts share the index's
/// upper pages), moves the task's claim cursor past them and inserts the job row naming their
/// range, then the probe of the closed runs for the IDs the filter cannot rule out (none, most
/// of the time: then no statement). Replays are rare, so a job's first attempt expects none; if
/// one fails it with a unique violation, or the probe finds one, the job runs again, dropping
/// replays. Uploads held back by an older running transaction are waited for (up to 1 s per
/// pass) rather than left out of a partial job; if some are still held back at the end, a
/// `ReportsStored` wake-up brings the creators back for them (with a warning if the wait ran
/// out). Each job's transaction sends an `AggregationJobsCreated` wake-up. A task `sizes` gives
/// no size is skipped, and listed in the result.
pub(super) async fn create_aggregation_jobs(
    store: &PostgresDatastore,
    sizes: &JobSizes,
    now: Time,
) -> Result<CreatedJobs, TxError> {
    let now = to_i64(now.0, "time")?;
    let mut conn = store.pool.acquire().await?;
    // The tasks that have unclaimed reports (every task with queued reports has a cursor:
    // `put_reports` creates it): one index probe per task, at its claim cursor, past the reports
    // of its active jobs and the index entries of deleted ones.
    let task_rows = sqlx::query(TASKS_WITH_UNCLAIMED)
        .fetch_all(&mut *conn)
        .await?;
    let mut created = CreatedJobs::default();
    let mut held_back = false;
    // One budget for the pass, whatever the number of tasks.
    let mut waited = Duration::ZERO;
    let mut wait = FIRST_HORIZON_WAIT;
    for task_row in task_rows {
        let task_id: [u8; 32] = col_array(&task_row, "task_id")?;
        // A task with no size keeps its reports for a later pass.
        let Some(max_job_size) = sizes.of(&TaskId(task_id)) else {
            created.unsized_tasks.push(TaskId(task_id));
            continue;
        };
        // The limit plus one must fit a BIGINT (`next` reads one more).
        let limit = limit_i64(max_job_size).min(i64::MAX - 1);
        let task_key = store.task_key(&TaskId(task_id)).await?;
        loop {
            let job_id = AggregationJobId::random();
            let partial_ok = waited >= MAX_HORIZON_WAIT;
            let job = |sql| {
                sqlx::query(sql)
                    .bind(&task_id[..])
                    .bind(limit)
                    .bind(&job_id.0[..])
                    .bind(now)
                    .bind(task_key)
                    .bind(partial_ok)
            };
            // Replays are rare, so the first attempt expects none. A replay within the open run
            // fails its statement; one in a closed run is found by the probe after it. Either
            // way the job is created again, dropping them (the IDs found in closed runs listed):
            // its claim may differ (another creator may have claimed in between), so its IDs
            // are probed again.
            let mut dropping = false;
            let mut replayed: Vec<[u8; 16]> = Vec::new();
            let row = loop {
                let mut tx = sqlx::Connection::begin_with(
                    &mut *conn,
                    "BEGIN ISOLATION LEVEL READ COMMITTED",
                )
                .await?;
                // The runs' lock shared, held to the commit: the open run does not close under
                // this job (see `runs`). A statement of its own, before the claim's snapshot,
                // inside the transaction (a failed or cancelled wait then rolls back with it).
                sqlx::query(LOCK_RUNS)
                    .bind(runs::LEADER.lock)
                    .execute(&mut *tx)
                    .await?;
                let created = if dropping {
                    job(CREATE_JOB_DROPPING_REPLAYS)
                        .bind(replayed.clone())
                        .fetch_one(&mut *tx)
                        .await
                } else {
                    job(CREATE_JOB).fetch_one(&mut *tx).await
                };
                let row = match created {
                    Err(e) if is_unique_violation(&e) && !dropping => {
                        tx.rollback().await?;
                        dropping = true;
                        continue;
                    }
                    row => row?,
                };
                let ids: Vec<Vec<u8>> = col(&row, "ids")?;
                let open_run: i32 = col(&row, "open_run")?;
                let hits = in_closed_runs(store, &mut tx, task_key, &ids, open_run).await?;
                if hits.is_empty() {
                    // Each job is announced as it commits: a later task's failure, or the rest
                    // of the pass (up to a second of waiting for held-back uploads), does not
                    // hold back the news of the jobs committed before it.
                    if col_u64(&row, "jobs")? > 0 {
                        notify::notify(
                            &mut tx,
                            "-- create_aggregation_jobs\nSELECT pg_notify($1, $2)",
                            Wakeup::AggregationJobsCreated,
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    if !ids.is_empty() {
                        store
                            .leader_runs
                            .after_write(&store.pool, ids.len(), open_run);
                    }
                    break row;
                }
                tx.rollback().await?;
                dropping = true;
                replayed.extend(hits);
            };
            // Without this, the creator holding the lock would leave the task, and the one
            // that moved the cursor may already have skipped it for that lock: the reports left
            // would wait for the next pass.
            if col::<_, bool>(&row, "raced")? {
                continue;
            }
            if col_u64(&row, "jobs")? > 0 {
                created.jobs += 1;
            }
            if col_u64(&row, "claimed")? >= max_job_size as u64 {
                continue;
            }
            if col::<_, bool>(&row, "waiting")? {
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(MAX_HORIZON_WAIT.saturating_sub(waited));
                continue;
            }
            held_back |= col::<_, bool>(&row, "held_back")?;
            break;
        }
    }
    if held_back {
        if waited >= MAX_HORIZON_WAIT {
            tracing::warn!(
                "queued reports are held back from aggregation jobs by a transaction older than \
                 their uploads that has run for more than a second (an idle transaction holding \
                 a transaction ID, or a long one, anywhere on the database server)"
            );
        }
        notify::notify(
            &mut conn,
            "-- create_aggregation_jobs\nSELECT pg_notify($1, $2)",
            Wakeup::ReportsStored,
        )
        .await?;
    }
    Ok(created)
}

/// Which of `ids` (claimed for task key `task_key`, just inserted into run `open_run`) are in a
/// closed replay run: those the filter may hold are probed in every closed run, the others only
/// in the runs closed since it was loaded, and none at all when it covers every closed run.
async fn in_closed_runs(
    store: &PostgresDatastore,
    conn: &mut PgConnection,
    task_key: i32,
    ids: &[Vec<u8>],
    open_run: i32,
) -> Result<Vec<[u8; 16]>, TxError> {
    let ids: Vec<[u8; 16]> = ids
        .iter()
        .map(|id| {
            id[..]
                .try_into()
                .map_err(|_| StoreError::Corrupt("a claimed report ID's length".into()))
        })
        .collect::<Result<_, _>>()?;
    // The open run was read under the runs' lock, so a database that has not gone back in time
    // has it at or past the runs the filter covers; one that has makes the filter start over.
    store.leader_runs.check_open_run(&store.pool, open_run);
    let triage = store.leader_runs.triage(&ids);
    if ids.is_empty() || (triage.maybe.is_empty() && triage.covered >= open_run) {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(CLOSED_RUNS)
        .bind(task_key)
        .bind(&triage.maybe)
        .bind(&triage.fresh)
        .bind(open_run)
        .bind(triage.covered)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| Ok(col_array(row, "report_id")?))
        .collect()
}

#[cfg(test)]
mod plans {
    use sqlx::{Connection, PgConnection};

    use super::super::plan_checks;
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// A claim reads the task's queue in order from `report_queue_order`, its cursor the
    /// scan's condition (so the scan stops after the job's reports): not a sequential or bitmap
    /// scan of the whole backlog, sorted, which the custom plan would be with statistics taken
    /// when the queue's pages were mostly empty and 20,000 reports queued since. The search for
    /// tasks with unclaimed reports, outside the job's settings, reads one entry per task.
    #[tokio::test]
    async fn claims_read_the_queue_in_order_whatever_the_statistics() {
        with_fresh_database("claim_plans", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let task_id = TaskId::random();
            let key = store.task_key(&task_id).await.expect("task key");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            // The queue's statistics taken when a tenth of 20,000 reports were left in it (so
            // its pages, reused since, were a tenth full); then 20,000 more reports queued. The
            // planner then estimates about 700 reports past the cursor: without the settings, a
            // sequential scan; without turning bitmap scans off, a bitmap scan.
            sqlx::query("ALTER TABLE report_queue SET (autovacuum_enabled = false)")
                .execute(&mut conn)
                .await
                .expect("autovacuum off");
            plan_checks::queue_reports(&mut conn, key).await;
            for sql in [
                "DELETE FROM report_queue WHERE client_time > 100",
                "VACUUM ANALYZE report_queue",
            ] {
                sqlx::query(sql).execute(&mut conn).await.expect(sql);
            }
            plan_checks::queue_reports(&mut conn, key).await;
            // The search for tasks with unclaimed reports, outside a job's transaction (so
            // without its settings), stops at each task's first unclaimed report all the same:
            // its `LIMIT 1` in index order is cheapest whatever the estimate.
            plan_checks::assert_index_scans(
                &plan_checks::explain(&mut conn, TASKS_WITH_UNCLAIMED).await,
                "on report_queue q",
                1,
                "Index Cond: ((task_key = k.task_key) AND (ROW(upload_xid, client_time, \
                 report_id) > ROW(k.claimed_xid",
            );
            let mut tx = conn.begin().await.expect("begin");
            sqlx::query(LOCK_RUNS)
                .bind(runs::LEADER.lock)
                .execute(&mut *tx)
                .await
                .expect("lock");
            let rows = sqlx::query(&format!("EXPLAIN {CREATE_JOB}"))
                .bind(&task_id.0[..])
                .bind(1000i64)
                .bind(&AggregationJobId::random().0[..])
                .bind(0i64)
                .bind(key)
                .bind(false)
                .fetch_all(&mut *tx)
                .await
                .expect("EXPLAIN");
            let plan = plan_checks::lines(&rows);
            plan_checks::assert_index_scans(
                &plan,
                "on report_queue",
                1,
                "Index Cond: ((task_key = ",
            );
            // The settings add a large cost to the one-row tables' sequential scans, which would
            // otherwise make the statement worth compiling (a third of a second, every time).
            assert!(
                !plan.iter().any(|line| line.contains("JIT")),
                "{}",
                plan.join("\n")
            );
            tx.rollback().await.expect("rollback");
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }

    /// The probes of the Leader's closed replay runs are index descents on the primary key, with
    /// the run array as an index condition: not a scan of a run, or of the table.
    #[tokio::test]
    async fn closed_run_probes_descend_the_primary_key() {
        with_fresh_database("leader_probe_plans", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let ids = vec![[1u8; 16], [2; 16]];
            let rows = sqlx::query(&format!("EXPLAIN {CLOSED_RUNS}"))
                .bind(1i32)
                .bind(&ids)
                .bind(&ids)
                .bind(5i32)
                .bind(2i32)
                .fetch_all(&mut conn)
                .await
                .expect("EXPLAIN");
            plan_checks::assert_index_scans(
                &plan_checks::lines(&rows),
                "on claimed_report_ids c",
                2,
                "Index Cond: ((run = ANY",
            );
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }
}
