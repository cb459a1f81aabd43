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
//! standby) and succeed there, so it also reads the server's start time, and fails unless that
//! is the start time of the server the batch was written to.

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

/// The pool of one connection for batches committed without waiting for the flush: each
/// connection it opens sets `synchronous_commit = off` and records in `server` the start time of
/// the server it is on (which names a server instance: a restart or a promoted standby has
/// another).
pub(super) fn unflushed_pool(
    pool: PgPoolOptions,
    options: PgConnectOptions,
    server: Arc<Mutex<Option<String>>>,
) -> PgPool {
    pool.after_connect(move |conn, _| {
        let server = Arc::clone(&server);
        Box::pin(async move {
            conn.execute("SET synchronous_commit = off").await?;
            let started: String = sqlx::query_scalar(START_TIME).fetch_one(&mut *conn).await?;
            *server.lock().unwrap_or_else(PoisonError::into_inner) = Some(started);
            Ok(())
        })
    })
    .connect_lazy_with(options)
}

/// The server's start time, as text.
const START_TIME: &str = "SELECT pg_postmaster_start_time()::text";

/// Returns once everything committed before this call on server instance `server` (a start
/// time from [`unflushed_pool`]) is durable, or fails if the flush ran on another instance.
/// Concurrent calls share the server's flushes: a commit that finds the log being flushed waits
/// for that flush, and if it did not reach its own record, the next one flushes everything
/// written by then.
pub(super) async fn flushed(pool: &PgPool, server: Option<String>) -> Result<(), StoreError> {
    let started: String = sqlx::query_scalar(
        "-- flush\n\
         SELECT pg_postmaster_start_time()::text FROM pg_logical_emit_message(true, 'duet', '')",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| StoreError::Database(format!("flushing the write-ahead log: {e}")))?;
    if server.as_deref() != Some(started.as_str()) {
        return Err(StoreError::Database(
            "the database server restarted before a batch of uploads was flushed; the batch \
             may be lost"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// A flush succeeds on the server instance a batch was written to, and fails on any other
    /// (a restart, or a promoted standby, may have lost the batch).
    #[tokio::test]
    async fn a_flush_on_another_server_instance_fails() {
        with_fresh_database("flush_instance", |url| async move {
            let options: PgConnectOptions = url.parse().expect("URL");
            let server = Arc::new(Mutex::new(None));
            let unflushed = unflushed_pool(
                PgPoolOptions::new().max_connections(1),
                options.clone(),
                Arc::clone(&server),
            );
            let off: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&unflushed)
                .await
                .expect("show");
            assert_eq!(off, "off");
            let written_on = server.lock().expect("lock").clone();
            assert!(written_on.is_some());
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("connect");
            flushed(&pool, written_on).await.expect("same server");
            assert!(flushed(&pool, Some("2000-01-01 00:00:00+00".into()))
                .await
                .is_err());
            assert!(flushed(&pool, None).await.is_err());
            unflushed.close().await;
            pool.close().await;
        })
        .await;
    }
}
