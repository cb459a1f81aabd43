//! Replay sets: the report IDs a role has taken in, kept as a sorted table plus a log of recent
//! IDs that this process also holds in memory.
//!
//! Report IDs are random, so inserting each batch of new IDs straight into one large B-tree
//! writes about one page per ID once the tree outgrows a transaction's worth of pages. Instead a
//! new ID is appended to the role's log table (an increasing integer key, so appends fill pages
//! in order) and added to an in-memory set. When [`MERGE_AT`] IDs have been logged since the
//! last merge, the log's IDs go into the sorted table as a new *run*: the table's key is (run,
//! task key, report ID), and each merge's run number is larger than any before, so a merge
//! only appends, whatever the table's size (merging into one sorted tree instead rewrote about
//! every leaf page of it). The IDs come from the memory set, sorted, so a merge reads nothing of
//! the log; it ends by deleting the log rows it moved. Runs are compacted level by level (see
//! [`runs`]), which bounds their number. A check looks in the memory set, then probes each run
//! of the sorted table (listed in `replay_runs`), which only reads.
//!
//! Several processes may write one file. The memory set is a cache of the log: every write
//! transaction that admits IDs first reads the log rows above its watermark (log keys are never
//! reused), and starts over when the log's generation has changed (bumped when a merge ends, so
//! that the set sheds the merged IDs, and when a task is deleted). That happens under SQLite's
//! write lock, so the check sees every committed ID. The set only ever holds IDs some
//! transaction committed, so a stale set can miss a replay (outside a write transaction, where
//! callers re-check) but never invent one.
//!
//! In a write transaction, a Bloom filter of the sorted table (see [`filter`]) spares the probe
//! of an ID the table cannot hold, so the number of runs costs only the probes of the few IDs
//! the filter lets through.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use duet_core::AggregatorRole;
use duet_messages::dap09::{ReportId, TaskId};
use sqlx::{SqliteConnection, SqlitePool};

use super::{col, col_array, db, list_placeholders, values_placeholders, MAX_BIND_PARAMS};
use crate::StoreError;

/// IDs logged since the last merge at which a merge starts. The set in memory holds about this
/// many IDs (about 5 MB); the sorted table gains a run per merge.
const MERGE_AT: i64 = 100_000;
/// Transactions a merge is spread over, each moving the IDs whose first byte is in one slice.
/// With more than one, an ID logged while a merge is under way may be merged by a slice still
/// to come and stay logged; the next merge then puts it in its run too.
const MERGE_SLICES: i64 = 1;

/// Both roles' replay sets, shared by every handle on one pool.
#[derive(Debug)]
pub(super) struct ReplaySets {
    pub leader: ReplayLog,
    pub helper: ReplayLog,
}

impl ReplaySets {
    /// Both roles' sets; their filters are built from `pool`, or (`None`) never used.
    pub(super) fn new(pool: Option<&SqlitePool>) -> Self {
        ReplaySets {
            leader: ReplayLog::new("leader", "report_id_log", "report_ids", true, pool),
            helper: ReplayLog::new(
                "helper",
                "helper_report_id_log",
                "helper_report_ids",
                false,
                pool,
            ),
        }
    }

    /// The set of `role`.
    pub(super) fn of(&self, role: AggregatorRole) -> &ReplayLog {
        match role {
            AggregatorRole::Leader => &self.leader,
            AggregatorRole::Helper => &self.helper,
        }
    }

    /// Stops the filters' background builds.
    pub(super) fn stop(&self) {
        self.leader.filter.stop();
        self.helper.filter.stop();
    }
}

/// One role's replay set.
pub(super) struct ReplayLog {
    /// The `replay_logs` row naming this log.
    name: &'static str,
    /// The log table: `id INTEGER PRIMARY KEY, task_id, report_id` and, if `with_seq`, `seq`.
    log: &'static str,
    /// The sorted table: `PRIMARY KEY (run, task_key, report_id)`, the run from `replay_runs`
    /// and the task's key from `replay_tasks`.
    table: &'static str,
    /// Whether log rows carry the `seq` of the report's first upload (the Leader's do).
    with_seq: bool,
    merge_at: AtomicI64,
    merge_slices: AtomicI64,
    /// Runs per level compacted together, and IDs per compaction slice.
    fanout: AtomicI64,
    slice_ids: AtomicI64,
    recent: Mutex<Recent>,
    /// The sorted table's filter.
    filter: filter::Filter,
    /// IDs probed in every run of the sorted table so far, and in the runs a stale filter
    /// does not cover.
    #[cfg(test)]
    probed: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    probed_later: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for ReplayLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayLog").field("log", &self.log).finish()
    }
}

