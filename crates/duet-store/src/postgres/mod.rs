//! The PostgreSQL backend: a connection pool over one database that any number of Duet replicas
//! share.
//!
//! Every write runs at READ COMMITTED and gets its safety from row locks and unique keys rather
//! than from a stricter isolation level: leases are taken with `SELECT … FOR UPDATE SKIP LOCKED`
//! (so replicas never wait on each other's candidates and never take the same row), job creation
//! takes a task's queue under an advisory lock it only tries (task deletion waits for it), the
//! replay runs are closed under an advisory lock that their writers hold shared, inserts that may race use
//! `ON CONFLICT DO NOTHING` and look at what they got, and read-modify-write of batch
//! aggregations locks the rows it merges into (`FOR UPDATE`). Each method states its level
//! and locks; reads are single statements, each on one snapshot. A transaction that fails with a
//! serialization failure or a deadlock (SQLSTATE 40001 / 40P01), or that lost a race it can
//! detect, is re-run from the start a bounded number of times (`PostgresDatastore::run`).
//!
//! The schema is in `migrations/postgres/`; [`datastore`] implements the trait, each call
//! dispatched under retries to a module that follows the SQLite backend's split:
//! [`tasks`] (tasks, keys, batch aggregations), [`leader`] (reports and aggregation jobs),
//! [`job_creation`] (the Leader's job creation), [`unaggregated`] (the check for unaggregated
//! reports), [`collection`] (collection jobs), [`helper`] (Helper jobs and aggregate shares),
//! [`runs`] (both roles' replay IDs in runs); [`notify`] wakes other replicas' background jobs
//! with `LISTEN`/`NOTIFY`, [`flush`] holds the connection for large upload batches, and
//! [`restored`] renumbers transaction IDs that came from another server.

mod collection;
mod datastore;
mod flush;
mod helper;
mod job_creation;
mod leader;
mod notify;
mod restored;
mod runs;
mod tasks;
mod unaggregated;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration as StdDuration;

use duet_core::AggregatorRole;
use duet_messages::dap09::TaskId;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Transaction};

use crate::rows::{col, col_array, col_interval, col_u64};
use crate::StoreError;

/// Connections in the pool of one handle (and its `with_role` siblings).
const MAX_CONNECTIONS: u32 = 16;
/// How long a caller waits for a free connection before failing.
const ACQUIRE_TIMEOUT: StdDuration = StdDuration::from_secs(30);
/// A pooled connection idle for longer than this is pinged before use (a server restart or a
/// dropped TCP connection shows there, not in the caller's statement). Busy connections are not:
/// a ping is a round trip to the server before every transaction.
const PING_IF_IDLE_FOR: StdDuration = StdDuration::from_secs(10);
/// How many times a transaction runs before a retryable failure is returned as an error.
const MAX_ATTEMPTS: u32 = 6;
/// The first retry's backoff; it doubles with each attempt and is jittered.
const BASE_BACKOFF: StdDuration = StdDuration::from_millis(5);
/// The `application_name` sessions get unless the URL names one, so that `pg_stat_activity`
/// shows which connections are Duet's.
const APPLICATION_NAME: &str = "duet";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A [`Datastore`] over a PostgreSQL database, bound to one aggregator role.
#[derive(Clone, Debug)]
pub struct PostgresDatastore {
    pool: PgPool,
    /// One connection with `synchronous_commit = off`, for large upload batches (see
    /// [`flush`]); connected on first use.
    unflushed: PgPool,
    /// The session of the `unflushed` connection (see [`flush::unflushed_pool`]).
    unflushed_session: Arc<Mutex<Option<flush::Session>>>,
    role: AggregatorRole,
    wakeups: Arc<notify::Wakeups>,
    /// The replay tables' keys of the tasks seen so far (`replay_tasks`; a key never changes).
    task_keys: Arc<Mutex<HashMap<TaskId, i32>>>,
    /// The Helper's filter over its closed replay runs.
    helper_runs: Arc<runs::Runs>,
    /// The Leader's filter over its closed replay runs.
    leader_runs: Arc<runs::Runs>,
}

