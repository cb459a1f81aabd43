//! Uploads committed without waiting for the write-ahead log's flush, made durable by a shared
//! flush.
//!
//! A large batch of uploads (Prio3SumVec(1000) reports are about 17 kB each) takes the database
//! a few milliseconds to insert, and its commit then waits about a millisecond more for the
//! log's flush, during which the Leader's one report writer could already be sending the next
//! batch. So such a batch is inserted on a connection of its own with `synchronous_commit =
//! off`: the insert commits, and is visible, at once. Its uploads are acknowledged only after a
//! flush: a transaction that writes to the log (a transactional `pg_logical_emit_message`, which
//! assigns it an ID) and commits with `synchronous_commit` on, which waits until the log is
//! flushed up to its own commit record, past every commit before it. Each batch runs its own,
//! at once; the server groups concurrent ones into one flush of the log.
//!
//! If the server crashes before the flush, the batch is lost, and its uploads were never
//! acknowledged; anything that read the batch (a job created from it) committed after it in
//! the log, and is lost with it. The flush may then reach the restarted server (or a promoted
//! standby) and succeed there, so it also checks that the backend the batch was written on is
//! still running: a crash of any backend restarts them all (`restart_after_crash`, whose
//! recovery loses what the log had not flushed, in the same postmaster, so the server's start
//! time does not change), and a restart or another server has other backends. A batch whose
//! backend has gone (also when the connection was merely closed) is answered as failed,
//! although it may have been kept: a client's retry is then a replay, counted once.

use std::sync::{Arc, Mutex, PoisonError};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::StoreError;

/// Payload bytes from which a batch of uploads commits without waiting for the flush. The
/// Leader's writer fills batches up to 384 KiB; the bench's Prio3SumVec(1000) batches (about
/// 17 kB a report) reach this, and take about as long to insert as a flush. Batches of
/// Prio3Count or Histogram(100) reports (up to 64 in flight in the bench, a few to 160 kB) are
/// inserted faster than a flush and are cheaper with the flush in their own commit (an extra
/// flush transaction per small batch cost Prio3Count more CPU per report than the wait it
/// saved).
pub(super) const UNFLUSHED_MIN_BYTES: usize = 192 * 1024;

/// A server backend: its process ID and its start (microseconds since 1970). A backend is
/// never restarted, and its process ID is not reused within a microsecond, so the pair names
/// one connection's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Backend {
    pid: i32,
    started_us: i64,
}

/// The pool of one connection for batches committed without waiting for the flush: each
/// connection it opens sets `synchronous_commit = off` and records in `backend` which backend
/// it is (see [`flushed`]).
pub(super) fn unflushed_pool(
    pool: PgPoolOptions,
    options: PgConnectOptions,
    backend: Arc<Mutex<Option<Backend>>>,
) -> PgPool {
    pool.after_connect(move |conn, _| {
        let backend = Arc::clone(&backend);
        Box::pin(async move {
            conn.execute("SET synchronous_commit = off").await?;
            let (pid, started_us): (i32, i64) =
                sqlx::query_as(THIS_BACKEND).fetch_one(&mut *conn).await?;
            *backend.lock().unwrap_or_else(PoisonError::into_inner) =
                Some(Backend { pid, started_us });
            Ok(())
        })
    })
    .connect_lazy_with(options)
}

/// The connection's own backend.
const THIS_BACKEND: &str = "SELECT pid, (extract(epoch FROM backend_start) * 1000000)::int8 \
     FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// Returns once everything committed before this call on `backend` (from [`unflushed_pool`]) is
/// durable, or fails if that backend is no longer running (a crash-restart may have lost what
/// it wrote, and a restarted or promoted server has other backends). Concurrent calls share the
/// server's flushes: a commit that finds the log being flushed waits for that flush, and if it
/// did not reach its own record, the next one flushes everything written by then.
pub(super) async fn flushed(pool: &PgPool, backend: Option<Backend>) -> Result<(), StoreError> {
    let Some(backend) = backend else {
        return Err(gone());
    };
    // Checked in the flushing transaction: a crash after the check ends it before its commit.
    let running: bool = sqlx::query_scalar(
        "-- flush\n\
         SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
           WHERE pid = $1 AND (extract(epoch FROM backend_start) * 1000000)::int8 = $2) \
         FROM pg_logical_emit_message(true, 'duet', '')",
    )
    .bind(backend.pid)
    .bind(backend.started_us)
    .fetch_one(pool)
    .await
    .map_err(|e| StoreError::Database(format!("flushing the write-ahead log: {e}")))?;
    if !running {
        return Err(gone());
    }
    Ok(())
}

fn gone() -> StoreError {
    StoreError::Database(
        "the database connection a batch of uploads was written on ended before the batch was \
         flushed (the server may have restarted); the batch may be lost"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// A flush succeeds while the backend a batch was written on runs, and fails once it has
    /// gone, as every backend goes in a crash-restart (which keeps the server's start time), or
    /// for a backend of another server.
    #[tokio::test]
    async fn a_flush_after_the_writing_backend_has_gone_fails() {
        with_fresh_database("flush_backend", |url| async move {
            let options: PgConnectOptions = url.parse().expect("URL");
            let backend = Arc::new(Mutex::new(None));
            let unflushed = unflushed_pool(
                PgPoolOptions::new().max_connections(1),
                options.clone(),
                Arc::clone(&backend),
            );
            let off: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&unflushed)
                .await
                .expect("show");
            assert_eq!(off, "off");
            let written_on = *backend.lock().expect("lock");
            let Some(written_on) = written_on else {
                panic!("no backend recorded");
            };
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("connect");
            flushed(&pool, Some(written_on))
                .await
                .expect("same backend");
            let other = Backend {
                started_us: written_on.started_us - 1,
                ..written_on
            };
            assert!(flushed(&pool, Some(other)).await.is_err());
            assert!(flushed(&pool, None).await.is_err());
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(written_on.pid)
                .fetch_one(&pool)
                .await
                .expect("terminate");
            assert!(ended);
            // Gone once its entry has left the server's activity list.
            let mut gone = false;
            for _ in 0..100 {
                if flushed(&pool, Some(written_on)).await.is_err() {
                    gone = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(gone, "a flush after the writing backend ended succeeded");
            unflushed.close().await;
            pool.close().await;
        })
        .await;
    }
}
