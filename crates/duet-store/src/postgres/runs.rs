//! Replay sets in runs, and a filter in front of the closed ones, so that admitting a fresh report
//! ID costs the same whatever the history. Both roles keep one: the Leader's IDs of claimed
//! reports (`claimed_report_ids`, runs in `leader_replay_state`) and the Helper's IDs of
//! aggregated ones (`helper_report_ids`, runs in `helper_replay_state`); a [`Kind`] names the
//! tables.
//!
//! A replay table is keyed by (run, task key, report ID). New IDs go into the open run (the
//! state table's `open_run`), whose unique index catches two writers of one ID. A process closes
//! the open run, by opening the next, once it knows it holds [`RUN_IDS`] IDs: those it counted
//! there when it last loaded its filter and those it wrote since (with several processes writing,
//! a run can grow to a few times that). A closed run never gains an ID. A unique B-tree over all
//! of history would take each random ID at a random leaf among the history's, a descent and a
//! dirtied page that grow with it; here the open run stays small, and the closed runs are only
//! read.
//!
//! An ID must also be in no closed run. Each process keeps a Bloom filter of the closed runs it
//! has loaded (runs `0..covered`): an ID the filter lacks is probed only in the runs closed since
//! (`covered..open_run`), and an ID it may hold in every closed run, one index descent per run.
//!
//! Runs only ever close, so an open run below the runs a filter covers means the database went
//! back in time (a failover to a replica that lagged, a restore to an earlier point): the runs
//! this process loaded may be written again with other IDs. The process then drops its filter
//! and probes every closed run until it has loaded them again; a write that trusted the filter
//! is retried. It sees this at its next write or load, so a run reopened, written and closed
//! again before then is beyond it: restart the processes after a failover or a restore.
//!
//! Writers and the closing of a run are kept apart by an advisory lock: a writer holds it shared
//! from before it reads the open run to its commit, and closing takes it exclusive, so it waits
//! for every writer of the run it closes and holds back new ones until it commits. A writer's
//! next statement, after its lock, thus sees the open run as it is and every ID of every closed
//! run; and no ID can commit into two runs.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::bloom::Bloom;
use crate::StoreError;

/// One role's replay table in runs: its advisory lock and its statements.
#[derive(Debug)]
pub(super) struct Kind {
    /// Whose IDs, for logs.
    whose: &'static str,
    /// The advisory lock between writers of the open run (shared) and its closing (exclusive).
    pub(super) lock: i64,
    open_run: &'static str,
    count_open: &'static str,
    close: &'static str,
    rows: &'static str,
    count: &'static str,
    chunk: &'static str,
}

/// The statements of a [`Kind`] over replay table `$ids` with state table `$state`.
macro_rules! kind {
    ($whose:literal, $lock:expr, $ids:literal, $state:literal) => {
        Kind {
            whose: $whose,
            lock: $lock,
            open_run: concat!("-- replay_runs\nSELECT open_run FROM ", $state),
            count_open: concat!(
                "-- replay_runs\nSELECT COUNT(*) FROM ",
                $ids,
                " WHERE run = $1"
            ),
            close: concat!(
                "-- replay_runs\nUPDATE ",
                $state,
                " SET open_run = open_run + 1 WHERE open_run = $1"
            ),
            rows: concat!(
                "-- replay_runs\nSELECT reltuples FROM pg_class WHERE oid = '",
                $ids,
                "'::regclass"
            ),
            count: concat!("-- replay_runs\nSELECT COUNT(*) FROM ", $ids),
            chunk: concat!(
                "-- replay_runs\nSELECT task_key, report_id FROM ",
                $ids,
                " WHERE run = $1 AND (task_key, report_id) > ($2, $3) \
                 ORDER BY task_key, report_id LIMIT $4"
            ),
        }
    };
}

/// The Helper's IDs of aggregated reports.
pub(super) static HELPER: Kind = kind!(
    "helper",
    0x6475_6574_5255_4e53, // "duetRUNS"
    "helper_report_ids",
    "helper_replay_state"
);

