//! Tests of opening a SQLite database.

use sqlx::{Connection, SqliteConnection};

use super::*;

/// A connection holding an exclusive lock on a new rollback-journal file, so that a
/// connection that wants to switch it to WAL gets `SQLITE_BUSY`.
async fn locked_file(dir: &tempfile::TempDir) -> (SqliteConnectOptions, SqliteConnection) {
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("busy.sqlite"))
        .create_if_missing(true);
    let mut holder =
        SqliteConnection::connect_with(&options.clone().journal_mode(SqliteJournalMode::Delete))
            .await
            .expect("open");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let wal = options
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(StdDuration::ZERO);
    (wal, holder)
}

#[tokio::test]
async fn busy_errors_are_recognised() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (wal, holder) = locked_file(&dir).await;
    let e = SqliteConnection::connect_with(&wal)
        .await
        .expect_err("the file is locked");
    assert!(is_busy(&e), "{e}");
    holder.close().await.expect("close");
    let mut conn = SqliteConnection::connect_with(&wal).await.expect("open");
    let e = sqlx::query("SELEKT 1")
        .execute(&mut conn)
        .await
        .expect_err("a syntax error");
    assert!(!is_busy(&e), "{e}");
}

#[tokio::test]
async fn opening_waits_out_a_busy_file() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let (wal, mut holder) = locked_file(&dir).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(OPEN_BACKOFF * 2).await;
        sqlx::query("COMMIT")
            .execute(&mut holder)
            .await
            .expect("unlock");
        holder
    });
    let pool = open_pool(SqlitePoolOptions::new().max_connections(1), wal)
        .await
        .expect("opened once the lock was released");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
    pool.close().await;
    release
        .await
        .expect("release")
        .close()
        .await
        .expect("close");
}
