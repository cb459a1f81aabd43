//! Leader: reports and aggregation jobs.
//!
//! A report is one row from upload until its job ends, appended in upload order (`seq`). The
//! job creator claims the reports uploaded since its last run by advancing one cursor row; in the
//! same transaction it admits their IDs to the Leader's replay set ([`super::replay`]), deletes
//! replays, and cuts each task's run into jobs, each a contiguous `seq` range. Finishing or
//! abandoning a job deletes its reports with one range delete; their IDs stay in the replay set.
//! There is no per-report state row.
//!
//! Job statements reach `reports` through `seq` ranges of the primary key, its only index: an
//! upload writes nothing else. The time-based count reaches it through the active jobs (which
//! record their reports' times) and the claim cursor.

use std::collections::{HashMap, HashSet};

use duet_messages::dap09::{AggregationJobId, Interval, ReportId, TaskId, Time};

use super::durable::UNSYNCED_MIN_BYTES;
use super::replay::Entry;
use super::tasks::merge_batch_aggregations;
use super::{
    clamp_i64, col, col_array, col_u64, db, lease_token, list_placeholders, to_i64,
    SqliteDatastore, MAX_BIND_PARAMS,
};
use super::{CommitSync, Durability, SqliteQuery};
use crate::{
    AcquiredAggregationJob, BatchAggregation, CreatedJobs, JobReport, JobSizes, Lease, MergeFn,
    NewReport, StoreError,
};

/// Columns bound per report in `put_reports`.
const REPORT_COLUMNS: usize = 4;

/// Appends the reports; replays are found when jobs claim them (`create_aggregation_jobs`), so
/// every report is reported stored here. The write is committed, and durable once the returned
/// [`Durability`] says so: at once, unless the batch is large enough to commit without syncing
/// the log (see [`super::durable`]).
pub(super) async fn put_reports(
    store: &SqliteDatastore,
    reports: &[NewReport],
) -> Result<(Vec<bool>, Durability), StoreError> {
    if reports.is_empty() {
        return Ok((Vec::new(), Durability::default()));
    }
    let times = reports
        .iter()
        .map(|r| to_i64(r.time.0, "report time"))
        .collect::<Result<Vec<_>, _>>()?;
    let chunk_rows = MAX_BIND_PARAMS / REPORT_COLUMNS;
    let bytes: usize = reports.iter().map(|r| r.encoded.len()).sum();
    let commit = if bytes >= UNSYNCED_MIN_BYTES {
        CommitSync::AfterCommit
    } else {
        CommitSync::InCommit
    };
    if reports.len() <= chunk_rows {
        // One statement is atomic on its own: no BEGIN and COMMIT round trips to the
        // connection's thread. Batches of up to `PREPARED_UPLOAD_ROWS` reports keep a prepared
        // statement (an upload batch's size varies with the load).
        let (mut conn, statement) = store
            .writer
            .statement_for(commit, insert_reports_sql(reports.len()))
            .await?;
        bind_reports(sqlx::query(statement.sql()), reports, &times)
            .persistent(
                !statement.changes_setting()
                    && (reports.len() <= PREPARED_UPLOAD_ROWS || reports.len() == chunk_rows),
            )
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        let durability = statement.ran();
        return Ok((vec![true; reports.len()], durability));
    }
    let mut tx = store.writer.begin_for(commit).await?;
    for (chunk, chunk_times) in reports.chunks(chunk_rows).zip(times.chunks(chunk_rows)) {
        let sql = insert_reports_sql(chunk.len());
        bind_reports(sqlx::query(&sql), chunk, chunk_times)
            .persistent(chunk.len() == chunk_rows)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    let durability = tx.commit_unsynced().await.map_err(db)?;
    Ok((vec![true; reports.len()], durability))
}

/// Upload batches up to this many reports keep a prepared statement for their size.
const PREPARED_UPLOAD_ROWS: usize = 64;

/// `INSERT INTO reports` of `rows` reports (at least one).
///
/// `seq` never goes back, so that the job creator's cursor and job ranges keep their meaning:
/// the first row takes the next `seq` above the table's highest row, the claim cursor (every
/// report a job or a replay deletion removes lies at or below it) and `seq_floor` (the highest
/// `seq` a task deletion removed). Each later row (`seq` NULL) takes the one after its
/// predecessor's, which SQLite assigns as the table's highest plus one.
fn insert_reports_sql(rows: usize) -> String {
    let columns = list_placeholders(REPORT_COLUMNS);
    let first = format!(
        "((SELECT MAX((SELECT COALESCE(MAX(seq), 0) FROM reports), claimed_seq, seq_floor) + 1 \
           FROM report_cursor WHERE id = 0), {columns})"
    );
    let later = format!("(NULL, {columns})");
    let values: Vec<&str> = std::iter::once(first.as_str())
        .chain(std::iter::repeat_n(later.as_str(), rows.saturating_sub(1)))
        .collect();
    format!(
        "-- put_reports\n\
         INSERT INTO reports (seq, task_id, report_id, client_time, payload) VALUES {}",
        values.join(", ")
    )
}

/// Binds `reports` and their `times` (as SQLite's integers) to [`insert_reports_sql`].
fn bind_reports<'q>(
    mut query: SqliteQuery<'q>,
    reports: &'q [NewReport],
    times: &'q [i64],
) -> SqliteQuery<'q> {
    for (report, time) in reports.iter().zip(times) {
        query = query
            .bind(&report.task_id.0[..])
            .bind(&report.report_id.0[..])
            .bind(*time)
            .bind(&report.encoded[..]);
    }
    query
}

