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
//! the log, and is lost with it.

use sqlx::PgPool;

use crate::StoreError;

/// Payload bytes from which a batch of uploads commits without waiting for the flush. The
/// Leader's writer fills batches up to 384 KiB; the bench's Prio3SumVec(1000) batches (about
/// 17 kB a report) reach this, and take about as long to insert as a flush. Batches of
/// Prio3Count or Histogram(100) reports (up to 64 in flight in the bench, a few to 160 kB) are
/// inserted faster than a flush and are cheaper with the flush in their own commit (an extra
/// flush transaction per small batch cost Prio3Count more CPU per report than the wait it
/// saved).
pub(super) const UNFLUSHED_MIN_BYTES: usize = 192 * 1024;

/// Returns once everything committed before this call is durable. Concurrent calls share the
/// server's flushes: a commit that finds the log being flushed waits for that flush, and if it
/// did not reach its own record, the next one flushes everything written by then.
pub(super) async fn flushed(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("-- flush\nSELECT pg_logical_emit_message(true, 'duet', '')")
        .execute(pool)
        .await
        .map_err(|e| StoreError::Database(format!("flushing the write-ahead log: {e}")))?;
    Ok(())
}
