//! Checkpoints of the write-ahead log, off the writer.
//!
//! SQLite's automatic checkpoint runs in the connection whose commit takes the log past its
//! threshold: here the writer, which then copies the log's pages back into the database file and
//! syncs the file while every other write of the process waits for it. With large reports that
//! was most of the writer's time (a Prio3SumVec(1000) report is about 17 kB). Instead a task of
//! its own runs a `PASSIVE` checkpoint on a connection of its own once the log holds
//! [`THRESHOLD_PAGES`] pages not yet copied back, as the writer did (hot pages, such as job rows
//! and index pages, are then copied once per that much writing), or once [`IDLE`] has passed
//! with some left. A `PASSIVE` checkpoint copies the pages no reader still needs and syncs the
//! file without taking the write lock, so writes go on meanwhile. The task reads the log's
//! length every [`TICK`] from the header of SQLite's WAL index (the `-shm` file, whose layout
//! the SQLite file-format documentation specifies); if that cannot be read, it checkpoints every
//! [`IDLE`]. The writer keeps an automatic checkpoint at [`WRITER_FALLBACK_PAGES`], far above
//! what the task leaves, in case the task falls behind.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use super::retry_busy;
use crate::StoreError;

/// Pages not yet copied back at which the task checkpoints (64 MiB of 4 KiB pages).
const THRESHOLD_PAGES: u32 = 16_384;
/// How often the task reads the log's length.
const TICK: Duration = Duration::from_millis(50);
/// How long pages may wait, below the threshold, before the task copies them back anyway.
const IDLE: Duration = Duration::from_secs(2);

/// The log's length, in pages, at which the writer checkpoints by itself (SQLite's automatic
/// checkpoint): only if the task has fallen this far behind (1 GiB of 4 KiB pages).
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
    pub(super) async fn start(options: &SqliteConnectOptions) -> Result<Arc<Self>, StoreError> {
        let conn = retry_busy(|| SqliteConnection::connect_with(options)).await?;
        let mut shm = options.get_filename().as_os_str().to_owned();
        shm.push("-shm");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(conn, PathBuf::from(shm), stopped));
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
    Some(word(16).saturating_sub(word(96)))
}

/// Checkpoints as the module docs say, until told to stop (or the sender is gone).
async fn run(mut conn: SqliteConnection, shm: PathBuf, mut stopped: watch::Receiver<bool>) {
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
            Some(pages) => pages >= THRESHOLD_PAGES || (pages > 0 && waited >= idle_ticks),
            None => waited >= idle_ticks,
        };
        if !due {
            continue;
        }
        waited = 0;
        // `PASSIVE` never waits for readers or the writer: it copies what it can. A busy
        // checkpoint lock (another process checkpointing the same file) is reported in the
        // result row, not as an error.
        if let Err(e) = sqlx::query("-- checkpoint\nPRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "checkpointing the SQLite write-ahead log failed");
        }
    }
    if let Err(e) = conn.close().await {
        tracing::debug!(error = %e, "closing the SQLite checkpoint connection failed");
    }
}

#[cfg(test)]
mod tests {
    use super::super::SqliteDatastore;

    /// Pages the test writes: far fewer than the writer's own checkpoint threshold, so only the
    /// task can copy them into the database file.
    const PAGES: usize = 1000;

    /// Writes land in the database file without the writer checkpointing, and closing the store
    /// closes the task's connection too: the last connection to close removes the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_is_checkpointed_off_the_writer_and_closed_with_the_store() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("checkpointed.sqlite");
        let wal = dir.path().join("checkpointed.sqlite-wal");
        let store = SqliteDatastore::connect(path.to_str().expect("utf-8"))
            .await
            .expect("connect");
        let before = std::fs::metadata(&path).expect("file").len();
        {
            let mut conn = store.write_statement().await.expect("writer");
            sqlx::query("CREATE TABLE filler (page BLOB)")
                .execute(&mut *conn)
                .await
                .expect("create");
            sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) \
                 INSERT INTO filler SELECT randomblob(4000) FROM n",
            )
            .bind(PAGES as i64)
            .execute(&mut *conn)
            .await
            .expect("fill");
        }
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
}
