//! Write transactions and large upload batches committed without syncing the log, made
//! durable by a shared sync after their commit.
//!
//! With [`super::LogSync::Commit`] every connection runs `synchronous = FULL`: in WAL mode a
//! commit then syncs the log file before it returns, on the writer connection's own thread.
//! For a small upload batch that is the cheapest durable commit: no other thread to wake, and
//! since the log is overwritten rather than extended (see [`super::checkpoint`]) a sync takes
//! about 115 µs here. But a sync in the commit holds the writer meanwhile. A large batch of
//! uploads (Prio3SumVec(1000) reports are about 17 kB each) takes a millisecond or more to
//! write and about as long to sync, during which the Leader's report writer could already be
//! writing the next batch; and the jobs' write transactions come several at once, which could
//! share one sync. So, as PostgreSQL's large batches skip the flush (see `postgres::flush`),
//! these commit with `synchronous = NORMAL`: their frames reach the log file unsynced, which
//! survives the process crashing but not the machine, and they count as done once
//! [`WalSync::durable`] has seen a sync of the log (an `fdatasync` through a descriptor of its
//! own, which flushes the file's pages whoever wrote them) that started after the commit.
//! Concurrent waiters share syncs: one runs at a time, and the next covers every commit
//! numbered before it starts. Each user of the writer sets the setting it commits under as it
//! writes: the change rides in front of its first statement (an upload batch's `INSERT`, a
//! transaction's `BEGIN`), in the same round trip ([`super::writer::Writer::statement_for`]).
//! The setting is kept between users, so a run of uploads of one size switches nothing.
//!
//! Frames no longer in the log file were copied into the database file by a checkpoint, which
//! syncs the log before and the database file after it. The log is found by the database
//! file's real path (SQLite follows symbolic links to it) and opened with the store, and the
//! syncs go through that descriptor: after a failed write-back the kernel may drop the pages
//! and reports the error once to each descriptor open at the time, so a descriptor opened for
//! each sync would miss an error that SQLite's own sync (in a commit under `FULL`) saw first. A
//! sync that fails poisons every later one, for the same reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::CommitSync;
use crate::StoreError;

/// SQLite's `synchronous` values, and a setting not known.
const NORMAL: u8 = 1;
const FULL: u8 = 2;
const UNKNOWN: u8 = u8::MAX;

/// Payload bytes from which an upload batch commits without syncing the log (the Leader's
/// writer fills batches up to 384 KiB). Prio3SumVec(1000) batches reach it; Prio3Count and
/// Histogram(100) batches (a few to 160 kB) commit faster with the sync in their own commit.
pub(super) const UNSYNCED_MIN_BYTES: usize = 192 * 1024;

/// A change of the writer connection's `synchronous` setting: [`SettingChange::statement`]
/// makes it, and [`SettingChange::made`] records that it ran (until then the setting counts as
/// unknown).
#[must_use]
pub(super) struct SettingChange {
    sync: Arc<WalSync>,
    setting: u8,
}

impl SettingChange {
    /// The statement that makes the change, ending in `;` and a new line.
    pub(super) fn statement(&self) -> &'static str {
        if self.setting == FULL {
            "PRAGMA synchronous = 2;\n"
        } else {
            "PRAGMA synchronous = 1;\n"
        }
    }

    /// Records that [`SettingChange::statement`] ran successfully, on the writer connection
    /// still locked.
    pub(super) fn made(self) {
        self.sync.setting.store(self.setting, Ordering::SeqCst);
    }
}

