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
//! every frame has been copied. The log is found by the database file's real path (SQLite
//! follows symbolic links to it), and while the store is open it must be there. A sync that
//! fails poisons every later one: after a failed `fsync` the kernel may have dropped the pages
//! and reports the error once, so a later sync would succeed over commits that never reached
//! the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::StoreError;

/// The log file of one database, and its commits' durability.
#[derive(Debug)]
pub(super) struct WalSync {
    wal: PathBuf,
    /// Set once a sync has failed: nothing is durable any more.
    poisoned: AtomicBool,
    /// Commits numbered so far.
    committed: AtomicU64,
    /// The commits known durable (every one numbered up to this), under the lock that lets one
    /// sync run at a time.
    synced: tokio::sync::Mutex<u64>,
}

impl WalSync {
    /// The log of the database file `db`, which exists: the log sits beside the file it
    /// resolves to. Syncs the directory, so that a log file created since is found after a
    /// crash.
    pub(super) fn new(db: &Path) -> std::io::Result<Self> {
        let db = std::fs::canonicalize(db)?;
        if let Some(dir) = db.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        let mut wal = db.into_os_string();
        wal.push("-wal");
        Ok(Self {
            wal: wal.into(),
            poisoned: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            synced: tokio::sync::Mutex::new(0),
        })
    }

    /// Numbers a commit that has just completed.
    pub(super) fn committed(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once commit `n` (from [`WalSync::committed`]) is durable.
    pub(super) async fn durable(&self, n: u64) -> Result<(), StoreError> {
        let mut synced = self.synced.lock().await;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(StoreError::Database(
                "an earlier sync of the SQLite log failed, so commits since may not be on disk; \
                 restart the server (SQLite recovers the log) once the disk is sound"
                    .into(),
            ));
        }
        if *synced >= n {
            return Ok(());
        }
        // Every commit numbered by now has completed, so this sync covers it.
        let upto = self.committed.load(Ordering::SeqCst);
        let wal = self.wal.clone();
        let outcome = match tokio::task::spawn_blocking(move || sync_file(&wal)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "syncing the SQLite log {} failed: {e}",
                self.wal.display()
            )),
            Err(e) => Err(format!("syncing the SQLite log failed: {e}")),
        };
        if let Err(e) = outcome {
            self.poisoned.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "commits are no longer durable");
            return Err(StoreError::Database(e));
        }
        *synced = upto;
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn wal_path(&self) -> &Path {
        &self.wal
    }

    #[cfg(test)]
    pub(super) fn synced_upto(&self) -> u64 {
        self.synced.try_lock().map(|s| *s).unwrap_or(0)
    }
}

/// Syncs the file at `path` (its data, and the size that finds it).
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
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

    /// A database reached through a symbolic link has its log beside the file the link
    /// resolves to, where SQLite puts it: that file is the one synced.
    #[tokio::test]
    async fn the_log_of_a_linked_database_is_the_one_synced() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let real = dir.path().join("real.db");
        std::fs::write(&real, b"").expect("create");
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let store = SqliteDatastore::connect(&link.display().to_string())
            .await
            .expect("connect");
        store.put_reports(&reports(2)).await.expect("put");
        let sync = store.writer.wal_sync().expect("syncs");
        let real = std::fs::canonicalize(&real).expect("real path");
        assert_eq!(
            sync.wal_path(),
            std::path::Path::new(&format!("{}-wal", real.display()))
        );
        assert!(sync.wal_path().exists());
        store.close().await;
    }

    /// Once a sync has failed, no commit is reported durable any more, even if a later sync
    /// would succeed (the kernel reports a failed write back once).
    #[tokio::test]
    async fn a_failed_sync_fails_every_later_one() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let db = dir.path().join("p.db");
        std::fs::write(&db, b"").expect("create");
        let sync = super::WalSync::new(&db).expect("sync");
        // No log file yet: the sync fails.
        let first = sync.committed();
        assert!(sync.durable(first).await.is_err());
        std::fs::write(sync.wal_path(), b"frames").expect("log");
        let second = sync.committed();
        let e = sync.durable(second).await.expect_err("poisoned");
        assert!(e.to_string().contains("an earlier sync"), "{e}");
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
