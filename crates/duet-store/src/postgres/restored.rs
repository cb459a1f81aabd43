//! Transaction IDs that came from another server.
//!
//! The Leader's claim order begins with the uploading transaction's ID
//! (`report_queue.upload_xid`), and the claim cursors (`replay_tasks.claimed_xid`) and the jobs'
//! ranges (`aggregation_jobs.from_xid`, `to_xid`) hold such IDs. They compare only within the
//! server that assigned them. A database dumped with `pg_dump` and restored into another server
//! (or copied to one by logical replication, stopped before Duet first connects to the copy)
//! keeps the values, but that server numbers its own
//! transactions from where it stands, often far below them. Its uploads would sort behind every
//! cursor and never be claimed, and the stored reports would wait for older transactions to end
//! (`pg_snapshot_xmin`) until the new server had counted past them.
//!
//! A server's committed transactions all precede its snapshots' `xmax`, so a stored ID at or past
//! it can only come from another server. [`renumber_if_restored`] then renumbers every stored ID
//! once, before the process serves, keeping their order: the bounds (the cursors and the active
//! jobs' ranges) get distinct numbers, and all IDs between two neighbouring bounds one number
//! between theirs, so that every comparison of a report with a bound keeps its result. All the new
//! numbers lie below the renumbering transaction's own ID, so every later upload sorts after them.
//! Reports that an older version accepted after the restore, which sort behind their cursor in
//! no active job's range, move after every bound, to be claimed (one that fell inside an active
//! job's range stays there, unchecked for replays: an older version must not serve a restored
//! database). Two uploads of one ID between the same two bounds get one number, so which of
//! them is kept as the first is decided by their times and not their upload order; two with
//! the same time as well would tie in claim order, and only one of them is kept.

use super::PostgresDatastore;
use super::TxError;
use crate::StoreError;

/// Whether a stored transaction ID is at or past the server's next one. Each task's queue is
/// read by index from that ID on: nothing is there on a server that assigned its IDs itself, and
/// the scan does not pass the entries of ended jobs' reports, which vacuum may not have removed
/// yet (an active job's range never passes its task's cursor).
const RESTORED: &str = "-- restored\n\
     WITH next AS (SELECT pg_snapshot_xmax(pg_current_snapshot()) AS xid) \
     SELECT EXISTS (SELECT 1 FROM replay_tasks WHERE claimed_xid >= (SELECT xid FROM next)) \
       OR EXISTS (SELECT 1 FROM replay_tasks AS k CROSS JOIN LATERAL ( \
         SELECT 1 FROM report_queue AS q \
         WHERE q.task_key = k.task_key AND q.upload_xid >= (SELECT xid FROM next) \
         ORDER BY q.upload_xid LIMIT 1) AS past)";

/// The bounds of the claim order, ascending and distinct: every task's cursor and both ends of
/// every active job's range.
const BOUNDS: &str = "-- restored\n\
     SELECT COALESCE(array_agg(b::text ORDER BY b), '{}') FROM ( \
       SELECT claimed_xid FROM replay_tasks \
       UNION SELECT from_xid FROM aggregation_jobs WHERE state = 'active' AND from_xid IS NOT NULL \
       UNION SELECT to_xid FROM aggregation_jobs WHERE state = 'active' AND to_xid IS NOT NULL \
     ) AS bounds (b)";

/// The new number of ID `$v`, given the ascending bounds `$1`: bound `i` (from 1) becomes
/// `FIRST + 2i - 1`; an ID after exactly `i` bounds (and equal to none) becomes `FIRST + 2i`.
/// `width_bucket` counts the bounds at or below the ID by bisection.
macro_rules! renumbered {
    ($v:literal) => {
        concat!(
            "(3 + 2 * width_bucket(",
            $v,
            ", $1::text[]::xid8[]) - CASE WHEN width_bucket(",
            $v,
            ", $1::text[]::xid8[]) > 0 AND ($1::text[]::xid8[])[width_bucket(",
            $v,
            ", $1::text[]::xid8[])] = ",
            $v,
            " THEN 1 ELSE 0 END)::text::xid8"
        )
    };
}

/// The first new number (3): 0 to 2 stand for special transactions in PostgreSQL's own use.
const FIRST: u64 = 3;

/// How many times the renumbering runs for want of transaction IDs before it gives up.
const ROUNDS: u32 = 4;

/// What one attempt at renumbering did.
enum Attempt {
    /// Nothing was stored from another server (any more).
    Nothing,
    /// The stored IDs were renumbered; so many bounds kept distinct numbers.
    Renumbered(usize),
    /// The server has not yet assigned enough transaction IDs to leave room below the
    /// renumbering's own: so many more are needed.
    Short(u64),
}

/// Renumbers stored transaction IDs that came from another server (see the module's
/// documentation); does nothing, after one index probe per task, when none did.
pub(super) async fn renumber_if_restored(store: &PostgresDatastore) -> Result<(), StoreError> {
    let restored: bool = sqlx::query_scalar(RESTORED)
        .fetch_one(&store.pool)
        .await
        .map_err(|e| StoreError::Database(e.to_string()))?;
    if !restored {
        return Ok(());
    }
    tracing::warn!(
        "the database holds transaction IDs past this server's (restored from another server?): \
         renumbering them"
    );
    for _ in 0..ROUNDS {
        match store.run("renumber_restored", || attempt(store)).await? {
            Attempt::Nothing => return Ok(()),
            Attempt::Renumbered(bounds) => {
                tracing::warn!(bounds, "transaction IDs from another server renumbered");
                return Ok(());
            }
            Attempt::Short(ids) => use_transaction_ids(store, ids).await?,
        }
    }
    Err(StoreError::Database(
        "stored transaction IDs from another server could not be renumbered: the server keeps \
         too few IDs below its own; restart to try again"
            .into(),
    ))
}

