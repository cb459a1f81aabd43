//! A Bloom filter over a replay set's sorted table, so that admitting a fresh report ID (nearly
//! every ID) needs no probe of the table.
//!
//! The filter holds every ID the sorted table held at one merge state of the log, and maybe
//! more: while the log is at that state, an ID the filter lacks is not in the table, since only a
//! merge slice adds IDs to the table and each changes the state, which never repeats. A write
//! transaction reads the state before it checks IDs, so it uses the filter fully only when the
//! two states match.
//!
//! A filter that covers an older state still rules IDs out of the runs its snapshot listed: an
//! ID it lacks was in none of them, and since then those runs have only lost IDs, or (a
//! compaction's run) gained IDs from runs numbered below them, which the snapshot held. Run
//! numbers come from a counter and are never used twice, so such an ID can only be in a run
//! numbered above the snapshot's highest, and only those are probed for it.
//!
//! The filter is built from the table in one read snapshot, with the state read in the same
//! snapshot: when a server warms its store up, and in the background when the state has moved
//! without this process (another process merged, or a task was deleted). This process's own
//! merges keep it current: each adds the IDs it moved once its transaction has committed. IDs
//! are hashed with a key of this process's own, so clients cannot choose IDs that collide in it
//! (a collision would only cost a probe).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use duet_messages::dap09::ReportId;
use sqlx::{Connection, SqlitePool};

use super::{now, MergeState};
use crate::bloom::Bloom;
use crate::rows::col;
use crate::sqlite::db;
use crate::StoreError;

/// IDs read per statement while building.
const BUILD_CHUNK: i64 = 65_536;
/// A background build starts no sooner after the last one ended than this many times the time
/// that one took: rebuilding, when other processes keep merging, takes at most a tenth of a
/// core.
const BUILD_PAUSE_FACTOR: u32 = 9;

/// How long after a failed background build the next may start.
const BUILD_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a log's filter is built from.
#[derive(Clone)]
pub(super) struct Source {
    pub pool: SqlitePool,
    /// The `replay_logs` row naming the log.
    pub name: &'static str,
    /// The sorted table.
    pub table: &'static str,
}

/// One log's filter and its upkeep; shared with its builds.
#[derive(Clone, Default)]
pub(super) struct Filter(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    /// Where to build from; `None` (an in-memory database, whose one connection a build would
    /// hold) leaves the filter unused.
    source: Option<Source>,
    /// Once built: the merge state the filter covers, and the filter.
    built: Option<(MergeState, Bloom)>,
    /// The highest run its snapshot listed (-1: none; meaningful once built).
    last_run: i64,
    /// A background build under way.
    build: Option<tokio::task::JoinHandle<()>>,
    /// Merges this process committed while a build ran: `(from, to, IDs)`, to add to the
    /// built filter if its snapshot predates them.
    during_build: Vec<(MergeState, MergeState, Vec<ReportId>)>,
    /// Write transactions in a row that found the log at a state the filter does not cover.
    stale: u32,
    /// No background build starts before this.
    next_build: Option<Instant>,
    /// IDs read per statement while building (0: [`BUILD_CHUNK`]).
    chunk: i64,
}

impl Inner {
    /// The filter, if it covers `state`.
    fn covering(&self, state: MergeState) -> Option<&Bloom> {
        self.built
            .as_ref()
            .filter(|(covered, _)| *covered == state)
            .map(|(_, bloom)| bloom)
    }

    /// Whether a background build is under way.
    fn building(&self) -> bool {
        self.build.as_ref().is_some_and(|b| !b.is_finished())
    }
}