/// The log file of one database, and its commits' durability.
#[derive(Debug)]
pub(super) struct WalSync {
    wal: PathBuf,
    /// The log file, open since the store opened: Linux reports a failed write-back to every
    /// descriptor open when it happened, once, so a sync through this one also fails after a
    /// write-back that failed in SQLite's own sync (in a commit under `FULL`).
    file: Arc<std::fs::File>,
    /// Set once a sync has failed: nothing is durable any more.
    poisoned: AtomicBool,
    /// The writer connection's `synchronous` setting as last set (`FULL` or `NORMAL`), or
    /// [`UNKNOWN`] while it is being set or after that failed.
    setting: AtomicU8,
    /// Commits numbered so far.
    committed: AtomicU64,
    /// The commits known durable (every one numbered up to this), under the lock that lets one
    /// sync run at a time.
    synced: tokio::sync::Mutex<u64>,
}

impl WalSync {
    /// The log of the database file `db`, which exists and is open in WAL mode: the log sits
    /// beside the file it resolves to. Syncs the directory, so that the log file is found after
    /// a crash.
    pub(super) fn new(db: &Path) -> std::io::Result<Self> {
        let db = std::fs::canonicalize(db)?;
        if let Some(dir) = db.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        let mut wal = db.into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let file = std::fs::File::open(&wal)?;
        Ok(Self::with_file(wal, file))
    }

    /// Syncs of `file`, the log at `wal`.
    fn with_file(wal: PathBuf, file: std::fs::File) -> Self {
        Self {
            wal,
            file: Arc::new(file),
            poisoned: AtomicBool::new(false),
            setting: AtomicU8::new(UNKNOWN),
            committed: AtomicU64::new(0),
            synced: tokio::sync::Mutex::new(0),
        }
    }