/// Reports (by `seq`) claimed per round of statements when creating jobs.
const CLAIM_BATCH: i64 = 50_000;

/// Claims the reports uploaded since the last call, in `seq` windows: the window's report IDs
/// are admitted to the replay set (see [`super::replay`]); a report whose ID was there already,
/// or came earlier in the window, is a replay and is deleted; the rest are cut into jobs. The
/// claim stops before the first report of a task `sizes` gives no size, and the window's
/// unsized tasks are listed in the result.
pub(super) async fn create_aggregation_jobs(
    store: &SqliteDatastore,
    sizes: &JobSizes,
    now: Time,
) -> Result<CreatedJobs, StoreError> {
    claim_into_jobs(store, sizes, now, CLAIM_BATCH).await
}

/// [`create_aggregation_jobs`] with windows of `window` `seq` values.
async fn claim_into_jobs(
    store: &SqliteDatastore,
    sizes: &JobSizes,
    now: Time,
    window: i64,
) -> Result<CreatedJobs, StoreError> {
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin_write().await?;
    let row = sqlx::query(
        "-- create_aggregation_jobs\n\
         SELECT claimed_seq, (SELECT COALESCE(MAX(seq), 0) FROM reports) AS last_seq \
         FROM report_cursor WHERE id = 0",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let mut cursor: i64 = col(&row, "claimed_seq")?;
    let last_seq: i64 = col(&row, "last_seq")?;
    if cursor >= last_seq {
        return Ok(CreatedJobs::default());
    }
    let mut intake = store.replay.leader.begin(&mut tx).await?;
    let mut created = CreatedJobs::default();
    while cursor < last_seq {
        let mut end = last_seq.min(cursor.saturating_add(window.max(1)));
        let rows = sqlx::query(
            "-- create_aggregation_jobs\n\
             SELECT seq, task_id, report_id, client_time FROM reports \
             WHERE seq > ? AND seq <= ? ORDER BY seq",
        )
        .bind(cursor)
        .bind(end)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let (mut entries, mut times): (Vec<Entry>, Vec<i64>) = rows
            .iter()
            .map(|row| {
                let entry = Entry {
                    task_id: TaskId(col_array(row, "task_id")?),
                    report_id: ReportId(col_array(row, "report_id")?),
                    seq: col(row, "seq")?,
                };
                Ok((entry, col::<_, i64>(row, "client_time")?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?
            .into_iter()
            .unzip();
        // The claim ends before the first report of an unsized task.
        let unsized_from = entries.iter().position(|e| sizes.of(&e.task_id).is_none());
        if let Some(first) = unsized_from {
            let mut named = HashSet::new();
            for entry in &entries[first..] {
                let task = entry.task_id;
                if sizes.of(&task).is_none() && named.insert(task) {
                    created.unsized_tasks.push(task);
                }
            }
            end = entries[first].seq - 1;
            entries.truncate(first);
            times.truncate(first);
        }
        let fresh = intake.admit(&mut tx, &entries).await?;
        let replays: Vec<i64> = entries
            .iter()
            .zip(&fresh)
            .filter(|(_, fresh)| !**fresh)
            .map(|(entry, _)| entry.seq)
            .collect();
        delete_reports(&mut tx, &replays).await?;
        let claimed = entries
            .iter()
            .zip(times)
            .zip(&fresh)
            .filter(|(_, fresh)| **fresh)
            .map(|(claimed, _)| claimed);
        for job in cut_into_jobs(claimed, sizes) {
            let job_id = AggregationJobId::random();
            sqlx::query(
                "-- create_aggregation_jobs\n\
                 INSERT INTO aggregation_jobs \
                 (task_id, job_id, state, report_count, first_seq, last_seq, min_time, max_time, \
                  created_at, retry_at) \
                 VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&job.task_id.0[..])
            .bind(&job_id.0[..])
            .bind(clamp_i64(job.report_count as u64))
            .bind(job.first_seq)
            .bind(job.last_seq)
            .bind(job.min_time)
            .bind(job.max_time)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            created.jobs += 1;
        }
        cursor = end;
        if unsized_from.is_some() {
            break;
        }
    }
    sqlx::query(
        "-- create_aggregation_jobs\nUPDATE report_cursor SET claimed_seq = ? WHERE id = 0",
    )
    .bind(cursor)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let admitted = intake.finish(&mut tx).await?;
    tx.commit().await.map_err(db)?;
    admitted.remember();
    Ok(created)
}

/// Deletes the reports with these `seq`s.
async fn delete_reports(tx: &mut sqlx::SqliteConnection, seqs: &[i64]) -> Result<(), StoreError> {
    let chunk_len = MAX_BIND_PARAMS;
    for chunk in seqs.chunks(chunk_len) {
        let sql = format!(
            "-- create_aggregation_jobs\nDELETE FROM reports WHERE seq IN ({})",
            list_placeholders(chunk.len())
        );
        let mut query = sqlx::query(&sql).persistent(chunk.len() == chunk_len);
        for seq in chunk {
            query = query.bind(*seq);
        }
        query.execute(&mut *tx).await.map_err(db)?;
    }
    Ok(())
}

/// A job to create: one task's reports in `first_seq..=last_seq`, with times in
/// `min_time..=max_time`.
struct NewJob {
    task_id: TaskId,
    first_seq: i64,
    last_seq: i64,
    min_time: i64,
    max_time: i64,
    report_count: usize,
}

/// Groups claimed reports (with their times) by task in upload order and cuts each task's run
/// into jobs of at most as many reports as `sizes` gives the task (every claimed report's task
/// has a size).
fn cut_into_jobs<'a>(
    claimed: impl Iterator<Item = (&'a Entry, i64)>,
    sizes: &JobSizes,
) -> Vec<NewJob> {
    let mut open: HashMap<TaskId, NewJob> = HashMap::new();
    let mut jobs = Vec::new();
    for (entry, time) in claimed {
        let job = open.entry(entry.task_id).or_insert_with(|| NewJob {
            task_id: entry.task_id,
            first_seq: entry.seq,
            last_seq: entry.seq,
            min_time: time,
            max_time: time,
            report_count: 0,
        });
        job.last_seq = entry.seq;
        job.min_time = job.min_time.min(time);
        job.max_time = job.max_time.max(time);
        job.report_count += 1;
        if job.report_count >= sizes.of(&entry.task_id).unwrap_or(1) {
            jobs.extend(open.remove(&entry.task_id));
        }
    }
    jobs.extend(open.into_values());
    jobs
}

pub(super) async fn acquire_aggregation_jobs(
    store: &SqliteDatastore,
    now: Time,
    lease_duration: u64,
    limit: usize,
) -> Result<Vec<AcquiredAggregationJob>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let expiry = Time(now.0.saturating_add(lease_duration));
    let now = to_i64(now.0, "time")?;
    let mut tx = store.begin_write().await?;
    let candidates = sqlx::query(
        "-- acquire_aggregation_jobs\n\
         SELECT task_id, job_id, first_seq, last_seq FROM aggregation_jobs \
         WHERE state = 'active' AND retry_at <= ? AND lease_expiry <= ? \
         ORDER BY retry_at, created_at LIMIT ?",
    )
    .bind(now)
    .bind(now)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let mut acquired = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let task_id = TaskId(col_array(&candidate, "task_id")?);
        let job_id = AggregationJobId(col_array(&candidate, "job_id")?);
        let first_seq: i64 = col(&candidate, "first_seq")?;
        let last_seq: i64 = col(&candidate, "last_seq")?;
        let token = lease_token();
        let row = sqlx::query(
            "-- acquire_aggregation_jobs\n\
             UPDATE aggregation_jobs \
             SET lease_token = ?, lease_expiry = ?, lease_attempts = lease_attempts + 1 \
             WHERE task_id = ? AND job_id = ? RETURNING lease_attempts",
        )
        .bind(&token[..])
        .bind(clamp_i64(expiry.0))
        .bind(&task_id.0[..])
        .bind(&job_id.0[..])
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let attempts = u32::try_from(col_u64(&row, "lease_attempts")?)
            .map_err(|_| StoreError::Corrupt("lease_attempts out of range".into()))?;
        let reports = sqlx::query(
            "-- acquire_aggregation_jobs\n\
             SELECT report_id, client_time, payload FROM reports \
             WHERE seq BETWEEN ? AND ? AND task_id = ? ORDER BY seq",
        )
        .bind(first_seq)
        .bind(last_seq)
        .bind(&task_id.0[..])
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?
        .iter()
        .map(|row| {
            Ok(JobReport {
                report_id: ReportId(col_array(row, "report_id")?),
                time: Time(col_u64(row, "client_time")?),
                encoded: col(row, "payload")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        acquired.push(AcquiredAggregationJob {
            task_id,
            job_id,
            reports,
            lease: Lease {
                token,
                expiry,
                attempts,
            },
        });
    }
    tx.commit().await.map_err(db)?;
    Ok(acquired)
}

pub(super) async fn finish_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
    deltas: &[BatchAggregation],
    merge: MergeFn<'_>,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- finish_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'finished', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ? \
         RETURNING first_seq, last_seq",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some(range) = updated else {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    };
    let (first_seq, last_seq): (i64, i64) = (col(&range, "first_seq")?, col(&range, "last_seq")?);
    merge_batch_aggregations(store, &mut tx, deltas, merge).await?;
    sqlx::query(
        "-- finish_aggregation_job\n\
         DELETE FROM reports WHERE seq BETWEEN ? AND ? AND task_id = ?",
    )
    .bind(first_seq)
    .bind(last_seq)
    .bind(&job.task_id.0[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

pub(super) async fn release_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
    retry_at: Time,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- release_aggregation_job\n\
         UPDATE aggregation_jobs SET lease_token = NULL, lease_expiry = 0, retry_at = ? \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ?",
    )
    .bind(to_i64(retry_at.0, "retry time")?)
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if updated == 0 {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    }
    tx.commit().await.map_err(db)
}

pub(super) async fn abandon_aggregation_job(
    store: &SqliteDatastore,
    job: &AcquiredAggregationJob,
) -> Result<(), StoreError> {
    let mut tx = store.begin_write().await?;
    let updated = sqlx::query(
        "-- abandon_aggregation_job\n\
         UPDATE aggregation_jobs SET state = 'abandoned', lease_token = NULL, lease_expiry = 0 \
         WHERE task_id = ? AND job_id = ? AND state = 'active' AND lease_token = ? \
         RETURNING first_seq, last_seq",
    )
    .bind(&job.task_id.0[..])
    .bind(&job.job_id.0[..])
    .bind(&job.lease.token[..])
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some(range) = updated else {
        tx.rollback().await.map_err(db)?;
        return Err(StoreError::LeaseLost);
    };
    let (first_seq, last_seq): (i64, i64) = (col(&range, "first_seq")?, col(&range, "last_seq")?);
    sqlx::query(
        "-- abandon_aggregation_job\n\
         DELETE FROM reports WHERE seq BETWEEN ? AND ? AND task_id = ?",
    )
    .bind(first_seq)
    .bind(last_seq)
    .bind(&job.task_id.0[..])
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)
}

/// The task's unaggregated reports with a timestamp in `[?2, ?3)` (`?1` is the task): the rows
/// of `reports` (a finished or abandoned job deletes its rows), whether in an active job or not
/// yet claimed. Replays uploaded since the last job creation are among them until it deletes
/// them. There is no index on the reports' times, which would cost every upload: each active
/// job records the times of its reports, so [`in_jobs`] reads only the rows of the task's jobs
/// whose times meet the interval (the jobs through `aggregation_jobs_active_times`, their rows
/// through `seq`: `CROSS JOIN` keeps the jobs first, and `NOT INDEXED` rules out an automatic
/// index, which would read the whole table), and [`unclaimed`] the reports above the claim
/// cursor. Each selects `$what` (`COUNT(*)` or `1`).
macro_rules! in_jobs {
    ($what:literal) => {
        concat!(
            "SELECT ",
            $what,
            " FROM aggregation_jobs AS j INDEXED BY aggregation_jobs_active_times \
             CROSS JOIN reports AS r NOT INDEXED \
             WHERE j.state = 'active' AND j.task_id = ?1 AND j.max_time >= ?2 \
             AND j.min_time < ?3 AND r.seq BETWEEN j.first_seq AND j.last_seq \
             AND r.task_id = ?1 AND r.client_time >= ?2 AND r.client_time < ?3"
        )
    };
}

/// See [`in_jobs`].
macro_rules! unclaimed {
    ($what:literal) => {
        concat!(
            "SELECT ",
            $what,
            " FROM reports AS r NOT INDEXED \
             WHERE r.seq > (SELECT claimed_seq FROM report_cursor WHERE id = 0) \
             AND r.task_id = ?1 AND r.client_time >= ?2 AND r.client_time < ?3"
        )
    };
}

/// Runs one statement over the task's unaggregated reports in `interval`.
async fn unaggregated_row(
    store: &SqliteDatastore,
    sql: &'static str,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<sqlx::sqlite::SqliteRow, StoreError> {
    sqlx::query(sql)
        .bind(&task_id.0[..])
        .bind(clamp_i64(interval.start.0))
        .bind(clamp_i64(interval.end().0))
        .fetch_one(&store.pool)
        .await
        .map_err(db)
}

const COUNT_UNAGGREGATED: &str = concat!(
    "-- count_unaggregated_reports\nSELECT (",
    in_jobs!("COUNT(*)"),
    ") + (",
    unclaimed!("COUNT(*)"),
    ") AS n"
);

/// `CASE` stops at a report in a job, where `OR` would read the unclaimed ones too.
const HAS_UNAGGREGATED: &str = concat!(
    "-- has_unaggregated_reports\nSELECT CASE WHEN EXISTS (",
    in_jobs!("1"),
    ") THEN 1 ELSE EXISTS (",
    unclaimed!("1"),
    ") END AS found"
);

pub(super) async fn count_unaggregated_reports(
    store: &SqliteDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<u64, StoreError> {
    col_u64(
        &unaggregated_row(store, COUNT_UNAGGREGATED, task_id, interval).await?,
        "n",
    )
}

/// [`count_unaggregated_reports`]'s question, answered at the first such report.
pub(super) async fn has_unaggregated_reports(
    store: &SqliteDatastore,
    task_id: &TaskId,
    interval: &Interval,
) -> Result<bool, StoreError> {
    col(
        &unaggregated_row(store, HAS_UNAGGREGATED, task_id, interval).await?,
        "found",
    )
}

/// The reports of every job `store` can lease at `now`, as (ID, contents), in ID order.
#[cfg(test)]
pub(super) async fn acquired_reports(
    store: &SqliteDatastore,
    now: Time,
) -> Vec<(ReportId, Vec<u8>)> {
    let mut reports: Vec<(ReportId, Vec<u8>)> = acquire_aggregation_jobs(store, now, 60, 100)
        .await
        .expect("acquire")
        .into_iter()
        .flat_map(|j| j.reports.into_iter().map(|r| (r.report_id, r.encoded)))
        .collect();
    reports.sort_by_key(|(id, _)| id.0);
    reports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Datastore;

    /// Replays are found across claim windows and within one, and the first upload wins.
    #[tokio::test]
    async fn replays_across_and_within_claim_windows() {
        let store = SqliteDatastore::connect("sqlite::memory:")
            .await
            .expect("connect");
        let task_id = TaskId::random();
        let report = |id: ReportId, payload: u8| NewReport {
            task_id,
            report_id: id,
            time: Time(1000),
            encoded: vec![payload],
        };
        let ids: Vec<ReportId> = (0..5).map(|_| ReportId::random()).collect();
        // Windows of two: (a, b), (c, a'), (d, b'), (e, e').
        let uploads = [
            report(ids[0], 1),
            report(ids[1], 2),
            report(ids[2], 3),
            report(ids[0], 9),
            report(ids[3], 4),
            report(ids[1], 9),
            report(ids[4], 5),
            report(ids[4], 9),
        ];
        store.put_reports(&uploads).await.expect("put_reports");
        let jobs = claim_into_jobs(&store, &JobSizes::uniform(100), Time(2000), 2)
            .await
            .expect("claim")
            .jobs;
        assert_eq!(jobs, 4, "one job per window, none empty");
        let got = acquired_reports(&store, Time(2000)).await;
        let mut want: Vec<(ReportId, Vec<u8>)> =
            ids.iter().zip(1..).map(|(id, p)| (*id, vec![p])).collect();
        want.sort_by_key(|(id, _)| id.0);
        assert_eq!(got, want);
        assert_eq!(
            store
                .count_unaggregated_reports(
                    &task_id,
                    &Interval {
                        start: Time(0),
                        duration: duet_messages::dap09::Duration(10_000),
                    },
                )
                .await
                .expect("count"),
            5
        );
    }

    /// The unaggregated reports are read through the task's active jobs whose times meet the
    /// interval, by their `seq` ranges, and the claim cursor: never by a scan of `reports`,
    /// which holds the whole backlog, nor of the jobs.
    #[tokio::test]
    async fn unaggregated_reports_are_read_by_seq() {
        let store = SqliteDatastore::connect("sqlite::memory:")
            .await
            .expect("connect");
        for sql in [COUNT_UNAGGREGATED, HAS_UNAGGREGATED] {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
                .bind(&[1u8; 32][..])
                .bind(100i64)
                .bind(200i64)
                .fetch_all(&store.pool)
                .await
                .expect("EXPLAIN QUERY PLAN")
                .iter()
                .map(|row| col::<_, String>(row, "detail").expect("detail"))
                .collect();
            let reads = |table: &str| -> Vec<&String> {
                let word = format!(" {table} ");
                plan.iter()
                    .filter(|l| format!("{l} ").contains(&word))
                    .collect()
            };
            let (r, j) = (reads("r"), reads("j"));
            assert_eq!(r.len(), 2, "{plan:?}");
            assert!(
                r.iter()
                    .all(|l| l.starts_with("SEARCH r USING INTEGER PRIMARY KEY (rowid")),
                "{plan:?}"
            );
            assert_eq!(j.len(), 1, "{plan:?}");
            assert!(
                j[0].starts_with(
                    "SEARCH j USING INDEX aggregation_jobs_active_times (task_id=? AND max_time>?)"
                ),
                "{plan:?}"
            );
        }
        store.close().await;
    }

    /// A job's times span its reports' earliest and latest, whatever their upload order: a
    /// report older than the job's first still counts as unaggregated in its interval.
    #[tokio::test]
    async fn a_job_meets_the_intervals_of_all_its_reports() {
        let store = SqliteDatastore::connect("sqlite::memory:")
            .await
            .expect("connect");
        let task_id = TaskId::random();
        let reports: Vec<NewReport> = [3000, 1000, 5000]
            .into_iter()
            .map(|t| NewReport {
                task_id,
                report_id: ReportId::random(),
                time: Time(t),
                encoded: vec![1],
            })
            .collect();
        store.put_reports(&reports).await.expect("put_reports");
        assert_eq!(
            claim_into_jobs(&store, &JobSizes::uniform(100), Time(6000), 100)
                .await
                .expect("claim")
                .jobs,
            1
        );
        for (start, want) in [
            (1000, 1),
            (2000, 0),
            (3000, 1),
            (4000, 0),
            (5000, 1),
            (6000, 0),
        ] {
            let count = crate::conformance::unaggregated(&store, task_id, start, 1000).await;
            assert_eq!(count, want, "from {start}");
        }
        store.close().await;
    }
}