/// The Leader's IDs of claimed reports.
pub(super) static LEADER: Kind = kind!(
    "leader",
    0x6475_6574_434c_4d53, // "duetCLMS"
    "claimed_report_ids",
    "leader_replay_state"
);

/// IDs the open run holds, as far as a process knows (those it found there when it loaded its
/// filter, and those it wrote since), before the process closes it.
pub(super) const RUN_IDS: i64 = 100_000;

/// IDs read per statement while loading the filter.
const LOAD_CHUNK: i64 = 65_536;

/// How long after failed background work (a load or a close) the next may start.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How long after a load that found nothing to load the next may start.
const IDLE_LOAD_AFTER: Duration = Duration::from_secs(1);

/// How long closing a run waits for the writers of the run: they, and the writers queued behind
/// the close, wait as long. A close that times out is tried again later.
const CLOSE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '1s'";

/// A role's filter over its closed runs, and when to close the open one.
#[derive(Debug)]
pub(super) struct Runs {
    kind: &'static Kind,
    inner: Mutex<Inner>,
    /// Whether background work (loads and closes, one after another) is running.
    busy: AtomicBool,
    /// IDs the open run may hold before this process closes it (a test setting).
    run_ids: AtomicI64,
    /// Held by a load from start to end: a load that replaced the filter with one built from
    /// fewer runs, while another raised `covered` past them, would let IDs skip their probes.
    loading: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Inner {
    /// IDs of runs `0..covered` (and maybe more), once loaded.
    bloom: Option<Bloom>,
    covered: i32,
    /// The latest open run this process has seen, and how many IDs it knows it holds.
    open_run: i32,
    written: i64,
    /// No background work before this, after a failure.
    retry_at: Option<Instant>,
    /// How many times the filter was forgotten because the database went back in time; a load
    /// that began before the last time installs nothing.
    epoch: u64,
}

impl Inner {
    /// Notes that run `open_run` is (or was) the open one: only a later run replaces the one
    /// known, so that late news of writes into a closed run is ignored.
    fn see(&mut self, open_run: i32) -> bool {
        if open_run > self.open_run {
            self.open_run = open_run;
            self.written = 0;
        }
        open_run == self.open_run
    }

    /// Forgets the filter if `open_run`, read after the filter's `covered`, is below it. Runs only
    /// ever close, so the database has gone back in time: failed over to a replica that lagged,
    /// or restored to an earlier point. Runs this process loaded may then be written again with
    /// other IDs, and closed again, so every ID is probed in every closed run until the next load.
    fn forget_if_behind(&mut self, open_run: i32, whose: &str) -> bool {
        if open_run >= self.covered {
            return false;
        }
        tracing::warn!(
            ids = whose,
            open_run,
            covered = self.covered,
            "replay runs: the database's open run is behind the runs this process loaded (a \
             failover or a restore?); the filter is dropped and rebuilt"
        );
        self.bloom = None;
        self.covered = 0;
        self.open_run = open_run;
        self.written = 0;
        self.epoch += 1;
        true
    }

