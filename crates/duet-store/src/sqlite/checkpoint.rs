//! Checkpoints of the write-ahead log, off the writer.
//!
//! SQLite's automatic checkpoint runs in the connection whose commit takes the log past its
//! threshold: here the writer, which then copies the log's pages back into the database file and
//! syncs the file while every other write of the process waits for it. With large reports that
//! was most of the writer's time (a Prio3SumVec(1000) report is about 17 kB). Instead a task of
//! its own runs a `PASSIVE` checkpoint on a connection of its own once the log holds
//! [`THRESHOLD_BYTES`] of pages not yet copied back, as the writer did (hot pages, such as job rows
//! and index pages, are then copied once per that much writing), or once [`IDLE`] has passed
//! with some left. A `PASSIVE` checkpoint copies the pages no reader still needs and syncs the
//! file without taking the write lock, so writes go on meanwhile. The task reads the log's
//! length every [`TICK`] from the header of SQLite's WAL index (the `-shm` file, whose layout
//! the SQLite file-format documentation specifies); if that cannot be read, it checkpoints every
//! [`IDLE`]. The writer keeps an automatic checkpoint at [`WRITER_FALLBACK_PAGES`], far above
//! what the task leaves, in case the task falls behind.
//!
//! Copying the log back does not start it over: SQLite writes from the log's start again only
//! when a write begins with every frame copied back and no reader in the log, and under a steady
//! load frames are added while a `PASSIVE` checkpoint runs. So the log grew to the writer's
//! fallback (1 GiB) before it started over, every commit's sync then extended the file (which
//! also syncs its size and new blocks: about 75 µs more per sync here), and a crash left a large
//! log to recover. After each `PASSIVE` checkpoint that copied back all but at most
//! [`RESTART_MAX_LEFT_BYTES`] of frames, the task therefore holds this process's writes and runs a
//! `RESTART` checkpoint: it copies the few frames left or written meanwhile, waits briefly for
//! readers on an older snapshot, and starts the log over, so the log stays near
//! [`THRESHOLD_BYTES`] and later commits overwrite it. Writes wait a few milliseconds for that,
//! once per checkpoint (Prio3Count end to end +7 % measured).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use super::retry_busy;
use super::writer::Writer;
use crate::StoreError;

/// Bytes of pages not yet copied back at which the task checkpoints (16,384 pages of 4 KiB).
const THRESHOLD_BYTES: u32 = 64 << 20;
/// Bytes of frames a `PASSIVE` checkpoint may leave uncopied (held back by a reader) for the
/// restart to copy with writes held (1,024 pages of 4 KiB).
const RESTART_MAX_LEFT_BYTES: u32 = 4 << 20;

/// [`THRESHOLD_BYTES`] and [`RESTART_MAX_LEFT_BYTES`] in pages of the database's size.
#[derive(Clone, Copy, Debug)]
struct Limits {
    threshold_pages: u32,
    restart_max_left: i64,
}

impl Limits {
    fn for_page_size(page_size: u32) -> Self {
        let page_size = page_size.max(512);
        Limits {
            threshold_pages: THRESHOLD_BYTES / page_size,
            restart_max_left: i64::from(RESTART_MAX_LEFT_BYTES / page_size),
        }
    }
}
/// How long the restart of the log waits for readers on an older snapshot, holding writes.
const RESTART_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 20";
/// How often the task reads the log's length.
const TICK: Duration = Duration::from_millis(50);
/// How long pages may wait, below the threshold, before the task copies them back anyway.
const IDLE: Duration = Duration::from_secs(2);

/// The log's length, in pages, at which the writer checkpoints by itself (SQLite's automatic
/// checkpoint): only if the task has fallen this far behind (1 GiB of 4 KiB pages; set before
/// the page size is known, so twice that with 8 KiB pages).
pub(super) const WRITER_FALLBACK_PAGES: &str = "262144";