/// Pool settings for up to `connections` connections, each pinged before use only after idling
/// ([`PING_IF_IDLE_FOR`]).
fn pool_options(connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// How long `connect` waits for a server that cannot be reached yet.
const SERVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A first connection, retried while the server cannot be reached (refused, unreachable: an I/O
/// error) for up to `wait`; any other error (a password, a certificate, no such database) at once.
async fn first_connection(
    options: &PgConnectOptions,
    wait: std::time::Duration,
) -> Result<sqlx::PgConnection, StoreError> {
    let mut pause = std::time::Duration::from_millis(100);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match <sqlx::PgConnection as sqlx::Connection>::connect_with(options).await {
            Ok(conn) => return Ok(conn),
            Err(e @ sqlx::Error::Io(_)) if waited < wait => {
                if waited.is_zero() {
                    tracing::warn!(error = %e, "the PostgreSQL server cannot be reached; waiting up to {wait:?} for it");
                }
                tokio::time::sleep(pause).await;
                waited += pause;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            Err(e) => return Err(StoreError::Database(e.to_string())),
        }
    }
}

impl PostgresDatastore {
    /// Connects to a `postgres://` or `postgresql://` URL and runs the embedded migrations, then
    /// renumbers stored transaction IDs that came from another server (see [`restored`]); the
    /// handle is bound to the Leader role. Several processes may connect to a new database at
    /// once: the migrator serializes them with an advisory lock.
    pub async fn connect(url: &str) -> Result<PostgresDatastore, StoreError> {
        Self::connect_within(url, SERVER_WAIT).await
    }

    /// Like [`PostgresDatastore::connect`], waiting at most `wait` for a server that refuses
    /// connections or cannot be reached (one starting alongside, say) before it says why.
    pub async fn connect_within(
        url: &str,
        wait: std::time::Duration,
    ) -> Result<PostgresDatastore, StoreError> {
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Database(format!("invalid PostgreSQL URL: {e}")))?;
        if options.get_application_name().is_none() {
            options = options.application_name(APPLICATION_NAME);
        }
        // One plain connection first: a pool retries a failing connection until its acquire
        // timeout and then says only that it timed out, where this says why (refused, no such
        // database, a password or certificate refused).
        sqlx::Connection::close(first_connection(&options, wait).await?)
            .await
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let pool = pool_options(MAX_CONNECTIONS)
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Database(e.to_string()))?;
        let server = Arc::new(Mutex::new(None));
        let unflushed = flush::unflushed_pool(pool_options(1), options, Arc::clone(&server));
        if let Err(e) = MIGRATOR.run(&pool).await {
            // Closing releases the migrator's advisory lock if it failed while holding it.
            pool.close().await;
            return Err(StoreError::Database(format!("migrations failed: {e}")));
        }
        let store = PostgresDatastore {
            pool,
            unflushed,
            unflushed_session: server,
            role: AggregatorRole::Leader,
            wakeups: Arc::new(notify::Wakeups::new()),
            task_keys: Arc::default(),
            helper_runs: Arc::new(runs::Runs::new(&runs::HELPER)),
            leader_runs: Arc::new(runs::Runs::new(&runs::LEADER)),
        };
        if let Err(e) = restored::renumber_if_restored(&store).await {
            store.close().await;
            return Err(e);
        }
        Ok(store)
    }

    /// A handle on the same pools bound to `role`.
    pub fn with_role(&self, role: AggregatorRole) -> PostgresDatastore {
        PostgresDatastore {
            pool: self.pool.clone(),
            unflushed: self.unflushed.clone(),
            unflushed_session: Arc::clone(&self.unflushed_session),
            role,
            wakeups: Arc::clone(&self.wakeups),
            task_keys: Arc::clone(&self.task_keys),
            helper_runs: Arc::clone(&self.helper_runs),
            leader_runs: Arc::clone(&self.leader_runs),
        }
    }

    /// How many report IDs this process writes into the Helper's open replay run before it
    /// closes it (tests; the default is 100,000).
    #[doc(hidden)]
    pub fn set_helper_run_ids(&self, ids: i64) {
        self.helper_runs.set_run_ids(ids);
    }

    /// How many report IDs this process writes into the Leader's open replay run before it
    /// closes it (tests; the default is 100,000).
    #[doc(hidden)]
    pub fn set_leader_run_ids(&self, ids: i64) {
        self.leader_runs.set_run_ids(ids);
    }

    /// The role this handle is bound to.
    pub fn role(&self) -> AggregatorRole {
        self.role
    }

    /// Closes the pool (all handles on it), waiting for connections to finish; stops the
    /// wake-up listener, if any.
    pub async fn close(&self) {
        self.wakeups.stop();
        self.unflushed.close().await;
        self.pool.close().await;
    }

    /// The task's key in the replay tables, created if it has none. A new key is committed on
    /// its own, outside any caller's transaction, so that a key in use always exists: two keys
    /// for one task would split its replay protection.
    async fn task_key(&self, task_id: &TaskId) -> Result<i32, TxError> {
        let known = self
            .task_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(task_id)
            .copied();
        if let Some(key) = known {
            return Ok(key);
        }
        let select = "-- task_key\nSELECT task_key FROM replay_tasks WHERE task_id = $1";
        let mut key: Option<i32> = sqlx::query_scalar(select)
            .bind(&task_id.0[..])
            .fetch_optional(&self.pool)
            .await?;
        if key.is_none() {
            // A concurrent insert of the same ID makes this one wait for it and do nothing; the
            // next statement's snapshot sees whichever row won.
            sqlx::query(
                "-- task_key\n\
                 INSERT INTO replay_tasks (task_id) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(&task_id.0[..])
            .execute(&self.pool)
            .await?;
            key = sqlx::query_scalar(select)
                .bind(&task_id.0[..])
                .fetch_optional(&self.pool)
                .await?;
        }
        let key = key.ok_or(TxError::Raced("a task key was not stored"))?;
        self.task_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*task_id, key);
        Ok(key)
    }

    /// The role as stored in `role` columns.
    fn role_str(&self) -> &'static str {
        match self.role {
            AggregatorRole::Leader => "leader",
            AggregatorRole::Helper => "helper",
        }
    }

    /// Starts a READ COMMITTED transaction (named explicitly, so that a server configured with
    /// another default isolation level doesn't change the store's behaviour).
    async fn begin(&self) -> Result<Transaction<'static, Postgres>, TxError> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?)
    }

    /// Runs `attempt` (one whole transaction, or one statement) until it succeeds, fails for a
    /// reason that a re-run cannot fix, or has failed retryably [`MAX_ATTEMPTS`] times. Failed
    /// attempts leave nothing behind: their transaction is rolled back when dropped.
    async fn run<T, F, Fut>(&self, caller: &'static str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, TxError>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            if !error.is_retryable() {
                return Err(error.into_store_error());
            }
            if attempts >= MAX_ATTEMPTS {
                return Err(StoreError::Database(format!(
                    "{caller}: gave up after {attempts} attempts: {}",
                    error.into_store_error()
                )));
            }
            tracing::debug!(caller, attempts, error = %error.describe(), "retrying transaction");
            let backoff = BASE_BACKOFF * 2u32.pow(attempts - 1);
            let jitter = rand::random::<f64>();
            tokio::time::sleep(backoff.mul_f64(0.5 + jitter)).await;
        }
    }
}