/// One renumbering transaction. It keeps writers of the three tables out (readers go on), and
/// looks again under those locks, since another process may have renumbered first.
async fn attempt(store: &PostgresDatastore) -> Result<Attempt, TxError> {
    let mut tx = store.begin().await?;
    sqlx::query(
        "-- restored\n\
         LOCK TABLE report_queue, replay_tasks, aggregation_jobs IN EXCLUSIVE MODE",
    )
    .execute(&mut *tx)
    .await?;
    if !sqlx::query_scalar::<_, bool>(RESTORED)
        .fetch_one(&mut *tx)
        .await?
    {
        return Ok(Attempt::Nothing);
    }
    let own: String = sqlx::query_scalar("-- restored\nSELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await?;
    let own: u64 = own
        .parse()
        .map_err(|_| TxError::Store(StoreError::Database(format!("transaction ID {own}"))))?;
    let bounds: Vec<String> = sqlx::query_scalar(BOUNDS).fetch_one(&mut *tx).await?;
    // The largest new number is that of the IDs after the last bound.
    let largest = FIRST + 2 * bounds.len() as u64;
    if largest >= own {
        return Ok(Attempt::Short(largest - own + 1));
    }
    sqlx::query(concat!(
        "-- restored\nUPDATE replay_tasks SET claimed_xid = ",
        renumbered!("claimed_xid")
    ))
    .bind(&bounds)
    .execute(&mut *tx)
    .await?;
    // Ended jobs too, so that no stored ID stays past the server's; only the active ones'
    // ranges are bounds (an ended job's reports have left the queue).
    sqlx::query(concat!(
        "-- restored\nUPDATE aggregation_jobs SET from_xid = ",
        renumbered!("from_xid"),
        ", to_xid = ",
        renumbered!("to_xid"),
        " WHERE from_xid IS NOT NULL"
    ))
    .bind(&bounds)
    .execute(&mut *tx)
    .await?;
    // Each distinct ID once, then every queued report by it.
    sqlx::query(concat!(
        "-- restored\nUPDATE report_queue AS q SET upload_xid = m.renumbered \
         FROM (SELECT v, ",
        renumbered!("v"),
        " AS renumbered FROM (SELECT DISTINCT upload_xid FROM report_queue) AS d (v)) AS m \
         WHERE q.upload_xid = m.v"
    ))
    .bind(&bounds)
    .execute(&mut *tx)
    .await?;
    // A report behind its task's cursor and in no active job's range was uploaded by a version
    // that did not renumber, serving after the restore (no upload commits behind the cursor
    // otherwise): it moves after every bound, to be claimed.
    sqlx::query(
        "-- restored\n\
         UPDATE report_queue AS q SET upload_xid = $1::text::xid8 FROM replay_tasks AS k \
         WHERE q.task_key = k.task_key \
           AND (q.upload_xid, q.client_time, q.report_id) \
             <= (k.claimed_xid, k.claimed_time, k.claimed_id) \
           AND NOT EXISTS (SELECT 1 FROM aggregation_jobs AS j \
             WHERE j.task_id = k.task_id AND j.state = 'active' AND j.from_xid IS NOT NULL \
               AND (q.upload_xid, q.client_time, q.report_id) > (j.from_xid, j.from_time, j.from_id) \
               AND (q.upload_xid, q.client_time, q.report_id) <= (j.to_xid, j.to_time, j.to_id))",
    )
    .bind(largest.to_string())
    .execute(&mut *tx)
    .await?;
    // Two uploads of one report (a client's retry: one ID, one time) between the same two
    // bounds now tie in claim order. Claims tell rows apart by that order, so a job claiming
    // one would read the other in its range too; keep one of them (the other is a replay).
    sqlx::query(
        "-- restored\n\
         DELETE FROM report_queue AS q USING report_queue AS r \
         WHERE q.task_key = r.task_key AND q.upload_xid = r.upload_xid \
           AND q.client_time = r.client_time AND q.report_id = r.report_id AND q.ctid > r.ctid",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Attempt::Renumbered(bounds.len()))
}

/// Has the server assign `ids` transaction IDs, each in a transaction of its own (a server just
/// created by a restore has assigned only a few thousand).
async fn use_transaction_ids(store: &PostgresDatastore, ids: u64) -> Result<(), StoreError> {
    tracing::warn!(
        ids,
        "using transaction IDs to make room for the renumbering"
    );
    for _ in 0..ids {
        sqlx::query("-- restored\nSELECT pg_current_xact_id()")
            .execute(&store.pool)
            .await
            .map_err(|e| StoreError::Database(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod plans {
    use sqlx::{Connection, PgConnection};

    use super::super::plan_checks;
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// The check reads each task's queue from the server's next transaction ID on, by index.
    #[tokio::test]
    async fn the_check_reads_the_queue_from_the_next_id() {
        with_fresh_database("restored_check_plan", |url| async move {
            let store = PostgresDatastore::connect(&url).await.expect("connect");
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            plan_checks::assert_index_scans(
                &plan_checks::explain(&mut conn, RESTORED).await,
                "on report_queue q",
                1,
                "Index Cond: ((task_key = k.task_key) AND (upload_xid >=",
            );
            conn.close().await.expect("close");
            store.close().await;
        })
        .await;
    }
}