    /// The change, if any, that makes the writer connection commit as `commit` says; `None`
    /// if it already does. The caller holds the writer's lock, and runs
    /// [`SettingChange::statement`] before its own commit, in the same round trip to the
    /// connection's thread as its first statement (a round trip of its own cost an upload batch
    /// about 0.4 ms under load, when batches of two sizes alternate around
    /// [`UNSYNCED_MIN_BYTES`]).
    pub(super) fn change_for(self: &Arc<Self>, commit: CommitSync) -> Option<SettingChange> {
        let setting = match commit {
            CommitSync::InCommit => FULL,
            CommitSync::AfterCommit => NORMAL,
        };
        // Unknown until the statement has succeeded: if it fails, or its caller goes away
        // meanwhile, the next user sets the setting again.
        if self.setting.swap(UNKNOWN, Ordering::SeqCst) == setting {
            self.setting.store(setting, Ordering::SeqCst);
            return None;
        }
        Some(SettingChange {
            sync: Arc::clone(self),
            setting,
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
        let file = Arc::clone(&self.file);
        let outcome = match tokio::task::spawn_blocking(move || file.sync_data()).await {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use duet_messages::dap09::{ReportId, TaskId, Time};

    use super::super::{temp_store, SqliteDatastore};
    use super::CommitSync;
    use crate::{Datastore, Durable, NewReport};

    fn reports(n: usize, bytes: usize) -> Vec<NewReport> {
        (0..n)
            .map(|_| NewReport {
                task_id: TaskId([7; 32]),
                report_id: ReportId(rand::random()),
                time: Time(1_700_000_000),
                encoded: vec![1; bytes],
            })
            .collect()
    }

    /// The writer connection's `synchronous` (2 is `FULL`, 1 `NORMAL`), as its last user left
    /// it.
    async fn writer_synchronous(store: &SqliteDatastore) -> i64 {
        let mut conn = store.writer.lock().await.expect("writer");
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .expect("pragma")
    }

    /// Puts a small batch, which is durable when its commit returns: committed under `FULL`,
    /// with the setting known (the next small batch changes nothing).
    async fn put_small_synced_in_commit(store: &SqliteDatastore) {
        let (_, durable) = store
            .put_reports_pipelined(&reports(3, 100))
            .await
            .expect("put");
        assert!(matches!(durable, Durable::Now), "synced in its commit");
        assert_eq!(writer_synchronous(store).await, 2, "FULL");
        let sync = store.writer.wal_sync().expect("syncs");
        assert!(sync.change_for(CommitSync::InCommit).is_none());
    }

    /// A small upload batch is durable when its commit returns (the log synced in the commit);
    /// a large one returns before, and says when a sync of the log begun after it is done; a
    /// write transaction returns after such a sync. The writer keeps the last setting until a
    /// user needs the other. One sync covers every commit numbered before it began.
    #[tokio::test]
    async fn large_upload_batches_and_transactions_are_synced_after_their_commit() {
        let (_dir, store) = temp_store("d.db").await;
        let sync = store
            .writer
            .wal_sync()
            .expect("a file database syncs its log");
        let before = sync.synced_upto();

        let (_, durable) = store
            .put_reports_pipelined(&reports(3, 100))
            .await
            .expect("put");
        assert!(matches!(durable, Durable::Now), "synced in its commit");
        assert_eq!(sync.synced_upto(), before, "no sync of its own");
        assert_eq!(writer_synchronous(&store).await, 2, "FULL");

        let tx = store.begin_write().await.expect("begin");
        tx.commit().await.expect("commit");
        assert!(sync.synced_upto() > before, "returned before a sync");
        assert_eq!(
            writer_synchronous(&store).await,
            1,
            "committed under NORMAL"
        );

        let large = reports(2, super::UNSYNCED_MIN_BYTES / 2);
        let (_, durable) = store.put_reports_pipelined(&large).await.expect("put");
        let Durable::Later(durable) = durable else {
            panic!("a large batch is durable only after a sync");
        };
        let after_tx = sync.synced_upto();
        durable.await.expect("durable");
        assert!(sync.synced_upto() > after_tx);
        assert_eq!(writer_synchronous(&store).await, 1, "NORMAL, kept");
        assert!(sync.change_for(CommitSync::AfterCommit).is_none());

        // After it, a small batch syncs in its commit again, the setting changed in the batch's
        // own statement.
        let after_large = sync.synced_upto();
        put_small_synced_in_commit(&store).await;
        assert_eq!(sync.synced_upto(), after_large);

        // Commits numbered before a sync begins are covered by it: no sync of their own.
        let (first, second) = (sync.committed(), sync.committed());
        sync.durable(second).await.expect("sync");
        assert_eq!(sync.synced_upto(), second);
        sync.durable(first).await.expect("covered");
        assert_eq!(sync.synced_upto(), second);
        let settings = store.settings().await.expect("settings");
        assert!(settings.contains(&("log_sync".into(), "commit".into())));
        assert!(settings.contains(&("synchronous".into(), "FULL".into())));
        store.close().await;
    }

    /// An upload whose `INSERT` fails after the change of setting in front of it ran leaves the
    /// setting unknown (so the next user sets it again), not recorded as made; the next upload
    /// then commits durably as usual.
    #[tokio::test]
    async fn an_upload_that_fails_after_its_setting_change_leaves_the_setting_unknown() {
        let (_dir, store) = temp_store("f.db").await;
        let sync = store.writer.wal_sync().expect("syncs");
        // A transaction leaves the writer under NORMAL; a small batch then needs FULL.
        store
            .begin_write()
            .await
            .expect("begin")
            .commit()
            .await
            .expect("commit");
        {
            let mut conn = store.writer.lock().await.expect("writer");
            sqlx::raw_sql(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON reports \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .execute(&mut *conn)
            .await
            .expect("trigger");
        }
        let refused = store.put_reports_pipelined(&reports(3, 100)).await;
        assert!(refused.is_err(), "the trigger refuses the insert");
        assert_eq!(writer_synchronous(&store).await, 2, "the change ran");
        assert!(
            sync.change_for(CommitSync::InCommit).is_some(),
            "but is not recorded as made"
        );
        {
            let mut conn = store.writer.lock().await.expect("writer");
            sqlx::raw_sql("DROP TRIGGER refuse")
                .execute(&mut *conn)
                .await
                .expect("drop");
        }
        put_small_synced_in_commit(&store).await;
        store.close().await;
    }

    /// A batch too long for one statement (a transaction of several) commits the same way:
    /// synced in its commit if small, after it if large.
    #[tokio::test]
    async fn long_upload_batches_commit_by_their_size_too() {
        let (_dir, store) = temp_store("l.db").await;
        let sync = store.writer.wal_sync().expect("syncs");
        let rows = super::super::MAX_BIND_PARAMS / 4 + 1;
        let before = sync.synced_upto();
        let (_, durable) = store
            .put_reports_pipelined(&reports(rows, 100))
            .await
            .expect("put");
        assert!(matches!(durable, Durable::Now), "synced in its commit");
        assert_eq!(sync.synced_upto(), before);
        let large = reports(rows, super::UNSYNCED_MIN_BYTES / rows + 1);
        let (_, durable) = store.put_reports_pipelined(&large).await.expect("put");
        let Durable::Later(durable) = durable else {
            panic!("a large batch is durable only after a sync");
        };
        durable.await.expect("durable");
        assert!(sync.synced_upto() > before);
        store.close().await;
    }

    /// A setting whose statement did not finish (its caller gone, or the statement failed) is
    /// not known, and the next user sets it again rather than trust it.
    #[tokio::test]
    async fn a_setting_not_known_is_set_again() {
        let (_dir, store) = temp_store("r.db").await;
        let sync = store.writer.wal_sync().expect("syncs");
        store.put_reports(&reports(1, 100)).await.expect("put");
        {
            // As a caller gone between the setting's swap and its statement's end would leave it.
            let mut conn = store.write_statement().await.expect("writer");
            sync.setting.store(super::UNKNOWN, Ordering::SeqCst);
            sqlx::query("PRAGMA synchronous = NORMAL")
                .execute(&mut *conn)
                .await
                .expect("pragma");
        }
        store.put_reports(&reports(1, 100)).await.expect("put");
        assert_eq!(writer_synchronous(&store).await, 2, "FULL again");
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
        store.put_reports(&reports(2, 100)).await.expect("put");
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
        // A file that cannot be synced (`EINVAL`) stands for a log whose write-back failed.
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let sync = super::WalSync::with_file("/dev/null".into(), null);
        let first = sync.committed();
        let e = sync.durable(first).await.expect_err("the sync fails");
        assert!(e.to_string().contains("syncing the SQLite log"), "{e}");
        let second = sync.committed();
        let e = sync.durable(second).await.expect_err("poisoned");
        assert!(e.to_string().contains("an earlier sync"), "{e}");
    }

    /// The log's descriptor is the one opened with the store: a sync goes to the file the
    /// store writes, whatever its name finds later.
    #[tokio::test]
    async fn the_log_is_synced_through_the_descriptor_opened_with_the_store() {
        let (dir, store) = temp_store("o.db").await;
        let sync = store.writer.wal_sync().expect("syncs");
        // The name now finds nothing: a sync by name would fail.
        let moved = dir.path().join("moved-wal");
        std::fs::rename(sync.wal_path(), &moved).expect("rename");
        let n = sync.committed();
        sync.durable(n)
            .await
            .expect("synced through the open descriptor");
        std::fs::rename(&moved, sync.wal_path()).expect("rename back");
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
        assert_eq!(writer_synchronous(&store).await, 1, "NORMAL");
        let large = reports(2, super::UNSYNCED_MIN_BYTES / 2);
        let (_, durable) = store.put_reports_pipelined(&large).await.expect("put");
        assert!(matches!(durable, Durable::Now));
        store.put_reports(&reports(3, 100)).await.expect("put");
        let settings = store.settings().await.expect("settings");
        assert!(settings.contains(&("log_sync".into(), "checkpoint".into())));
        assert!(settings.contains(&("synchronous".into(), "NORMAL".into())));
        store.close().await;
    }
}