/// How one attempt at a transaction failed.
#[derive(Debug)]
enum TxError {
    /// The database failed; retried if it is a serialization failure or a deadlock.
    Sql(sqlx::Error),
    /// The attempt lost a race with a concurrent transaction that it could detect but not wait
    /// out (say, a row it had just seen was deleted); always retried.
    Raced(&'static str),
    /// An outcome for the caller, returned as is.
    Store(StoreError),
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> TxError {
        TxError::Sql(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> TxError {
        TxError::Store(e)
    }
}

/// SQLSTATEs after which a fresh attempt may succeed: `serialization_failure` and
/// `deadlock_detected`.
const RETRYABLE_SQLSTATES: &[&str] = &["40001", "40P01"];

/// Whether `e` is a `unique_violation` (SQLSTATE 23505).
fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(e) if e.code().is_some_and(|code| code == "23505"))
}

impl TxError {
    fn is_retryable(&self) -> bool {
        match self {
            TxError::Sql(sqlx::Error::Database(e)) => e
                .code()
                .is_some_and(|code| RETRYABLE_SQLSTATES.contains(&code.as_ref())),
            TxError::Sql(_) | TxError::Store(_) => false,
            TxError::Raced(_) => true,
        }
    }

    fn describe(&self) -> String {
        match self {
            TxError::Sql(e) => e.to_string(),
            TxError::Raced(what) => format!("raced: {what}"),
            TxError::Store(e) => e.to_string(),
        }
    }