    /// After a writer read `open_run` under the runs' lock, when no run can close: the database's
    /// open run is at or past every one this process has seen, unless the database went back in
    /// time. Then this process takes the database's open run as the open one (so that it counts
    /// its writes there, and closes it in time), and drops the filter if it covers runs past it.
    /// `true` if the filter was dropped.
    fn check_written(&mut self, open_run: i32, whose: &str) -> bool {
        let forgot = self.forget_if_behind(open_run, whose);
        if open_run < self.open_run {
            tracing::warn!(
                ids = whose,
                open_run,
                known = self.open_run,
                "replay runs: the database's open run is behind the one this process knew (a \
                 failover or a restore?)"
            );
            self.open_run = open_run;
            self.written = 0;
        }
        forgot
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

/// Background work.
enum Work {
    Close(i32),
    Load,
}

/// Clears the `busy` flag when the background task ends, even by a panic.
struct Busy(Arc<Runs>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

impl Runs {
    pub(super) fn new(kind: &'static Kind) -> Runs {
        Runs {
            kind,
            inner: Mutex::default(),
            busy: AtomicBool::new(false),
            run_ids: AtomicI64::new(RUN_IDS),
            loading: tokio::sync::Mutex::new(()),
        }
    }
}

/// The time, for pacing retries and timing loads (not a timestamp anything stores).
#[allow(clippy::disallowed_methods)] // Measures durations.
fn now() -> Instant {
    Instant::now()
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

impl Runs {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The runs the filter covers, and how many times it was dropped: a load that changes
    /// neither found nothing to load.
    fn state(&self) -> (i32, u64) {
        let inner = self.inner();
        (inner.covered, inner.epoch)
    }

    /// Splits `ids` by what the filter knows.
    pub(super) fn triage(&self, ids: &[[u8; 16]]) -> Triage {
        let inner = self.inner();
        let (maybe, fresh) = match &inner.bloom {
            Some(bloom) => ids.iter().partition(|id| bloom.may_contain(id)),
            None => (Vec::new(), ids.to_vec()),
        };
        Triage {
            maybe,
            fresh,
            covered: inner.covered,
        }
    }

    /// After a statement that read the open run while the writer held the runs' lock: takes it
    /// as the open run, and forgets the filter if it is behind the runs the filter covers, if the
    /// database went back in time (see `Inner::check_written`).
    pub(super) fn check_open_run(self: &Arc<Self>, pool: &PgPool, open_run: i32) {
        if self.inner().check_written(open_run, self.kind.whose) {
            self.kick(pool);
        }
    }

    /// Sets how many IDs the open run may hold before this process closes it (tests).
    pub(super) fn set_run_ids(&self, ids: i64) {
        self.run_ids.store(ids.max(1), Ordering::Relaxed);
    }

    /// The background work due, if any.
    fn pending(&self) -> Option<Work> {
        let inner = self.inner();
        if inner.retry_at.is_some_and(|at| now() < at) {
            return None;
        }
        if inner.written >= self.run_ids.load(Ordering::Relaxed) {
            Some(Work::Close(inner.open_run))
        } else if inner.covered < inner.open_run {
            Some(Work::Load)
        } else {
            None
        }
    }

    /// After a committed write of `ids` IDs into run `open_run`: closes the open run once this
    /// process knows it holds enough, and loads the runs closed since the filter was loaded, in
    /// the background (one task at a time, which runs until nothing is due).
    pub(super) fn after_write(self: &Arc<Self>, pool: &PgPool, ids: usize, open_run: i32) {
        {
            let mut inner = self.inner();
            if inner.see(open_run) {
                inner.written = inner.written.saturating_add(ids as i64);
            }
        }
        self.kick(pool);
    }

    /// Starts the background task if work is due and none runs.
    fn kick(self: &Arc<Self>, pool: &PgPool) {
        if self.pending().is_none() || self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let busy = Busy(Arc::clone(self));
        let pool = pool.clone();
        tokio::spawn(async move {
            let this = Arc::clone(&busy.0);
            while let Some(work) = this.pending() {
                let result = match work {
                    Work::Close(run) => this.close(&pool, run).await,
                    Work::Load => {
                        let before = this.state();
                        let loaded = this.load(&pool).await;
                        if loaded.is_ok() && this.state() == before {
                            // Nothing was closed past the filter after all (the database's open
                            // run is behind the one this process heard of, as after a failover):
                            // look again later rather than at once.
                            this.inner().retry_at = Some(now() + IDLE_LOAD_AFTER);
                            break;
                        }
                        loaded
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(
                        ids = this.kind.whose,
                        error = %e,
                        "replay runs: background work failed"
                    );
                    this.inner().retry_at = Some(now() + RETRY_AFTER);
                    break;
                }
            }
            drop(busy);
            // Work that came due after the last look and before the flag cleared.
            this.kick(&pool);
        });
    }

    /// Closes run `open_run` (if it is still the open one) by opening the next.
    async fn close(&self, pool: &PgPool, open_run: i32) -> Result<(), StoreError> {
        let mut tx = pool.begin().await.map_err(db)?;
        for sql in [
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
            CLOSE_LOCK_TIMEOUT,
        ] {
            sqlx::query(sql).execute(&mut *tx).await.map_err(db)?;
        }
        // Another process may have closed it already: then no need to stop the writers.
        let current: i32 = sqlx::query_scalar(self.kind.open_run)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if current == open_run {
            sqlx::query("-- replay_runs\nSELECT pg_advisory_xact_lock($1)")
                .bind(self.kind.lock)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            sqlx::query(self.kind.close)
                .bind(open_run)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        tracing::debug!(ids = self.kind.whose, run = open_run, "replay run closed");
        self.inner().see(open_run + 1);
        Ok(())
    }

    /// Loads the closed runs the filter lacks, and counts the IDs in the open run. New IDs go
    /// into the filter in use, a chunk at a time (a filter only gains IDs, and until `covered`
    /// moves, writes probe those runs anyway); when it would be overfull, a larger one is built
    /// from all the closed runs and replaces it.
    pub(super) async fn load(&self, pool: &PgPool) -> Result<(), StoreError> {
        let _one_at_a_time = self.loading.lock().await;
        // Runs below the open one read in a statement after this one are closed and complete.
        let open_run: i32 = sqlx::query_scalar(self.kind.open_run)
            .fetch_one(pool)
            .await
            .map_err(db)?;
        let in_open: i64 = sqlx::query_scalar(self.kind.count_open)
            .bind(open_run)
            .fetch_one(pool)
            .await
            .map_err(db)?;
        let (from, epoch) = {
            let mut inner = self.inner();
            inner.forget_if_behind(open_run, self.kind.whose);
            if inner.see(open_run) {
                inner.written = inner.written.max(in_open);
            }
            if inner.covered >= open_run {
                return Ok(());
            }
            (inner.bloom.is_some().then_some(inner.covered), inner.epoch)
        };
        let started = now();
        let mut read = 0;
        let complete = match from {
            Some(from) => {
                self.add_runs(pool, from..open_run, &mut read, None, epoch)
                    .await?
            }
            None => false,
        };
        if !complete && self.inner().epoch != epoch {
            // The filter was dropped during the load (the database went back in time): the next
            // load starts over from what the database holds now.
            return Ok(());
        }
        if !complete {
            // A new filter from all the closed runs, sized for twice the IDs the table holds:
            // its row count as last estimated, or counted if it never was (`reltuples` is then
            // -1), and at least twice what the last filter held. Should it still fill up (the
            // estimate was old), it starts over twice as large.
            let rows: f32 = sqlx::query_scalar(self.kind.rows)
                .fetch_one(pool)
                .await
                .map_err(db)?;
            // (An estimate past any real table's size is not trusted either: it would size a
            // filter that cannot be allocated.)
            let rows = if (0.0..1e10).contains(&rows) {
                rows as usize
            } else {
                let counted: i64 = sqlx::query_scalar(self.kind.count)
                    .fetch_one(pool)
                    .await
                    .map_err(db)?;
                usize::try_from(counted).unwrap_or(0)
            };
            let held = self.inner().bloom.as_ref().map_or(0, |b| b.len());
            let mut capacity = rows.max(held).saturating_mul(2);
            loop {
                let mut bloom = Bloom::with_capacity(capacity);
                if self
                    .add_runs(pool, 0..open_run, &mut read, Some(&mut bloom), epoch)
                    .await?
                {
                    let mut inner = self.inner();
                    if inner.epoch != epoch {
                        return Ok(());
                    }
                    inner.bloom = Some(bloom);
                    break;
                }
                capacity = bloom.len().saturating_mul(2);
            }
        }
        let mut inner = self.inner();
        if inner.epoch != epoch {
            // The database went back in time during the load: the next one starts over.
            return Ok(());
        }
        inner.covered = inner.covered.max(open_run);
        tracing::debug!(
            whose = self.kind.whose,
            runs = open_run,
            ids = read,
            ms = started.elapsed().as_millis() as u64,
            "replay filter loaded"
        );
        Ok(())
    }

    /// Adds the IDs of `runs` to `into`, or to the filter in use if `None` (as long as the
    /// filter is still that of `epoch`). `false` if the filter became overfull, or was dropped
    /// (the caller builds another).
    async fn add_runs(
        &self,
        pool: &PgPool,
        runs: std::ops::Range<i32>,
        read: &mut usize,
        mut into: Option<&mut Bloom>,
        epoch: u64,
    ) -> Result<bool, StoreError> {
        for run in runs {
            let mut after: (i32, Vec<u8>) = (i32::MIN, Vec::new());
            loop {
                let rows: Vec<(i32, Vec<u8>)> = sqlx::query_as(self.kind.chunk)
                    .bind(run)
                    .bind(after.0)
                    .bind(&after.1)
                    .bind(LOAD_CHUNK)
                    .fetch_all(pool)
                    .await
                    .map_err(db)?;
                *read += rows.len();
                let mut ids = Vec::with_capacity(rows.len());
                for (_, id) in &rows {
                    // A stored ID of another length matches no report's (they are 16 bytes), so
                    // the filter needs it no more than the probes do: it is skipped, rather than
                    // stopping every load.
                    match <[u8; 16]>::try_from(&id[..]) {
                        Ok(id) => ids.push(id),
                        Err(_) => tracing::warn!(
                            ids = self.kind.whose,
                            run,
                            length = id.len(),
                            "replay runs: a stored report ID is not 16 bytes; skipped"
                        ),
                    }
                }
                match into.as_deref_mut() {
                    Some(bloom) => {
                        ids.iter().for_each(|id| bloom.insert(id));
                        if bloom.overfull() {
                            return Ok(false);
                        }
                    }
                    None => {
                        let mut inner = self.inner();
                        if inner.epoch != epoch {
                            return Ok(false);
                        }
                        let Some(bloom) = inner.bloom.as_mut() else {
                            return Ok(false);
                        };
                        ids.iter().for_each(|id| bloom.insert(id));
                        if bloom.overfull() {
                            return Ok(false);
                        }
                    }
                }
                let full = rows.len() as i64 == LOAD_CHUNK;
                match rows.into_iter().last() {
                    Some(last) if full => after = last,
                    _ => break,
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that finds the database's open run behind the one this process knew takes the
    /// database's (so its writes there count, and it closes that run in time), and drops the
    /// filter only if the filter covers runs past it.
    #[test]
    fn a_writer_that_finds_the_database_behind_takes_its_open_run() {
        let mut inner = Inner {
            bloom: Some(Bloom::with_capacity(10)),
            covered: 4,
            open_run: 5,
            written: 7,
            ..Inner::default()
        };
        assert!(!inner.check_written(4, "helper"));
        assert_eq!((inner.open_run, inner.written, inner.covered), (4, 0, 4));
        assert!(inner.bloom.is_some());
        assert!(
            inner.see(4),
            "writes into the database's open run count again"
        );

        assert!(inner.check_written(3, "helper"));
        assert_eq!((inner.open_run, inner.covered), (3, 0));
        assert!(inner.bloom.is_none());

        // At or past the open run it knows, nothing changes (`see` moves it forward).
        inner.written = 2;
        assert!(!inner.check_written(3, "helper"));
        assert!(!inner.check_written(6, "helper"));
        assert_eq!((inner.open_run, inner.written), (3, 2));
    }
}