/// The checkpoint task of one store (every handle on it); stopped by [`Checkpointer::close`] or
/// when the last handle is dropped.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    /// Opens the task's connection (retrying while the file is busy) and starts it.
    pub(super) async fn start(
        options: &SqliteConnectOptions,
        writer: Writer,
    ) -> Result<Arc<Self>, StoreError> {
        let mut conn = retry_busy(|| SqliteConnection::connect_with(options)).await?;
        sqlx::query(RESTART_BUSY_TIMEOUT)
            .execute(&mut conn)
            .await
            .map_err(super::db)?;
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut conn)
            .await
            .map_err(super::db)?;
        let limits = Limits::for_page_size(u32::try_from(page_size).unwrap_or(4096));
        let mut shm = options.get_filename().as_os_str().to_owned();
        shm.push("-shm");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(conn, writer, PathBuf::from(shm), limits, stopped));
        Ok(Arc::new(Checkpointer {
            stop,
            task: Mutex::new(Some(task)),
        }))
    }

    /// Stops the task after the checkpoint under way, if any, and closes its connection.
    pub(super) async fn close(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().await.take() {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the SQLite checkpoint task failed");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Pages in the log not yet copied back into the database file, from the WAL index's header:
/// `mxFrame` (the log's last valid frame) at byte 16 of the header, which is stored twice (bytes
/// 0–47 and 48–95; they differ while a writer updates them), and `nBackfill` (frames already
/// copied back) at byte 96, all in the machine's byte order. `None` if the file cannot be read,
/// is not a version 3007000 index, or is being updated.
fn pending_pages(shm: &std::fs::File) -> Option<u32> {
    let (frames, copied) = log_frames(shm)?;
    Some(frames.saturating_sub(copied))
}

/// The log's valid frames and those of them copied back, as [`pending_pages`] reads them.
fn log_frames(shm: &std::fs::File) -> Option<(u32, u32)> {
    let mut header = [0u8; 100];
    shm.read_exact_at(&mut header, 0).ok()?;
    let word = |at: usize| {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&header[at..at + 4]);
        u32::from_ne_bytes(bytes)
    };
    if word(0) != 3_007_000 || header[..48] != header[48..96] {
        return None;
    }
    Some((word(16), word(96)))
}

/// One checkpoint: a `PASSIVE` one, then, if it left at most `restart_max_left` frames
/// uncopied, the restart of the log. Returns whether the restart was tried.
async fn checkpoint(conn: &mut SqliteConnection, writer: &Writer, restart_max_left: i64) -> bool {
    // `PASSIVE` never waits for readers or the writer: it copies what it can. A busy
    // checkpoint lock (another process checkpointing the same file) is reported in the
    // result row, not as an error.
    match sqlx::query_as::<_, (i64, i64, i64)>("-- checkpoint\nPRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(&mut *conn)
        .await
    {
        Ok((0, log, copied)) if log >= 0 && log - copied <= restart_max_left => {
            restart(conn, writer).await;
            true
        }
        // A reader on an older snapshot held the copy back (or another process was
        // checkpointing): copying the rest with writes held could take long, so the log is
        // started over after a later checkpoint.
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %e, "checkpointing the SQLite write-ahead log failed");
            false
        }
    }
}

/// Starts the log over: copies back the frames written during the `PASSIVE` checkpoint just
/// run, with this process's writes held meanwhile, and has the next commit write from the
/// log's start. Skipped if the store is closing.
async fn restart(conn: &mut SqliteConnection, writer: &Writer) {
    let Ok(_writes_held) = writer.lock().await else {
        return;
    };
    // Waits (up to the connection's short busy timeout) for readers still on an older snapshot
    // to finish; if they don't, the log goes on growing until the next checkpoint.
    match sqlx::query_as::<_, (i64, i64, i64)>("-- restart the log\nPRAGMA wal_checkpoint(RESTART)")
        .fetch_one(&mut *conn)
        .await
    {
        Ok((busy, log, copied)) => {
            tracing::debug!(busy, log, copied, "restarted the SQLite write-ahead log");
        }
        Err(e) => tracing::warn!(error = %e, "restarting the SQLite write-ahead log failed"),
    }
}