    fn into_store_error(self) -> StoreError {
        match self {
            TxError::Sql(e) => StoreError::Database(e.to_string()),
            TxError::Raced(what) => StoreError::Database(format!("lost a race: {what}")),
            TxError::Store(e) => e,
        }
    }
}

// ---- Conversions shared by the submodules ----

/// A `u64` as a BIGINT; values past `i64::MAX` are refused rather than wrapped.
fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Database(format!("{what} {v} does not fit in a PostgreSQL BIGINT"))
    })
}

/// A `u64` bound for range queries: values past `i64::MAX` clamp (no stored value exceeds it).
fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A `usize` count for `LIMIT`, clamped.
fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads a non-negative INTEGER column.
fn col_u32(row: &PgRow, name: &str) -> Result<u32, StoreError> {
    let v: i32 = col(row, name)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {name}: negative value {v}")))
}

/// A fresh lease token.
fn lease_token() -> [u8; 16] {
    rand::random()
}

/// The server settings `settings` reports: its version, and what decides the cost of a commit
/// and of writing pages (durability first).
const SETTINGS: [&str; 9] = [
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "wal_compression",
];

/// What the plan tests of the submodules read in a plan, and the queue they plan over.
#[cfg(test)]
mod plan_checks {
    use sqlx::postgres::PgRow;
    use sqlx::Row;

    /// The lines of an `EXPLAIN`.
    pub(super) fn lines(rows: &[PgRow]) -> Vec<String> {
        rows.iter().map(|row| row.get(0)).collect()
    }

    /// The plan of `statement` (which binds no parameters), as [`lines`].
    pub(super) async fn explain(conn: &mut sqlx::PgConnection, statement: &str) -> Vec<String> {
        let rows = sqlx::query(&format!("EXPLAIN {statement}"))
            .fetch_all(conn)
            .await
            .expect("EXPLAIN");
        lines(&rows)
    }

    /// Queues 20,000 reports for task key `key`, one transaction (so one upload transaction
    /// ID) per 1,000.
    pub(super) async fn queue_reports(conn: &mut sqlx::PgConnection, key: i32) {
        for _ in 0..20 {
            sqlx::query(
                "INSERT INTO report_queue (task_key, client_time, report_id, payload) \
                 SELECT $1, g, substring(sha256(g::text::bytea || random()::text::bytea) \
                   FOR 16), '\\x00' FROM generate_series(1, 1000) AS g",
            )
            .bind(key)
            .execute(&mut *conn)
            .await
            .expect("queue");
        }
    }

    /// Asserts that `plan` scans `on` (say `on report_queue q`) `scans` times, each time by
    /// index with a condition that starts with `condition`.
    pub(super) fn assert_index_scans(plan: &[String], on: &str, scans: usize, condition: &str) {
        let whole = plan.join("\n");
        let found: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].contains(on)).collect();
        assert_eq!(found.len(), scans, "{whole}");
        for i in found {
            assert!(plan[i].contains("Index"), "{whole}");
            assert!(
                plan.get(i + 1).is_some_and(|next| next.contains(condition)),
                "{whole}"
            );
        }
    }
}