/// The log rows this process has read, as of `generation` and up to `watermark`.
#[derive(Default)]
struct Recent {
    generation: Option<i64>,
    watermark: i64,
    ids: HashMap<TaskId, HashSet<ReportId>>,
    /// IDs a read outside a write transaction found missing from the sorted table.
    probed: Probed,
}

impl Recent {
    fn contains(&self, task_id: &TaskId, id: &ReportId) -> bool {
        self.ids.get(task_id).is_some_and(|ids| ids.contains(id))
    }
}

/// The merge state of a log: its generation and the next slice of a merge under way. Only a
/// merge slice adds IDs to the sorted table, and each changes this pair, which never repeats.
type MergeState = (i64, i64);

/// Report IDs that the sorted table did not hold when the log's merge state was `state`: while
/// it still is, they are not there, and admitting them needs no second probe (a Helper that
/// checked its IDs with `seen_report_ids`, as it does when it retries a job, then stores it).
#[derive(Default)]
struct Probed {
    state: Option<MergeState>,
    ids: HashMap<TaskId, HashSet<ReportId>>,
    len: usize,
}

/// IDs kept in [`Probed`] at most; beyond that it starts over (jobs that fail between the check
/// and the write leave their IDs behind).
const MAX_PROBED: usize = 1_000_000;

/// A report ID to admit, with the `seq` of its upload (ignored by logs without one).
#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub task_id: TaskId,
    pub report_id: ReportId,
    pub seq: i64,
}

