//! The one connection that writes, and write transactions on it.
//!
//! A file database's writer is a connection of its own, kept for the life of the store rather
//! than checked out of a pool for each write: sqlx pings a connection every time it goes back to
//! its pool, a round trip to the connection's thread and back that cost the upload path a
//! thread wake-up per batch, and held the next batch until it was done. An in-memory database
//! has only the read pool's one connection, so its writes take that.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteTransactionManager};
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool, TransactionManager};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use super::durable::{SettingChange, WalSync};
use super::{db, retry_busy, LogSync};
use crate::StoreError;

/// Where writes go. Either way a process writes one transaction at a time: SQLite allows one
/// writer at a time, and a writer that finds the lock taken sleeps in SQLite's busy handler
/// (milliseconds at a time); queueing writers here instead hands the lock over as soon as it is
/// free. Other processes on the same file still wait through the busy timeout.
#[derive(Clone, Debug)]
pub(super) enum Writer {
    /// A file database's own writer connection (`None` once the store is closed), and its
    /// log's syncs (`None` if the log is synced only around checkpoints).
    Own(Arc<Mutex<Option<SqliteConnection>>>, Option<Arc<WalSync>>),
    /// An in-memory database: the read pool's connection, taken under this lock.
    Pooled(SqlitePool, Arc<Mutex<()>>),
}

impl Writer {
    /// Opens a file database's writer connection, retrying while the file is busy.
    pub(super) async fn open(
        options: &SqliteConnectOptions,
        log_sync: LogSync,
    ) -> Result<Writer, StoreError> {
        let conn = retry_busy(|| SqliteConnection::connect_with(options)).await?;
        let sync = match log_sync {
            LogSync::Commit => Some(Arc::new(WalSync::new(options.get_filename()).map_err(
                |e| {
                    StoreError::Database(format!(
                        "could not find the SQLite log of {} to sync it: {e}",
                        options.get_filename().display()
                    ))
                },
            )?)),
            LogSync::Checkpoint => None,
        };
        Ok(Writer::Own(Arc::new(Mutex::new(Some(conn))), sync))
    }

    /// When the log is synced; `None` for an in-memory database.
    pub(super) fn log_sync(&self) -> Option<LogSync> {
        match self {
            Writer::Own(_, Some(_)) => Some(LogSync::Commit),
            Writer::Own(_, None) => Some(LogSync::Checkpoint),
            Writer::Pooled(..) => None,
        }
    }

    /// The syncs of the log for commits that skip them (see [`WalSync`]); `None` if the log is
    /// synced at checkpoints only, or there is none.
    pub(super) fn wal_sync(&self) -> Option<Arc<WalSync>> {
        match self {
            Writer::Own(_, sync) => sync.clone(),
            Writer::Pooled(..) => None,
        }
    }

    /// The writer connection, once every earlier write of this process is done, with no
    /// transaction open (see [`resync`]).
    pub(super) async fn lock(&self) -> Result<WriterGuard, StoreError> {
        let mut guard = match self {
            Writer::Own(conn, _) => {
                OwnedMutexGuard::try_map(Arc::clone(conn).lock_owned().await, |c| c.as_mut())
                    .map(WriterGuard::Own)
                    .map_err(|_| StoreError::Database("the database is closed".into()))?
            }
            Writer::Pooled(pool, lock) => {
                let lock = Arc::clone(lock).lock_owned().await;
                let conn = pool.acquire().await.map_err(db)?;
                WriterGuard::Pooled { conn, _lock: lock }
            }
        };
        if SqliteTransactionManager::get_transaction_depth(&guard) > 0 {
            resync(&mut guard).await?;
        }
        Ok(guard)
    }

    /// Closes the writer connection (waiting for a write under way); later writes fail.
    pub(super) async fn close(&self) {
        if let Writer::Own(conn, _) = self {
            if let Some(conn) = conn.lock().await.take() {
                if let Err(e) = conn.close().await {
                    tracing::warn!(error = %e, "closing the SQLite writer connection failed");
                }
            }
        }
    }

    /// The writer connection (see [`Writer::lock`]), set to sync the log in each commit: a
    /// statement run on it outside a transaction is durable when it returns.
    #[cfg(test)]
    pub(super) async fn lock_synced(&self) -> Result<WriterGuard, StoreError> {
        let (mut conn, change) = self
            .statement_for(CommitSync::InCommit, String::new())
            .await?;
        if change.changes_setting() {
            sqlx::query(change.sql())
                .execute(&mut *conn)
                .await
                .map_err(db)?;
        }
        let _synced_in_commit = change.began();
        Ok(conn)
    }

    /// The writer connection (see [`Writer::lock`]) for `sql`, a statement that commits as
    /// `commit` says (by itself, or as a transaction's `BEGIN`), and the text to run for it:
    /// `sql`, preceded by the change of the connection's setting if one is needed (see
    /// [`WalSync::change_for`]), so that both take one round trip to the connection's thread.
    pub(super) async fn statement_for(
        &self,
        commit: CommitSync,
        sql: String,
    ) -> Result<(WriterGuard, WriterStatement), StoreError> {
        let conn = self.lock().await?;
        let Some(sync) = self.wal_sync() else {
            return Ok((conn, WriterStatement::plain(sql)));
        };
        let change = sync.change_for(commit);
        let sql = match &change {
            Some(change) => format!("{}{sql}", change.statement()),
            None => sql,
        };
        let unsynced = (commit == CommitSync::AfterCommit).then_some(sync);
        Ok((
            conn,
            WriterStatement {
                sql,
                change,
                unsynced,
            },
        ))
    }

