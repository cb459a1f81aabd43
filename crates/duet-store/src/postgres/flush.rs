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
//! standby) and succeed there, so it also checks that the session the batch was written in is
//! still running: a crash of any backend restarts them all (`restart_after_crash`, whose
//! recovery loses what the log had not flushed, in the same postmaster, so the server's start
//! time does not change), and a restart or another server has other sessions. The session
//! holds an advisory lock on a random key of its own for as long as it lives, and the flush
//! tries to take that lock, shared: it can only if the session has gone (one probe of the lock table;
//! reading `pg_stat_activity` instead copied every backend's status, and cost SumVec(1000)
//! uploads a tenth of their rate). A batch whose session has gone (also when the connection
//! was merely closed) is answered as failed, although it may have been kept: a client's retry
//! is then a replay, counted once.

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

/// The session of the connection that writes unflushed batches: the random key of the
/// advisory lock it holds while it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Session {
    key: i64,
}

/// The pool of one connection for batches committed without waiting for the flush: each
/// connection it opens sets `synchronous_commit = off`, takes an advisory lock on a random key
/// of its own for its session's life, and records in `session` which key (see [`flushed`]).
pub(super) fn unflushed_pool(
    pool: PgPoolOptions,
    options: PgConnectOptions,
    session: Arc<Mutex<Option<Session>>>,
) -> PgPool {
    // The connection is kept while it works (no lifetime or idle limit): one replaced between
    // a batch and its flush would make the flush refuse the batch.
    pool.max_lifetime(None)
        .idle_timeout(None)
        .after_connect(move |conn, _| {
            let session = Arc::clone(&session);
            Box::pin(async move {
                conn.execute("SET synchronous_commit = off").await?;
                let key: i64 = rand::random();
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                *session.lock().unwrap_or_else(PoisonError::into_inner) = Some(Session { key });
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// Returns once everything committed before this call in `session` (from [`unflushed_pool`]) is
/// durable, or fails if that session has ended (a crash-restart may have lost what it wrote,
/// and a restarted or promoted server has other sessions). Concurrent calls share the server's
/// flushes: a commit that finds the log being flushed waits for that flush, and if it did not
/// reach its own record, the next one flushes everything written by then.
pub(super) async fn flushed(pool: &PgPool, session: Option<Session>) -> Result<(), StoreError> {
    let Some(session) = session else {
        return Err(gone());
    };
    // Checked in the flushing transaction: a crash after the check ends it before its commit.
    // Shared: the session's own lock is exclusive, and concurrent flushes of batches of a
    // session that has gone all get it (an exclusive one taken by the first would make the
    // others see the session running). Released at the flush's commit.
    let running: bool = sqlx::query_scalar(
        "-- flush\n\
         SELECT NOT pg_try_advisory_xact_lock_shared($1) \
         FROM pg_logical_emit_message(true, 'duet', '')",
    )
    .bind(session.key)
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
        "the database session a batch of uploads was written in ended before the batch was \
         flushed (the server may have restarted); the batch may be lost"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, PgConnection};

    use super::*;
    use crate::conformance::postgres::with_fresh_database;

    /// A flush succeeds while the session a batch was written in runs, and fails once it has
    /// gone, as every session goes in a crash-restart (which keeps the server's start time), or
    /// for a session of another server.
    #[tokio::test]
    async fn a_flush_after_the_writing_session_has_gone_fails() {
        with_fresh_database("flush_session", |url| async move {
            let options: PgConnectOptions = url.parse().expect("URL");
            let session = Arc::new(Mutex::new(None));
            let unflushed = unflushed_pool(
                PgPoolOptions::new().max_connections(1),
                options.clone(),
                Arc::clone(&session),
            );
            let (off, pid): (String, i32) =
                sqlx::query_as("SELECT current_setting('synchronous_commit'), pg_backend_pid()")
                    .fetch_one(&unflushed)
                    .await
                    .expect("show");
            assert_eq!(off, "off");
            let written_in = *session.lock().expect("lock");
            let Some(written_in) = written_in else {
                panic!("no session recorded");
            };
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("connect");
            flushed(&pool, Some(written_in))
                .await
                .expect("same session");
            flushed(&pool, Some(written_in)).await.expect("again");
            let other = Session {
                key: written_in.key.wrapping_add(1),
            };
            assert!(flushed(&pool, Some(other)).await.is_err());
            assert!(flushed(&pool, None).await.is_err());
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(pid)
                .fetch_one(&pool)
                .await
                .expect("terminate");
            assert!(ended);
            assert!(
                flushed(&pool, Some(written_in)).await.is_err(),
                "a flush after the writing session ended succeeded"
            );
            // Nor while another flush of the session's batches holds its lock.
            let mut other = PgConnection::connect(&url).await.expect("connect");
            let mut tx = other.begin().await.expect("begin");
            let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock_shared($1)")
                .bind(written_in.key)
                .fetch_one(&mut *tx)
                .await
                .expect("lock");
            assert!(taken);
            assert!(
                flushed(&pool, Some(written_in)).await.is_err(),
                "a flush beside another of a session that had ended succeeded"
            );
            tx.rollback().await.expect("rollback");
            other.close().await.expect("close");
            unflushed.close().await;
            pool.close().await;
        })
        .await;
    }
}