impl ReplayLog {
    fn new(
        name: &'static str,
        log: &'static str,
        table: &'static str,
        with_seq: bool,
        pool: Option<&SqlitePool>,
    ) -> Self {
        ReplayLog {
            name,
            log,
            table,
            with_seq,
            merge_at: AtomicI64::new(MERGE_AT),
            merge_slices: AtomicI64::new(MERGE_SLICES),
            fanout: AtomicI64::new(runs::FANOUT),
            slice_ids: AtomicI64::new(runs::SLICE_IDS),
            recent: Mutex::new(Recent::default()),
            filter: filter::Filter::new(pool.map(|pool| filter::Source {
                pool: pool.clone(),
                name,
                table,
            })),
            #[cfg(test)]
            probed: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            probed_later: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Merges the log every `ids` IDs in `slices` transactions instead of [`MERGE_AT`] and
    /// [`MERGE_SLICES`] (for tests of merging).
    #[cfg(test)]
    pub(super) fn set_merge(&self, ids: i64, slices: i64) {
        self.merge_at.store(ids, Ordering::Relaxed);
        self.merge_slices.store(slices, Ordering::Relaxed);
    }

    /// Compacts `fanout` runs of a level together, `slice_ids` IDs a slice, instead of
    /// [`runs::FANOUT`] and [`runs::SLICE_IDS`] (for tests of compaction).
    #[cfg(test)]
    pub(super) fn set_compaction(&self, fanout: i64, slice_ids: i64) {
        self.fanout.store(fanout, Ordering::Relaxed);
        self.slice_ids.store(slice_ids, Ordering::Relaxed);
    }

    /// The merge size, the runs per level compacted together and the IDs per compaction slice.
    fn compaction_settings(&self) -> (i64, i64, i64) {
        (
            self.merge_at.load(Ordering::Relaxed),
            self.fanout.load(Ordering::Relaxed),
            self.slice_ids.load(Ordering::Relaxed),
        )
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        // The set is only ever added to or cleared whole, so a panic elsewhere while it was
        // locked cannot leave it inconsistent.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the sorted table's filter now (see [`filter::Filter::warm_up`]).
    pub(super) async fn warm_up(&self) -> Result<(), StoreError> {
        self.filter.warm_up().await
    }

    /// Drops the memory set if it predates `generation`, the one a task deletion started (other
    /// processes reread the log when they see it). A set that a transaction resynchronised since
    /// is left alone: it may hold IDs of the task committed after the deletion, which a merge
    /// would otherwise take out of the log without moving them.
    pub(super) fn forget_task(&self, generation: i64) {
        let mut recent = self.recent();
        if recent.generation.is_some_and(|g| g < generation) {
            *recent = Recent::default();
        }
    }

    /// Which of `ids` the set holds, as far as this process knows: the memory set, then the
    /// sorted table. Outside a write transaction IDs committed by another process since this
    /// one last admitted IDs may be missed; [`Intake::admit`] never misses one.
    pub(super) async fn known(
        &self,
        conn: &mut SqliteConnection,
        task_id: &TaskId,
        ids: &[ReportId],
    ) -> Result<HashSet<ReportId>, StoreError> {
        self.lookup(conn, task_id, ids, None).await
    }

    /// [`ReplayLog::known`]; `writing` is the merge state read by the write transaction this
    /// runs in, if it does. Outside one, the IDs missing from the table are remembered in
    /// [`Probed`]; inside one, IDs remembered under the same state are not probed again, nor
    /// IDs the filter does not hold if it covers that state (if it covers an older one, those
    /// are probed only in the runs written since its snapshot).
    async fn lookup(
        &self,
        conn: &mut SqliteConnection,
        task_id: &TaskId,
        ids: &[ReportId],
        writing: Option<MergeState>,
    ) -> Result<HashSet<ReportId>, StoreError> {
        let mut known = HashSet::new();
        let mut probe = Vec::with_capacity(ids.len());
        {
            let recent = self.recent();
            let probed = recent
                .probed
                .ids
                .get(task_id)
                .filter(|_| writing.is_some() && recent.probed.state == writing);
            for id in ids {
                if recent.contains(task_id, id) {
                    known.insert(*id);
                } else if !probed.is_some_and(|probed| probed.contains(id)) {
                    probe.push(*id);
                }
            }
        }
        // IDs to probe in every run, then IDs to probe only in the runs after a given one.
        let mut passes = vec![(-1, probe)];
        if let Some(state) = writing {
            if let Some(later) = self.filter.triage(state, &mut passes[0].1) {
                passes.push(later);
            }
        }
        let mut states = HashSet::new();
        for (after_run, probe) in &mut passes {
            self.probe(conn, task_id, probe, *after_run, &mut known, &mut states)
                .await?;
        }
        if writing.is_none() && states.len() == 1 {
            let state = states.into_iter().next();
            let probe = &passes[0].1;
            let mut recent = self.recent();
            let probed = &mut recent.probed;
            if probed.state != state || probed.len > MAX_PROBED {
                *probed = Probed {
                    state,
                    ..Probed::default()
                };
            }
            let absent = probed.ids.entry(*task_id).or_default();
            for id in probe.iter().filter(|id| !known.contains(id)) {
                if absent.insert(*id) {
                    probed.len += 1;
                }
            }
        }
        Ok(known)
    }

    /// Probes the sorted table's runs numbered above `after_run` for `probe` (sorted in place):
    /// adds those found to `known`, and the merge states the statements read to `states`.
    async fn probe(
        &self,
        conn: &mut SqliteConnection,
        task_id: &TaskId,
        probe: &mut Vec<ReportId>,
        after_run: i64,
        known: &mut HashSet<ReportId>,
        states: &mut HashSet<MergeState>,
    ) -> Result<(), StoreError> {
        // In key order, so that consecutive probes share the upper pages of the tree.
        probe.sort_unstable_by_key(|id| id.0);
        probe.dedup();
        #[cfg(test)]
        if after_run < 0 {
            self.probed.fetch_add(probe.len(), Ordering::Relaxed);
        } else {
            self.probed_later.fetch_add(probe.len(), Ordering::Relaxed);
        }
        // One statement per chunk reads the merge state and probes the table in one snapshot.
        let chunk_len = MAX_BIND_PARAMS - 4;
        for chunk in probe.chunks(chunk_len) {
            let sql = format!(
                "-- replay_probe\n\
                 SELECT NULL AS report_id, generation, merge_slice FROM replay_logs \
                 WHERE name = ? \
                 UNION ALL \
                 SELECT report_id, NULL, NULL FROM {} \
                 WHERE run IN (SELECT run FROM replay_runs WHERE name = ? AND run > ?) \
                   AND task_key = (SELECT task_key FROM replay_tasks WHERE task_id = ?) \
                   AND report_id IN ({})",
                self.table,
                list_placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql)
                .persistent(chunk.len() == chunk_len)
                .bind(self.name)
                .bind(self.name)
                .bind(after_run)
                .bind(&task_id.0[..]);
            for id in chunk {
                query = query.bind(&id.0[..]);
            }
            for row in query.fetch_all(&mut *conn).await.map_err(db)? {
                let found: Option<Vec<u8>> = col(&row, "report_id")?;
                if found.is_some() {
                    known.insert(ReportId(col_array(&row, "report_id")?));
                } else {
                    states.insert((col(&row, "generation")?, col(&row, "merge_slice")?));
                }
            }
        }
        Ok(())
    }

    /// Starts admitting IDs in a write transaction: brings the memory set up to date with the
    /// log first.
    pub(super) async fn begin(
        &self,
        conn: &mut SqliteConnection,
    ) -> Result<Intake<'_>, StoreError> {
        let row = sqlx::query(
            "-- replay_sync\n\
             SELECT generation, merge_slice, merge_mark, compact_run, compact_slice, compact_slices \
             FROM replay_logs WHERE name = ?",
        )
        .bind(self.name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        let generation: i64 = col(&row, "generation")?;
        let merge_slice: i64 = col(&row, "merge_slice")?;
        self.filter.observe((generation, merge_slice));
        let watermark = {
            let mut recent = self.recent();
            if recent.generation != Some(generation) {
                let probed = std::mem::take(&mut recent.probed);
                *recent = Recent {
                    generation: Some(generation),
                    probed,
                    ..Recent::default()
                };
            }
            recent.watermark
        };
        let rows = sqlx::query(&format!(
            "-- replay_sync\nSELECT id, task_id, report_id FROM {} WHERE id > ? ORDER BY id",
            self.log
        ))
        .bind(watermark)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let mut recent = self.recent();
        for row in &rows {
            let id: i64 = col(row, "id")?;
            recent
                .ids
                .entry(TaskId(col_array(row, "task_id")?))
                .or_default()
                .insert(ReportId(col_array(row, "report_id")?));
            recent.watermark = recent.watermark.max(id);
        }
        let synced_to = recent.watermark;
        drop(recent);
        Ok(Intake {
            log: self,
            generation,
            merge_slice,
            merge_mark: col(&row, "merge_mark")?,
            compaction: runs::from_row(&row)?,
            synced_to,
            appended_to: synced_to,
            admitted: HashMap::new(),
        })
    }
}

/// IDs being admitted in one write transaction. Call [`Intake::finish`] before committing and
/// [`Admitted::remember`] after.
pub(super) struct Intake<'a> {
    log: &'a ReplayLog,
    generation: i64,
    /// The slice a merge in progress moves next, from 1; 0 when no merge is under way. With
    /// `generation`, the merge state until [`Intake::finish`] moves a slice.
    merge_slice: i64,
    /// The log's last row when the last merge started.
    merge_mark: i64,
    /// The compaction of the sorted table's runs under way (run 0: none).
    compaction: runs::Compaction,
    /// The log's last row when the transaction started.
    synced_to: i64,
    /// The log's last row after this transaction's appends.
    appended_to: i64,
    admitted: HashMap<TaskId, HashSet<ReportId>>,
}

impl<'a> Intake<'a> {
    /// Admits `entries`: returns, for each, whether its ID is new (not in the set, and not
    /// earlier in `entries` or in this transaction), and appends the new ones to the log.
    pub(super) async fn admit(
        &mut self,
        conn: &mut SqliteConnection,
        entries: &[Entry],
    ) -> Result<Vec<bool>, StoreError> {
        let mut by_task: HashMap<TaskId, Vec<ReportId>> = HashMap::new();
        for entry in entries {
            by_task
                .entry(entry.task_id)
                .or_default()
                .push(entry.report_id);
        }
        let mut known: HashMap<TaskId, HashSet<ReportId>> = HashMap::with_capacity(by_task.len());
        for (task_id, ids) in &by_task {
            let found = self
                .log
                .lookup(
                    conn,
                    task_id,
                    ids,
                    Some((self.generation, self.merge_slice)),
                )
                .await?;
            known.insert(*task_id, found);
        }
        {
            // Admitted or not, these IDs are decided: the check's note on them is spent.
            let mut recent = self.log.recent();
            let probed = &mut recent.probed;
            for (task_id, ids) in &by_task {
                if let Some(absent) = probed.ids.get_mut(task_id) {
                    for id in ids {
                        if absent.remove(id) {
                            probed.len -= 1;
                        }
                    }
                }
            }
        }
        let mut fresh = Vec::with_capacity(entries.len());
        let mut appends = Vec::with_capacity(entries.len());
        for entry in entries {
            let is_new = !known[&entry.task_id].contains(&entry.report_id)
                && self
                    .admitted
                    .entry(entry.task_id)
                    .or_default()
                    .insert(entry.report_id);
            fresh.push(is_new);
            if is_new {
                appends.push(*entry);
            }
        }
        self.append(conn, &appends).await?;
        Ok(fresh)
    }

    async fn append(
        &mut self,
        conn: &mut SqliteConnection,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let columns = if self.log.with_seq { 3 } else { 2 };
        let chunk_len = MAX_BIND_PARAMS / columns;
        for chunk in entries.chunks(chunk_len) {
            let sql = format!(
                "-- replay_append\nINSERT INTO {} (task_id, report_id{}) VALUES {}",
                self.log.log,
                if self.log.with_seq { ", seq" } else { "" },
                values_placeholders(chunk.len(), columns)
            );
            let mut query = sqlx::query(&sql).persistent(chunk.len() == chunk_len);
            for entry in chunk {
                query = query
                    .bind(&entry.task_id.0[..])
                    .bind(&entry.report_id.0[..]);
                if self.log.with_seq {
                    query = query.bind(entry.seq);
                }
            }
            // Keys are AUTOINCREMENT and this transaction holds the write lock: the last row
            // inserted is the log's last.
            self.appended_to = query
                .execute(&mut *conn)
                .await
                .map_err(db)?
                .last_insert_rowid();
        }
        Ok(())
    }

    /// Ends admission: moves one slice of the log into the sorted table if a merge is under way
    /// or due, and starts a compaction of the table's runs if the merge's run completes a level;
    /// a transaction that merges nothing moves a slice of a compaction under way instead.
    pub(super) async fn finish(
        mut self,
        conn: &mut SqliteConnection,
    ) -> Result<Admitted<'a>, StoreError> {
        let log = self.log;
        // The merge state this transaction found.
        let from = (self.generation, self.merge_slice);
        let slices = log.merge_slices.load(Ordering::Relaxed).clamp(1, 256);
        if self.merge_slice == 0
            && self.appended_to - self.merge_mark >= log.merge_at.load(Ordering::Relaxed)
        {
            self.merge_slice = 1;
            self.merge_mark = self.appended_to;
        }
        let mut ended = false;
        let mut filter_step = None;
        if self.merge_slice > 0 {
            let slice = self.merge_slice.min(slices);
            let (lo, hi) = runs::slice_range(slice, slices);
            // The slice's IDs are the log's IDs in its range, all of which the memory set (synced
            // when this transaction began) or this transaction's admissions hold: taken from
            // there, sorted, the slice reads nothing of the log.
            let in_slice = |id: &&ReportId| id.0[0] >= lo[0] && hi.is_none_or(|hi| id.0[0] < hi[0]);
            let mut by_task: HashMap<TaskId, Vec<ReportId>> = HashMap::new();
            {
                let recent = log.recent();
                for (task_id, ids) in recent.ids.iter().chain(&self.admitted) {
                    let ids = ids.iter().filter(in_slice).copied();
                    by_task.entry(*task_id).or_default().extend(ids);
                }
            }
            let mut moving: Vec<(TaskId, Vec<ReportId>)> = by_task.into_iter().collect();
            let started = now();
            for (_, ids) in &mut moving {
                ids.sort_unstable_by_key(|id| id.0);
                ids.dedup();
            }
            let merged = runs::write_run(conn, log, &moving).await?;
            ended = slice == slices;
            if ended {
                // Every row logged before the merge started is in the table now; rows logged
                // since stay logged. (With several slices, those that took such rows in too
                // hold them twice: the next merge writes them to its run again, and a
                // compaction keeps one. Every process must slice alike, or this deletes rows
                // of ranges no slice moved.)
                sqlx::query(&format!(
                    "-- replay_merge\nDELETE FROM {} WHERE id <= ?",
                    log.log
                ))
                .bind(self.merge_mark)
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            }
            tracing::debug!(
                log = log.name,
                slice,
                slices,
                ids = merged,
                ms = now().saturating_duration_since(started).as_millis() as u64,
                "replay log merge slice"
            );
            self.merge_slice = if ended { 0 } else { slice + 1 };
            if log.filter.wants_merge_from(from) {
                let moved = moving.into_iter().flat_map(|(_, ids)| ids).collect();
                let to = (self.generation + i64::from(ended), self.merge_slice);
                filter_step = Some((from, to, moved));
            }
            sqlx::query(
                "-- replay_merge\n\
                 UPDATE replay_logs SET merge_slice = ?, merge_mark = ?, \
                   generation = generation + ? WHERE name = ?",
            )
            .bind(self.merge_slice)
            .bind(self.merge_mark)
            .bind(i64::from(ended))
            .bind(log.name)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
            if ended && self.compaction.run == 0 {
                runs::plan(conn, log).await?;
            }
        } else if self.compaction.run != 0 && runs::step(conn, log, self.compaction).await? {
            runs::plan(conn, log).await?;
        }
        Ok(Admitted {
            log,
            generation: self.generation,
            synced_to: self.synced_to,
            appended_to: self.appended_to,
            admitted: self.admitted,
            merged: ended,
            filter_step,
        })
    }
}

impl ReplayLog {
    /// Deletes a task's IDs from the sorted table and the log, and starts a new generation of
    /// the log, which it returns: every process rereads the log before its next admission.
    /// Call [`ReplayLog::forget_task`] with it once the transaction has committed.
    pub(super) async fn delete_task(
        &self,
        conn: &mut SqliteConnection,
        task_id: &TaskId,
    ) -> Result<i64, StoreError> {
        runs::delete_task(conn, self, task_id).await?;
        sqlx::query(&format!(
            "-- delete_task\nDELETE FROM {} WHERE task_id = ?",
            self.log
        ))
        .bind(&task_id.0[..])
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        sqlx::query_scalar(
            "-- delete_task\n\
             UPDATE replay_logs SET generation = generation + 1 WHERE name = ? \
             RETURNING generation",
        )
        .bind(self.name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)
    }
}

/// IDs admitted by a transaction, to add to the memory set once it has committed.
pub(super) struct Admitted<'a> {
    log: &'a ReplayLog,
    generation: i64,
    synced_to: i64,
    appended_to: i64,
    admitted: HashMap<TaskId, HashSet<ReportId>>,
    /// Whether this transaction ended a merge (and bumped the generation).
    merged: bool,
    /// The merge slice it moved, if the filter wanted it: the state it moved from, the state
    /// after it, and the moved IDs.
    filter_step: Option<(MergeState, MergeState, Vec<ReportId>)>,
}

impl Admitted<'_> {
    /// Adds the committed IDs to the memory set. If nothing else read the log since this
    /// transaction began, the log rows it appended are exactly these IDs, so the watermark moves
    /// past them; otherwise the next transaction rereads them. Skipping this (say, on a
    /// cancelled future) only costs that reread.
    pub(super) fn remember(self) {
        if let Some((from, to, moved)) = self.filter_step {
            self.log.filter.advance(from, to, moved);
        }
        let mut recent = self.log.recent();
        if self.merged {
            // The merged IDs are in the sorted table: start over from what is left of the log,
            // unless a transaction that began since did so already.
            if recent.generation == Some(self.generation) {
                *recent = Recent::default();
            }
            return;
        }
        if recent.generation != Some(self.generation) {
            return;
        }
        if recent.watermark == self.synced_to {
            recent.watermark = self.appended_to;
        }
        for (task_id, ids) in self.admitted {
            recent.ids.entry(task_id).or_default().extend(ids);
        }
    }
}

/// The time, for pacing filter builds and timing merges (not a timestamp anything stores).
#[allow(clippy::disallowed_methods)] // Measures durations.
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

mod filter;
mod runs;
#[cfg(test)]
mod tests;