/// Checkpoints as the module docs say, until told to stop (or the sender is gone).
async fn run(
    mut conn: SqliteConnection,
    writer: Writer,
    shm: PathBuf,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut index = None;
    // Ticks since the last checkpoint.
    let mut waited: u32 = 0;
    let idle_ticks = (IDLE.as_millis() / TICK.as_millis()) as u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
        waited = waited.saturating_add(1);
        if index.is_none() {
            index = std::fs::File::open(&shm).ok();
        }
        let pending = index.as_ref().and_then(pending_pages);
        let due = match pending {
            Some(pages) => pages >= limits.threshold_pages || (pages > 0 && waited >= idle_ticks),
            None => waited >= idle_ticks,
        };
        if !due {
            continue;
        }
        waited = 0;
        checkpoint(&mut conn, &writer, limits.restart_max_left).await;
    }
    if let Err(e) = conn.close().await {
        tracing::debug!(error = %e, "closing the SQLite checkpoint connection failed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::writer::Writer;
    use super::super::{temp_store, SqliteDatastore};

    /// Pages the test writes: far fewer than the writer's own checkpoint threshold, so only the
    /// task can copy them into the database file.
    const PAGES: usize = 1000;

    /// The restart's limit in frames, for the tests' databases (4 KiB pages).
    const LEFT: i64 = (super::RESTART_MAX_LEFT_BYTES / 4096) as i64;

    /// Writes `pages` pages of random bytes into the `filler` table, in one commit.
    async fn fill(store: &SqliteDatastore, pages: i64) {
        let mut conn = store.write_statement().await.expect("writer");
        sqlx::query("CREATE TABLE IF NOT EXISTS filler (page BLOB)")
            .execute(&mut *conn)
            .await
            .expect("create");
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) \
             INSERT INTO filler SELECT randomblob(4000) FROM n",
        )
        .bind(pages)
        .execute(&mut *conn)
        .await
        .expect("fill");
    }

    /// A read transaction in the log (on the `filler` table).
    async fn reading(store: &SqliteDatastore) -> sqlx::Transaction<'static, sqlx::Sqlite> {
        let mut reader = store.pool.begin().await.expect("read transaction");
        let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM filler")
            .fetch_one(&mut *reader)
            .await
            .expect("read");
        reader
    }

    /// A connection of the test's own to checkpoint `path` with, whose restart waits for
    /// readers far longer than the task's (so that a loaded machine cannot fail the test).
    async fn checkpoint_connection(path: &std::path::Path) -> sqlx::SqliteConnection {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(std::time::Duration::from_secs(10));
        <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options)
            .await
            .expect("checkpoint connection")
    }

    /// A checkpoint copies back what the log holds, and its restart, holding writes meanwhile,
    /// waits for a reader still in it, so that the next commit writes from the log's start
    /// instead of extending the file (with only a `PASSIVE` checkpoint, that reader would make
    /// it extend the file).
    #[tokio::test]
    async fn a_restart_starts_the_log_over() {
        let (dir, store) = temp_store("restarted.sqlite").await;
        let path = dir.path().join("restarted.sqlite");
        fill(&store, 300).await;
        let shm = std::fs::File::open(dir.path().join("restarted.sqlite-shm")).expect("shm");
        let (frames, _) = super::log_frames(&shm).expect("the WAL index's header");
        assert!(frames >= 300, "{frames} frames in the log");
        let wal = dir.path().join("restarted.sqlite-wal");
        let size = std::fs::metadata(&wal).expect("log").len();

        // A reader in the log, done a moment after the restart has begun to hold writes (or
        // after five seconds, if it never does: the writing task then fails the test).
        let reader = reading(&store).await;
        let read_ending = Arc::new(AtomicBool::new(false));
        let (held_seen, restart_holds) = tokio::sync::oneshot::channel::<()>();
        let reading = tokio::spawn({
            let read_ending = Arc::clone(&read_ending);
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), restart_holds).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                read_ending.store(true, Ordering::SeqCst);
                reader.rollback().await.expect("end the read");
            }
        });
        // A write that comes while the restart waits for the reader waits for the restart.
        let Writer::Own(held, _) = &store.writer else {
            panic!("a file database has a writer of its own");
        };
        let writing = tokio::spawn({
            let (held, store, read_ending) = (Arc::clone(held), store.clone(), read_ending.clone());
            async move {
                let mut seen = false;
                for _ in 0..5_000 {
                    if held.try_lock().is_err() {
                        seen = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                assert!(seen, "the restart never held the writes");
                let _ = held_seen.send(());
                fill(&store, 1).await;
                assert!(
                    read_ending.load(Ordering::SeqCst),
                    "a write went on while the restart held writes"
                );
            }
        });
        let mut conn = checkpoint_connection(&path).await;
        assert!(
            super::checkpoint(&mut conn, &store.writer, LEFT).await,
            "restarted"
        );
        writing.await.expect("the write");
        // That write, and the next, went to the log's start.
        fill(&store, 5).await;
        let (frames, _) = super::log_frames(&shm).expect("header");
        assert!(
            frames < 30,
            "the commit wrote from the log's start: {frames} frames"
        );
        assert_eq!(std::fs::metadata(&wal).expect("log").len(), size);
        reading.await.expect("reader");
        sqlx::Connection::close(conn).await.expect("close");
        store.close().await;
    }

    /// A reader that holds most of the log back from the `PASSIVE` checkpoint leaves the
    /// restart (which would copy the rest with writes held) for a later checkpoint.
    #[tokio::test]
    async fn a_log_held_back_by_a_reader_is_restarted_later() {
        let (dir, store) = temp_store("held.sqlite").await;
        let path = dir.path().join("held.sqlite");
        fill(&store, 1).await;
        let reader = reading(&store).await;
        fill(&store, 2 * LEFT).await;
        let mut conn = checkpoint_connection(&path).await;
        assert!(
            !super::checkpoint(&mut conn, &store.writer, LEFT).await,
            "held back"
        );
        reader.rollback().await.expect("end the read");
        assert!(
            super::checkpoint(&mut conn, &store.writer, LEFT).await,
            "restarted"
        );
        sqlx::Connection::close(conn).await.expect("close");
        store.close().await;
    }

    /// Writes land in the database file without the writer checkpointing, and closing the store
    /// closes the task's connection too: the last connection to close removes the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_checkpointed_off_the_writer_and_closed_with_the_store() {
        let (dir, store) = temp_store("checkpointed.sqlite").await;
        let path = dir.path().join("checkpointed.sqlite");
        let wal = dir.path().join("checkpointed.sqlite-wal");
        let before = std::fs::metadata(&path).expect("file").len();
        fill(&store, PAGES as i64).await;
        assert!(wal.exists(), "the writes went to the log");
        let shm = std::fs::File::open(dir.path().join("checkpointed.sqlite-shm")).expect("shm");
        let pending = super::pending_pages(&shm).expect("the WAL index's header");
        assert!(pending >= PAGES as u32, "{pending} pages in the log");
        // Below the threshold, the task copies the pages back after `IDLE`; allow it much more.
        let grown = (before + (PAGES as u64) * 4000).min(before + 3_000_000);
        let mut copied = false;
        for _ in 0..300 {
            if std::fs::metadata(&path).expect("file").len() >= grown {
                copied = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(copied, "the log's pages reached the database file");
        store.close().await;
        assert!(
            !wal.exists(),
            "every connection closed, the checkpoint task's too"
        );
    }

    /// The checkpoint task's limits are bytes: the same log length in pages of any size.
    #[test]
    fn limits_follow_the_page_size() {
        let (four, eight) = (
            super::Limits::for_page_size(4096),
            super::Limits::for_page_size(8192),
        );
        assert_eq!(
            (four.threshold_pages, four.restart_max_left),
            (16_384, 1024)
        );
        assert_eq!((eight.threshold_pages, eight.restart_max_left), (8192, 512));
    }
}