    /// Starts a write transaction holding SQLite's write lock from its first statement. It
    /// commits without syncing the log, and its commit waits for a shared sync after it (see
    /// [`WalSync`]): concurrent transactions then share syncs, and each frees the writer before
    /// its sync.
    pub(super) async fn begin(&self) -> Result<WriteTx, StoreError> {
        self.begin_for(CommitSync::AfterCommit).await
    }

    /// [`Writer::begin`], committing as `commit` says.
    pub(super) async fn begin_for(&self, commit: CommitSync) -> Result<WriteTx, StoreError> {
        let (mut conn, statement) = self.statement_for(commit, "BEGIN IMMEDIATE".into()).await?;
        // sqlx runs a custom `BEGIN` through `sqlite3_exec`, statement by statement.
        SqliteTransactionManager::begin(&mut conn, Some(statement.sql().to_owned().into()))
            .await
            .map_err(db)?;
        Ok(WriteTx {
            conn,
            open: true,
            sync: statement.began(),
        })
    }
}

/// A statement's text for the writer connection ([`Writer::statement_for`]), and what its
/// commit needs once it has run.
#[must_use]
pub(crate) struct WriterStatement {
    sql: String,
    /// The change of the connection's setting at the start of `sql`, if any.
    change: Option<SettingChange>,
    /// The syncs its commit waits for, if it commits without one.
    unsynced: Option<Arc<WalSync>>,
}

impl WriterStatement {
    fn plain(sql: String) -> Self {
        Self {
            sql,
            change: None,
            unsynced: None,
        }
    }

    /// The text to run.
    pub(super) fn sql(&self) -> &str {
        &self.sql
    }

    /// Whether the text changes the connection's setting too (and so is not worth keeping
    /// prepared: one per batch size and setting would crowd the cache).
    pub(super) fn changes_setting(&self) -> bool {
        self.change.is_some()
    }

    /// Once the text, a statement that committed by itself, has run successfully on the
    /// connection still locked: records the setting it made, and says when its commit is
    /// durable.
    pub(super) fn ran(self) -> Durability {
        self.began().map(Durability::of_commit).unwrap_or_default()
    }

    /// Once the text, a transaction's `BEGIN`, has run successfully on the connection still
    /// locked: records the setting it made, and gives the syncs the transaction's commit must
    /// wait for, if any.
    fn began(self) -> Option<Arc<WalSync>> {
        if let Some(change) = self.change {
            change.made();
        }
        self.unsynced
    }
}

/// How a write on the writer connection is made durable (when the log is synced at commits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CommitSync {
    /// The log is synced in the commit, which is durable when it returns.
    InCommit,
    /// The commit returns at once, and is durable after a shared sync of the log
    /// ([`Durability`]).
    AfterCommit,
}

/// A commit made, and what makes it durable (see [`WalSync`]).
#[must_use]
#[derive(Default)]
pub(crate) struct Durability(Option<(Arc<WalSync>, u64)>);

impl Durability {
    /// A commit that has just completed without syncing the log, numbered by `sync`.
    pub(super) fn of_commit(sync: Arc<WalSync>) -> Self {
        let n = sync.committed();
        Durability(Some((sync, n)))
    }

    /// The same as a [`crate::Durable`]: `Now` if there is nothing to wait for.
    pub(crate) fn into_durable(self) -> crate::Durable {
        match self.0 {
            None => crate::Durable::Now,
            Some(_) => crate::Durable::Later(Box::pin(self.wait())),
        }
    }

    /// Returns once the commit is durable.
    pub(crate) async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            Some((sync, n)) => sync.durable(n).await,
            None => Ok(()),
        }
    }
}

/// Brings sqlx's count of the transactions open on `conn` back to zero when one ended without
/// it. SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error);
/// the rollback sqlx then runs for the dropped transaction fails, its count stays at one, and
/// every later `BEGIN` would fail until the process restarts. A rollback still queued (of a
/// transaction dropped a moment ago) is waited for first; if the count is still one, a `BEGIN`
/// of this function's own gives sqlx's rollback a transaction to end.
async fn resync(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    conn.ping().await.map_err(db)?;
    if SqliteTransactionManager::get_transaction_depth(conn) == 0 {
        return Ok(());
    }
    tracing::warn!(
        "a transaction of the SQLite writer ended without sqlx knowing (rolled back by SQLite \
         after an error); resetting the connection's transaction state"
    );
    // Fails if SQLite still has a transaction open: the rollback below ends that one.
    let _ = sqlx::query("BEGIN").execute(&mut *conn).await;
    SqliteTransactionManager::rollback(conn).await.map_err(db)
}

