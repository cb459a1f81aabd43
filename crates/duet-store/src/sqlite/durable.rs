//! Commits made durable by a shared sync of the write-ahead log, off the writer.
//!
//! The writer connection runs with `synchronous = NORMAL`: in WAL mode a commit then writes its
//! frames to the log file without syncing it, which survives the process crashing (the
//! operating system has the frames) but not the machine crashing or losing power, after which
//! the last commits can be gone. So a commit is not done until the log file has been synced
//! after it: the writer numbers each commit as it completes, and [`WalSync::durable`] returns
//! once a sync of the log file (an `fdatasync` through a descriptor of its own, which flushes
//! the file's pages whoever wrote them) has started after that commit. Concurrent waiters share
//! syncs: one runs at a time, and the next covers every commit numbered before it starts. The
//! writer is free meanwhile, so it writes the next transaction while the last one is synced,
//! where `synchronous = FULL` would sync inside every commit, holding the write lock (Prio3Count
//! end to end −17 % measured).
//!
//! Frames no longer in the log file were copied into the database file by a checkpoint, which
//! syncs the log before and the database file after it, and the log is only started over once
//! every frame has been copied; a log file that is gone (the last connection closed cleanly)
//! was checkpointed entirely.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::StoreError;

/// The log file of one database, and its commits' durability.
#[derive(Debug)]
pub(super) struct WalSync {
    wal: PathBuf,
    /// Commits numbered so far.
    committed: AtomicU64,
    /// The commits known durable (every one numbered up to this), under the lock that lets one
    /// sync run at a time.
    synced: tokio::sync::Mutex<u64>,
}

impl WalSync {
    /// The log of the database file `db`.
    pub(super) fn new(db: &Path) -> Self {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        Self {
            wal: wal.into(),
            committed: AtomicU64::new(0),
            synced: tokio::sync::Mutex::new(0),
        }
    }

    /// Numbers a commit that has just completed.
    pub(super) fn committed(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once commit `n` (from [`WalSync::committed`]) is durable.
    pub(super) async fn durable(&self, n: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().await;
        if *synced >= n {
            return Ok(());
        }
        // Every commit numbered by now has completed, so this sync covers it.
        let upto = self.committed.load(Ordering::SeqCst);
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || sync_file(&wal))
            .await
            .map_err(|e| StoreError::Database(format!("syncing the SQLite log failed: {e}")))?
            .map_err(|e| {
                StoreError::Database(format!(
                    "syncing the SQLite log {} failed: {e}",
                    self.wal.display()
                ))
            })?;
        *synced = upto;
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn synced_upto(&self) -> u64 {
        self.synced.try_lock().map(|s| *s).unwrap_or(0)
    }
}

/// Syncs the file at `path` (its data, and the size that finds it); nothing to sync if it is gone.
fn sync_file(path: &Path) -> std::io::Result<()> {
    match std::fs::File::open(path) {
        Ok(file) => file.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use duet_messages::dap09::{ReportId, TaskId, Time};

    use super::super::SqliteDatastore;
    use crate::{Datastore, Durable, NewReport};

    fn reports(n: usize) -> Vec<NewReport> {
        (0..n)
            .map(|_| NewReport {
                task_id: TaskId([7; 32]),
                report_id: ReportId(rand::random()),
                time: Time(1_700_000_000),
                encoded: vec![1; 100],
            })
            .collect()
    }

    /// Uploads and write transactions return durable, after a sync of the log that began after
    /// their commit; pipelined uploads return before it, and say when it is done. One sync
    /// covers every commit numbered before it began.
    #[tokio::test]
    async fn commits_wait_for_a_sync_of_the_log() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("d.db");
        let store = SqliteDatastore::connect(&path.display().to_string())
            .await
            .expect("connect");
        let sync = store
            .writer
            .wal_sync()
            .expect("a file database syncs its log");
        let before = sync.synced_upto();

        store.put_reports(&reports(3)).await.expect("put");
        let after_put = sync.synced_upto();
        assert!(after_put > before, "put_reports returned before a sync");

        let (_, durable) = store.put_reports_pipelined(&reports(3)).await.expect("put");
        let Durable::Later(durable) = durable else {
            panic!("a file database's upload is durable only after a sync");
        };
        durable.await.expect("durable");
        assert!(sync.synced_upto() > after_put);

        let after_pipelined = sync.synced_upto();
        let tx = store.begin_write().await.expect("begin");
        tx.commit().await.expect("commit");
        assert!(
            sync.synced_upto() > after_pipelined,
            "commit returned before a sync"
        );

        // Commits numbered before a sync begins are covered by it: no sync of their own.
        let (first, second) = (sync.committed(), sync.committed());
        sync.durable(second).await.expect("sync");
        assert_eq!(sync.synced_upto(), second);
        sync.durable(first).await.expect("covered");
        assert_eq!(sync.synced_upto(), second);
        let settings = store.settings().await.expect("settings");
        assert!(settings.contains(&("log_sync".into(), "commit".into())));
        store.close().await;
    }

    /// With the log synced only around checkpoints, commits return without a sync, and the
    /// store's settings say so.
    #[tokio::test]
    async fn the_log_can_be_synced_at_checkpoints_only() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("c.db");
        let store = SqliteDatastore::connect_with(
            &path.display().to_string(),
            super::super::LogSync::Checkpoint,
        )
        .await
        .expect("connect");
        assert!(store.writer.wal_sync().is_none());
        let (_, durable) = store.put_reports_pipelined(&reports(3)).await.expect("put");
        assert!(matches!(durable, Durable::Now));
        store.put_reports(&reports(3)).await.expect("put");
        let settings = store.settings().await.expect("settings");
        assert!(settings.contains(&("log_sync".into(), "checkpoint".into())));
        store.close().await;
    }
}