impl Filter {
    /// A filter built from `source`, or (`None`) never used.
    pub(super) fn new(source: Option<Source>) -> Filter {
        Filter(Arc::new(Mutex::new(Inner {
            source,
            ..Inner::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change leaves the filter covering its state (a panic mid-way can only leave
        // extra IDs in it), so a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sorts `ids` for probing at merge state `state`: leaves in `ids` those that may be in any
    /// run. If the filter covers `state` the others are in none; if it covers an older state,
    /// they are returned, with the run after which they may be (see the module's note).
    pub(super) fn triage(
        &self,
        state: MergeState,
        ids: &mut Vec<ReportId>,
    ) -> Option<(i64, Vec<ReportId>)> {
        let inner = self.lock();
        if let Some(bloom) = inner.covering(state) {
            ids.retain(|id| bloom.may_contain(&id.0));
            return None;
        }
        let (_, bloom) = inner.built.as_ref()?;
        let (maybe, later) = ids.drain(..).partition(|id| bloom.may_contain(&id.0));
        *ids = maybe;
        Some((inner.last_run, later))
    }

    /// Whether the filter covers `state`.
    #[cfg(test)]
    pub(super) fn covers(&self, state: MergeState) -> bool {
        self.lock().covering(state).is_some()
    }

    /// Whether a merge from `state` should tell [`Filter::advance`] which IDs it moved: the
    /// filter covers that state, or a build under way may need them.
    pub(super) fn wants_merge_from(&self, state: MergeState) -> bool {
        let inner = self.lock();
        inner.covering(state).is_some() || inner.building()
    }

    /// Notes the state a write transaction found: a filter that missed it twice in a row (the
    /// first miss may be this process's own merge not yet added), or was never built, is
    /// rebuilt in the background.
    pub(super) fn observe(&self, state: MergeState) {
        let mut inner = self.lock();
        if let Some(bloom) = inner.covering(state) {
            let overfull = bloom.overfull();
            inner.stale = 0;
            if !overfull {
                return;
            }
        } else {
            inner.stale = inner.stale.saturating_add(1);
            if inner.built.is_some() && inner.stale < 2 {
                return;
            }
        }
        if inner.source.is_none()
            || inner.building()
            || inner.next_build.is_some_and(|at| now() < at)
        {
            return;
        }
        let filter = self.clone();
        inner.during_build.clear();
        inner.build = Some(tokio::spawn(async move {
            if let Err(e) = filter.rebuild().await {
                tracing::warn!(error = %e, "building a replay filter failed; probing instead");
                filter.lock().next_build = Some(now() + BUILD_RETRY);
            }
        }));
    }

    /// A merge this process committed moved `ids` into the table, taking the log from state
    /// `from` to `to`.
    pub(super) fn advance(&self, from: MergeState, to: MergeState, ids: Vec<ReportId>) {
        let mut inner = self.lock();
        if let Some((state, bloom)) = &mut inner.built {
            apply(state, bloom, from, to, &ids);
        }
        if inner.building() {
            inner.during_build.push((from, to, ids));
        }
    }

    /// Builds the filter now (a server warming up), unless it is built already or has no
    /// source.
    pub(super) async fn warm_up(&self) -> Result<(), StoreError> {
        let unbuilt = {
            let inner = self.lock();
            inner.source.is_some() && inner.built.is_none()
        };
        if unbuilt {
            self.rebuild().await?;
        }
        Ok(())
    }

    /// Builds the filter from the table and installs it.
    pub(super) async fn rebuild(&self) -> Result<(), StoreError> {
        let (source, chunk) = {
            let inner = self.lock();
            let Some(source) = inner.source.clone() else {
                return Ok(());
            };
            (
                source,
                if inner.chunk > 0 {
                    inner.chunk
                } else {
                    BUILD_CHUNK
                },
            )
        };
        let started = now();
        let (state, last_run, mut bloom) = build(&source, chunk).await?;
        let took = now().saturating_duration_since(started);
        tracing::debug!(
            log = source.name,
            ids = bloom.len(),
            ms = took.as_millis() as u64,
            "replay filter built"
        );
        let mut inner = self.lock();
        let state = catch_up(state, &mut bloom, std::mem::take(&mut inner.during_build));
        inner.built = Some((state, bloom));
        inner.last_run = last_run;
        inner.stale = 0;
        inner.next_build = Some(now() + took * BUILD_PAUSE_FACTOR);
        Ok(())
    }

    /// Stops a background build (the store is closing).
    pub(super) fn stop(&self) {
        if let Some(build) = self.lock().build.take() {
            build.abort();
        }
    }

    /// Builds read `ids` IDs per statement instead of [`BUILD_CHUNK`] (for tests of paging).
    #[cfg(test)]
    pub(super) fn set_build_chunk(&self, ids: i64) {
        self.lock().chunk = ids;
    }

    /// Waits for a background build under way, if any.
    #[cfg(test)]
    pub(super) async fn settle(&self) {
        let build = self.lock().build.take();
        if let Some(build) = build {
            build.await.expect("build task");
        }
    }
}

/// Adds to a filter built at `state` the merges this process committed since its snapshot:
/// `steps` in commit order, `(from, to, IDs)`, of which those before the snapshot do not start
/// at its state. The state the filter then covers.
fn catch_up(
    mut state: MergeState,
    bloom: &mut Bloom,
    steps: Vec<(MergeState, MergeState, Vec<ReportId>)>,
) -> MergeState {
    for (from, to, ids) in steps {
        apply(&mut state, bloom, from, to, &ids);
    }
    state
}

/// Adds a merge that took the log from `from` to `to`, moving `ids`, to a filter covering
/// `state`, if that is `from` (a filter at another state is left alone).
fn apply(
    state: &mut MergeState,
    bloom: &mut Bloom,
    from: MergeState,
    to: MergeState,
    ids: &[ReportId],
) {
    if *state == from {
        for id in ids {
            bloom.insert(&id.0);
        }
        *state = to;
    }
}

/// Reads the sorted table in one snapshot: its merge state, its highest run and a filter of its
/// IDs, sized for twice as many. Each statement reads up to `chunk` IDs of one task in one run in
/// key order as one hexadecimal string (a row per ID would cost several times as much).
async fn build(source: &Source, chunk: i64) -> Result<(MergeState, i64, Bloom), StoreError> {
    let mut conn = source.pool.acquire().await.map_err(db)?;
    // A deferred transaction: its first read fixes the snapshot every later read sees.
    let mut tx = conn.begin().await.map_err(db)?;
    let row = sqlx::query(&format!(
        "-- replay_filter\n\
         SELECT generation, merge_slice, (SELECT COUNT(*) FROM {}) AS ids \
         FROM replay_logs WHERE name = ?",
        source.table
    ))
    .bind(source.name)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    let state: MergeState = (col(&row, "generation")?, col(&row, "merge_slice")?);
    let ids: i64 = col(&row, "ids")?;
    let mut bloom = Bloom::with_capacity(usize::try_from(ids).unwrap_or(0).saturating_mul(2));
    let keys: Vec<i64> = sqlx::query_scalar("-- replay_filter\nSELECT task_key FROM replay_tasks")
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
    let runs: Vec<i64> =
        sqlx::query_scalar("-- replay_filter\nSELECT run FROM replay_runs WHERE name = ?")
            .bind(source.name)
            .fetch_all(&mut *tx)
            .await
            .map_err(db)?;
    let sql = format!(
        "-- replay_filter\n\
         SELECT COUNT(*) AS n, COALESCE(group_concat(hex(report_id), ''), '') AS ids, \
           MAX(report_id) AS last \
         FROM (SELECT report_id FROM {} WHERE run = ? AND task_key = ? AND report_id > ? \
               ORDER BY report_id LIMIT ?)",
        source.table
    );
    let pairs: Vec<(i64, i64)> = runs
        .iter()
        .flat_map(|&run| keys.iter().map(move |&key| (run, key)))
        .collect();
    for (run, key) in pairs {
        let mut after = Vec::new();
        loop {
            let row = sqlx::query(&sql)
                .bind(run)
                .bind(key)
                .bind(&after)
                .bind(chunk)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
            let n: i64 = col(&row, "n")?;
            let hex: String = col(&row, "ids")?;
            for id in hex.as_bytes().chunks(32) {
                bloom.insert(&decode_id(id)?);
            }
            if n < chunk {
                break;
            }
            after = col(&row, "last")?;
        }
    }
    tx.rollback().await.map_err(db)?;
    Ok((state, runs.iter().copied().max().unwrap_or(-1), bloom))
}

/// A report ID from SQLite's `hex()` of it: 32 upper-case hexadecimal digits.
fn decode_id(hex: &[u8]) -> Result<[u8; 16], StoreError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut id = [0; 16];
    if hex.len() != 32 {
        return Err(StoreError::Corrupt(format!(
            "a stored report ID is {} bytes, not 16",
            hex.len() / 2
        )));
    }
    for (byte, pair) in id.iter_mut().zip(hex.chunks(2)) {
        *byte = match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return Err(StoreError::Corrupt("a stored report ID's hex".into())),
        };
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges committed while a build read the table are added if its snapshot predates them,
    /// in order, and skipped if it saw them.
    #[test]
    fn a_build_catches_up_with_merges_committed_meanwhile() {
        let ids: Vec<ReportId> = (0..3).map(|_| ReportId::random()).collect();
        let steps = vec![
            ((1, 0), (1, 2), vec![ids[0]]),
            ((1, 2), (2, 0), vec![ids[1]]),
            ((2, 0), (2, 2), vec![ids[2]]),
        ];
        let mut bloom = Bloom::with_capacity(0);
        assert_eq!(catch_up((1, 2), &mut bloom, steps.clone()), (2, 2));
        assert!(!bloom.may_contain(&ids[0].0));
        assert!(bloom.may_contain(&ids[1].0) && bloom.may_contain(&ids[2].0));
        // A snapshot after all of them, or one this process's merges do not start from.
        let mut bloom = Bloom::with_capacity(0);
        assert_eq!(catch_up((2, 2), &mut bloom, steps.clone()), (2, 2));
        assert_eq!(catch_up((3, 0), &mut bloom, steps), (3, 0));
        assert!(ids.iter().all(|id| !bloom.may_contain(&id.0)));
    }

    #[test]
    fn decodes_sqlite_hex() {
        let id = ReportId::random();
        let hex: String = id.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(decode_id(hex.as_bytes()).unwrap(), id.0);
        assert!(decode_id(b"00").is_err());
        assert!(decode_id(&[b'g'; 32]).is_err());
    }
}
