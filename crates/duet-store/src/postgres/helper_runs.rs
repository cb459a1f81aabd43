//! The Helper's replay set in runs, and a filter in front of the closed ones, so that admitting a
//! fresh report ID costs the same whatever the history.
//!
//! `helper_report_ids` is keyed by (run, task key, report ID). New IDs go into the open run
//! (`helper_replay_state.open_run`), whose unique index catches two writers of one ID. A process
//! closes the open run, by opening the next, once it knows it holds [`RUN_IDS`] IDs: those it
//! counted there when it last loaded its filter and those it wrote since (with several processes
//! writing, a run can grow to a few times that). A closed run never gains an ID. A unique B-tree over all of history would take each
//! random ID at a random leaf among the history's, a descent and a dirtied page that grow with
//! it; here the open run stays small, and the closed runs are only read.
//!
//! An ID must also be in no closed run. Each process keeps a Bloom filter of the closed runs it
//! has loaded (runs `0..covered`): an ID the filter lacks is probed only in the runs closed since
//! (`covered..open_run`), and an ID it may hold in every closed run, one index descent per run.
//!
//! Writers and the closing of a run are kept apart by an advisory lock: a writer holds it shared
//! from before it reads the open run to its commit, and closing takes it exclusive, so it waits
//! for every writer of the run it closes and holds back new ones until it commits. A writer's
//! next statement, after its lock, thus sees the open run as it is and every ID of every closed
//! run; and no ID can commit into two runs.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;

use crate::bloom::Bloom;
use crate::StoreError;

/// The advisory lock between writers of the open run (shared) and its closing (exclusive).
pub(super) const RUNS_LOCK: i64 = 0x6475_6574_5255_4e53; // "duetRUNS"

/// IDs the open run holds, as far as a process knows (those it found there when it loaded its
/// filter, and those it wrote since), before the process closes it.
pub(super) const RUN_IDS: i64 = 100_000;

/// The Helper's filter over the closed runs, and when to close the open one.
#[derive(Debug)]
pub(super) struct HelperRuns {
    inner: Mutex<Inner>,
    /// Whether a load or a close is running in the background.
    busy: AtomicBool,
    /// IDs this process writes into a run before it closes it (a test setting).
    run_ids: AtomicI64,
}

#[derive(Debug, Default)]
struct Inner {
    /// IDs of runs `0..covered`, if loaded.
    bloom: Option<BloomDebug>,
    covered: i32,
    /// The open run this process last saw, and how many IDs it knows it holds.
    open_run: i32,
    written: i64,
}

/// [`Bloom`] in a `Debug` struct.
struct BloomDebug(Bloom);

impl std::fmt::Debug for BloomDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bloom({} IDs)", self.0.len())
    }
}

/// How a write checks its IDs against the closed runs.
pub(super) struct Triage {
    /// IDs the filter may hold: probed in every closed run.
    pub(super) maybe: Vec<[u8; 16]>,
    /// IDs the filter lacks: probed in the runs closed since it was loaded.
    pub(super) fresh: Vec<[u8; 16]>,
    /// The first run the filter does not cover.
    pub(super) covered: i32,
}

impl Default for HelperRuns {
    fn default() -> HelperRuns {
        HelperRuns {
            inner: Mutex::default(),
            busy: AtomicBool::new(false),
            run_ids: AtomicI64::new(RUN_IDS),
        }
    }
}

impl HelperRuns {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Splits `ids` by what the filter knows.
    pub(super) fn triage(&self, ids: &[[u8; 16]]) -> Triage {
        let inner = self.inner();
        let (maybe, fresh) = match &inner.bloom {
            Some(bloom) => ids.iter().partition(|id| bloom.0.may_contain(id)),
            None => (Vec::new(), ids.to_vec()),
        };
        Triage {
            maybe,
            fresh,
            covered: inner.covered,
        }
    }

    /// Sets how many IDs this process writes into a run before it closes it (tests).
    pub(super) fn set_run_ids(&self, ids: i64) {
        self.run_ids.store(ids.max(1), Ordering::Relaxed);
    }

