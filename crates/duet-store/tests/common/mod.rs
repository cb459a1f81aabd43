//! Helpers the PostgreSQL test files share (each uses some of them).
#![allow(dead_code)]

use duet_messages::dap09::{Duration, Interval, ReportId, TaskId, Time};
use duet_store::{NewReport, Wakeup};

/// The bucket width of these tests.
pub const PRECISION: u64 = 3600;
/// A `PRECISION`-aligned start time.
pub const T0: u64 = 470_000 * PRECISION;

pub fn interval(start: u64, duration: u64) -> Interval {
    Interval {
        start: Time(start),
        duration: Duration(duration),
    }
}

/// A report at `time` whose payload is its ID.
pub fn report(task_id: TaskId, time: u64) -> NewReport {
    let report_id = ReportId::random();
    NewReport {
        task_id,
        report_id,
        time: Time(time),
        encoded: report_id.0.to_vec(),
    }
}

/// The next wake-up, which must come within two seconds.
pub async fn next_wakeup(rx: &mut tokio::sync::broadcast::Receiver<Wakeup>) -> Wakeup {
    tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
        .await
        .expect("a wake-up within 2 s")
        .expect("the wake-up channel is open")
}

/// The open run in replay state table `state` (`helper_replay_state` or `leader_replay_state`),
/// once it is at least `at_least` (runs close in the background).
pub async fn open_run(url: &str, state: &str, at_least: i32) -> i32 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    for _ in 0..200 {
        let open: i32 = sqlx::query_scalar(&format!("SELECT open_run FROM {state}"))
            .fetch_one(&mut conn)
            .await
            .expect("open run");
        if open >= at_least {
            conn.close().await.expect("close");
            return open;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("run {at_least} did not open");
}

/// Waits until a statement whose text starts with `-- {tag}` waits for a lock: another
/// connection holds one it needs. Panics after five seconds.
pub async fn waiting_on_lock(url: &str, tag: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND query LIKE '-- ' || $1 || '%'",
        )
        .bind(tag)
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            conn.close().await.expect("close");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no `{tag}` statement waited for a lock");
}

/// Ends the transaction open on `conn` with `end` (`COMMIT` or `ROLLBACK`), and closes `conn`.
pub async fn end_transaction(mut conn: sqlx::PgConnection, end: &str) {
    use sqlx::Connection;
    sqlx::query(end).execute(&mut conn).await.expect(end);
    conn.close().await.expect("close");
}