/// The writer connection under this process's write lock, released on drop.
pub(crate) enum WriterGuard {
    /// The file database's writer connection.
    Own(OwnedMappedMutexGuard<Option<SqliteConnection>, SqliteConnection>),
    /// The in-memory database's connection, and the lock that makes it this process's writer.
    Pooled {
        conn: PoolConnection<Sqlite>,
        _lock: OwnedMutexGuard<()>,
    },
}

impl Deref for WriterGuard {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        match self {
            WriterGuard::Own(conn) => conn,
            WriterGuard::Pooled { conn, .. } => conn,
        }
    }
}

impl DerefMut for WriterGuard {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        match self {
            WriterGuard::Own(conn) => conn,
            WriterGuard::Pooled { conn, .. } => conn,
        }
    }
}

/// A write transaction on the writer connection, rolled back if dropped before `commit` (as
/// sqlx's own transactions are: the rollback is queued on the connection and runs before its
/// next statement).
pub(crate) struct WriteTx {
    conn: WriterGuard,
    open: bool,
    /// The syncs of the log this transaction's commit waits for; `None` if the log is synced
    /// at checkpoints only, or in memory.
    sync: Option<Arc<WalSync>>,
}

impl WriteTx {
    /// Commits the transaction, and returns once it is durable (unless the log is synced at
    /// checkpoints only). The writer is free for the next transaction while the log is synced.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.commit_unsynced()
            .await?
            .wait()
            .await
            .map_err(|e| sqlx::Error::Io(std::io::Error::other(e.to_string())))
    }

    /// Commits the transaction and frees the writer; the commit is durable once the returned
    /// [`Durability`] says so.
    pub(crate) async fn commit_unsynced(mut self) -> Result<Durability, sqlx::Error> {
        SqliteTransactionManager::commit(&mut self.conn).await?;
        self.open = false;
        Ok(self
            .sync
            .take()
            .map(Durability::of_commit)
            .unwrap_or_default())
    }

    /// Rolls the transaction back.
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        SqliteTransactionManager::rollback(&mut self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open {
            SqliteTransactionManager::start_rollback(&mut self.conn);
        }
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::super::{temp_store, SqliteDatastore};
    use super::*;

    async fn count(store: &SqliteDatastore) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM replay_tasks")
            .fetch_one(&store.pool)
            .await
            .expect("count")
    }

    async fn insert(tx: &mut SqliteConnection, id: u8) {
        sqlx::query("INSERT INTO replay_tasks (task_id) VALUES (?)")
            .bind(vec![id; 32])
            .execute(tx)
            .await
            .expect("insert");
    }

    /// A file database's own writer: a committed transaction stays, one dropped or rolled back
    /// leaves nothing and the next write goes on as usual, a failed statement leaves the
    /// transaction to its owner, and after `close` writes fail with an error, not a panic.
    #[tokio::test]
    async fn write_transactions_on_the_own_writer() {
        let (_dir, store) = temp_store("w.db").await;
        assert!(matches!(store.writer, Writer::Own(..)));
        let before = count(&store).await;

        let mut tx = store.begin_write().await.expect("begin");
        insert(&mut tx, 1).await;
        tx.commit().await.expect("commit");
        assert_eq!(count(&store).await, before + 1);

        let mut tx = store.begin_write().await.expect("begin");
        insert(&mut tx, 2).await;
        drop(tx);
        let mut tx = store
            .begin_write()
            .await
            .expect("begin after a dropped transaction");
        insert(&mut tx, 3).await;
        tx.rollback().await.expect("rollback");
        assert_eq!(count(&store).await, before + 1);

        let mut tx = store.begin_write().await.expect("begin");
        insert(&mut tx, 4).await;
        // The same key again: the statement fails, the transaction is still the caller's.
        let again = sqlx::query("INSERT INTO replay_tasks (task_id) VALUES (?)")
            .bind(vec![4u8; 32])
            .execute(&mut *tx)
            .await;
        assert!(again.is_err());
        tx.commit().await.expect("commit");
        assert_eq!(count(&store).await, before + 2);

        let mut one = store.write_statement().await.expect("statement");
        insert(&mut one, 5).await;
        drop(one);
        assert_eq!(count(&store).await, before + 3);

        store.close().await;
        assert!(store.begin_write().await.is_err());
        assert!(store.write_statement().await.is_err());
    }

    /// A transaction that SQLite rolled back by itself (as it does on some errors: a full disk,
    /// an I/O error) leaves the writer usable: the next write transaction begins.
    #[tokio::test]
    async fn a_transaction_sqlite_rolled_back_leaves_the_writer_usable() {
        let (_dir, store) = temp_store("w.db").await;
        let before = count(&store).await;
        let mut tx = store.begin_write().await.expect("begin");
        insert(&mut tx, 1).await;
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *tx)
            .await
            .expect("rolled back under the transaction");
        drop(tx);
        let mut tx = store.begin_write().await.expect("begin after the rollback");
        insert(&mut tx, 2).await;
        tx.commit().await.expect("commit");
        assert_eq!(count(&store).await, before + 1);
        store.close().await;
    }
}