    /// After a committed write of `ids` IDs into run `open_run`: loads the runs closed since the
    /// filter was loaded, or closes the open run once this process has written enough into it,
    /// in the background (one task at a time).
    pub(super) fn after_write(self: &Arc<Self>, pool: &PgPool, ids: usize, open_run: i32) {
        let close = {
            let mut inner = self.inner();
            if inner.open_run != open_run {
                inner.open_run = open_run;
                inner.written = 0;
            }
            inner.written = inner.written.saturating_add(ids as i64);
            inner.written >= self.run_ids.load(Ordering::Relaxed)
        };
        let load = self.inner().covered < open_run;
        if !(close || load) || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let pool = pool.clone();
        tokio::spawn(async move {
            let result = if close {
                this.close(&pool, open_run).await
            } else {
                this.load(&pool).await
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "the Helper's replay runs: background work failed");
            }
            this.busy.store(false, Ordering::Release);
        });
    }

    /// Closes run `open_run` (if it is still the open one) by opening the next.
    async fn close(&self, pool: &PgPool, open_run: i32) -> Result<(), StoreError> {
        let db = |e: sqlx::Error| StoreError::Database(e.to_string());
        let mut tx = pool.begin().await.map_err(db)?;
        sqlx::query("-- helper_replay_runs\nSELECT pg_advisory_xact_lock($1)")
            .bind(RUNS_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let closed = sqlx::query(
            "-- helper_replay_runs\n\
             UPDATE helper_replay_state SET open_run = open_run + 1 WHERE open_run = $1",
        )
        .bind(open_run)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        tx.commit().await.map_err(db)?;
        if closed > 0 {
            tracing::debug!(run = open_run, "the Helper's replay run closed");
        }
        Ok(())
    }

    /// Loads the closed runs the filter lacks (rebuilding it, larger, when it would be
    /// overfull), and counts the IDs in the open run.
    pub(super) async fn load(&self, pool: &PgPool) -> Result<(), StoreError> {
        let db = |e: sqlx::Error| StoreError::Database(e.to_string());
        // Runs below the open one read in a statement after this one are closed and complete.
        let open_run: i32 =
            sqlx::query_scalar("-- helper_replay_runs\nSELECT open_run FROM helper_replay_state")
                .fetch_one(pool)
                .await
                .map_err(db)?;
        let in_open: i64 = sqlx::query_scalar(
            "-- helper_replay_runs\nSELECT COUNT(*) FROM helper_report_ids WHERE run = $1",
        )
        .bind(open_run)
        .fetch_one(pool)
        .await
        .map_err(db)?;
        let loaded = {
            let mut inner = self.inner();
            if inner.open_run != open_run {
                inner.open_run = open_run;
                inner.written = 0;
            }
            inner.written = inner.written.max(in_open);
            if inner.covered >= open_run {
                return Ok(());
            }
            // A copy: writes go on using the filter while this loads.
            inner
                .bloom
                .as_ref()
                .map(|bloom| (inner.covered, bloom.0.clone()))
        };
        let (from, mut bloom) = match loaded {
            Some(loaded) => loaded,
            None => {
                // Sized from the table's estimated row count, so that a first load rarely has
                // to start over larger.
                let rows: f32 = sqlx::query_scalar(
                    "-- helper_replay_runs\n\
                     SELECT reltuples FROM pg_class WHERE oid = 'helper_report_ids'::regclass",
                )
                .fetch_one(pool)
                .await
                .map_err(db)?;
                (
                    0,
                    Bloom::with_capacity((rows.max(0.0) as usize).saturating_mul(2)),
                )
            }
        };
        #[allow(clippy::disallowed_methods)] // Measures how long the load took, for its log line.
        let started = std::time::Instant::now();
        let mut runs = from..open_run;
        let mut read = 0usize;
        while let Some(run) = runs.next() {
            let ids: Vec<Vec<u8>> = sqlx::query_scalar(
                "-- helper_replay_runs\nSELECT report_id FROM helper_report_ids WHERE run = $1",
            )
            .bind(run)
            .fetch_all(pool)
            .await
            .map_err(db)?;
            read += ids.len();
            for id in &ids {
                let id: [u8; 16] = id[..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("a stored report ID's length".into()))?;
                bloom.insert(&id);
            }
            if bloom.overfull() {
                // Start over with room for twice as many.
                bloom = Bloom::with_capacity(bloom.len().saturating_mul(2));
                runs = 0..open_run;
            }
        }
        let mut inner = self.inner();
        if inner.covered < open_run {
            inner.bloom = Some(BloomDebug(bloom));
            inner.covered = open_run;
        }
        tracing::debug!(
            runs = open_run,
            ids = read,
            ms = started.elapsed().as_millis() as u64,
            "the Helper's replay filter loaded"
        );
        Ok(())
    }
}
