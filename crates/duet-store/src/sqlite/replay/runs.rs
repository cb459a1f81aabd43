//! The runs of a sorted replay table: writing a merge's run, compacting runs, and deleting a
//! task's IDs from them.
//!
//! A run's *level* is how many times its ID count holds [`FANOUT`] times a merge's: merges write
//! runs of level 0, and once a level has [`FANOUT`] runs they are compacted into one run of the
//! next level. A table of n IDs thus has fewer than [`FANOUT`] runs per level (outside a
//! compaction under way, and as long as task deletions do not shrink runs) and about
//! log_FANOUT(n / merge size) levels, and each ID is rewritten about once per level. Like a
//! merge, a compaction writes a run numbered above every other (from a counter, so no number is
//! used twice), so it only appends. It moves one
//! slice of the key space (by the report ID's first byte, about [`SLICE_IDS`] IDs) per write
//! transaction that moves no slice of a merge, inserting the slice's IDs into the new run and
//! deleting them from the old ones in that transaction, so a check finds each ID in one listed
//! run throughout. The compaction's membership does not change, so neither does the log's merge
//! state, and the Bloom filters stay valid.

use std::collections::BTreeMap;

use duet_messages::dap09::{ReportId, TaskId};
use sqlx::SqliteConnection;

use super::{col, db, now, ReplayLog};
use crate::StoreError;

/// Runs of one level compacted into one run of the next.
pub(super) const FANOUT: i64 = 8;
/// IDs a compaction slice moves, about: a compaction of n IDs takes n / this slices (at most 256).
pub(super) const SLICE_IDS: i64 = 100_000;
/// IDs a merge inserts per statement.
const MERGE_CHUNK: usize = 65_536;

/// A compaction under way: the run it writes, and its next slice (from 1) of how many.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Compaction {
    pub run: i64,
    pub slice: i64,
    pub slices: i64,
}

/// Slice `slice` (from 1) of `slices` holds the IDs whose first byte is in `[lo, hi)`; the last
/// slice is unbounded above.
pub(super) fn slice_range(slice: i64, slices: i64) -> ([u8; 1], Option<[u8; 1]>) {
    let slices = slices.clamp(1, 256);
    let slice = slice.clamp(1, slices);
    let lo = [u8::try_from((slice - 1) * 256 / slices).unwrap_or(u8::MAX)];
    let hi = u8::try_from(slice * 256 / slices).ok().map(|b| [b]);
    (lo, hi)
}

/// The level of a run of `ids` IDs when merges write `merge_at`.
fn level(ids: i64, merge_at: i64, fanout: i64) -> u32 {
    let fanout = fanout.max(2);
    let mut level = 0;
    let mut bound = merge_at.max(1).saturating_mul(fanout);
    while ids >= bound && bound < i64::MAX {
        level += 1;
        bound = bound.saturating_mul(fanout);
    }
    level
}

/// A number for a new run of `log`'s table, above every other run's ever (from the counter in
/// `replay_logs`: a stale filter relies on numbers never being used twice).
async fn next_run(conn: &mut SqliteConnection, log: &ReplayLog) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "-- replay_runs\n\
         UPDATE replay_logs SET next_run = next_run + 1 WHERE name = ? RETURNING next_run - 1",
    )
    .bind(log.name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)
}

/// Writes `tasks`' IDs (each task's sorted) to a new run of `log`'s table, giving each task a
/// key if it has none yet: the number of IDs written. Every logged ID was checked against the
/// table when admitted; OR IGNORE skips an ID logged twice.
pub(super) async fn write_run(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
    tasks: &[(TaskId, Vec<ReportId>)],
) -> Result<u64, StoreError> {
    let run = next_run(conn, log).await?;
    // One statement per chunk: the IDs go in as one blob, cut into rows in order.
    let sql = format!(
        "-- replay_merge\n\
         WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n + 1 < ?3) \
         INSERT OR IGNORE INTO {} (run, task_key, report_id) \
         SELECT ?4, (SELECT task_key FROM replay_tasks WHERE task_id = ?1), \
           substr(?2, n * 16 + 1, 16) \
         FROM i",
        log.table
    );
    let mut written = 0;
    for (task_id, ids) in tasks.iter().filter(|(_, ids)| !ids.is_empty()) {
        sqlx::query("-- replay_merge\nINSERT OR IGNORE INTO replay_tasks (task_id) VALUES (?)")
            .bind(&task_id.0[..])
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        for chunk in ids.chunks(MERGE_CHUNK) {
            let blob: Vec<u8> = chunk.iter().flat_map(|id| id.0).collect();
            written += sqlx::query(&sql)
                .bind(&task_id.0[..])
                .bind(blob)
                .bind(chunk.len() as i64)
                .bind(run)
                .execute(&mut *conn)
                .await
                .map_err(db)?
                .rows_affected();
        }
    }
    if written > 0 {
        list_run(conn, log, run, i64::try_from(written).unwrap_or(i64::MAX)).await?;
    }
    Ok(written)
}

/// Lists run `run` of `ids` IDs in `replay_runs`, so that checks probe it.
async fn list_run(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
    run: i64,
    ids: i64,
) -> Result<(), StoreError> {
    sqlx::query("-- replay_runs\nINSERT INTO replay_runs (name, run, ids) VALUES (?, ?, ?)")
        .bind(log.name)
        .bind(run)
        .bind(ids)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Starts compacting the runs of the lowest level that has [`FANOUT`] of them (none else is
/// under way): the compaction, if one started.
pub(super) async fn plan(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
) -> Result<Option<Compaction>, StoreError> {
    let (merge_at, fanout, slice_ids) = log.compaction_settings();
    let fanout = fanout.max(2);
    let runs: Vec<(i64, i64)> = sqlx::query_as(
        "-- replay_compact\nSELECT run, ids FROM replay_runs WHERE name = ? ORDER BY run",
    )
    .bind(log.name)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let mut levels: BTreeMap<u32, Vec<(i64, i64)>> = BTreeMap::new();
    for (run, ids) in runs {
        levels
            .entry(level(ids, merge_at, fanout))
            .or_default()
            .push((run, ids));
    }
    // Empty runs (run 0 of a new table, or a run whose tasks were deleted) do not count, but go
    // with the others of level 0.
    let Some(sources) = levels
        .into_values()
        .find(|runs| runs.iter().filter(|(_, ids)| *ids > 0).count() as i64 >= fanout)
    else {
        return Ok(None);
    };
    let run = next_run(conn, log).await?;
    let ids: i64 = sources.iter().map(|(_, ids)| ids).sum();
    let compaction = Compaction {
        run,
        slice: 1,
        slices: (ids / slice_ids.max(1) + 1).clamp(1, 256),
    };
    list_run(conn, log, run, ids).await?;
    let list = sources
        .iter()
        .map(|(run, _)| run.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(&format!(
        "-- replay_compact\nUPDATE replay_runs SET into_run = ? WHERE name = ? AND run IN ({list})"
    ))
    .bind(run)
    .bind(log.name)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    record(conn, log, compaction).await?;
    tracing::debug!(
        log = log.name,
        run,
        runs = sources.len(),
        ids,
        "replay runs compaction"
    );
    Ok(Some(compaction))
}

/// Stores the state of `log`'s compaction (run 0: none).
async fn record(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
    compaction: Compaction,
) -> Result<(), StoreError> {
    sqlx::query(
        "-- replay_compact\n\
         UPDATE replay_logs SET compact_run = ?, compact_slice = ?, compact_slices = ? \
         WHERE name = ?",
    )
    .bind(compaction.run)
    .bind(compaction.slice)
    .bind(compaction.slices)
    .bind(log.name)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Moves the next slice of `compaction` into its run: returns whether it ended (the runs it
/// moved are then gone).
pub(super) async fn step(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
    compaction: Compaction,
) -> Result<bool, StoreError> {
    let started = now();
    let (lo, hi) = slice_range(compaction.slice, compaction.slices);
    // Each source run is read by task and key range, from its primary key.
    let from = format!(
        "FROM {} WHERE run IN (SELECT run FROM replay_runs WHERE name = ?1 AND into_run = ?2) \
           AND task_key IN (SELECT task_key FROM replay_tasks) AND report_id >= ?3{}",
        log.table,
        if hi.is_some() {
            " AND report_id < ?4"
        } else {
            ""
        }
    );
    let statements = [
        format!(
            "-- replay_compact\n\
             INSERT OR IGNORE INTO {} (run, task_key, report_id) \
             SELECT ?2, task_key, report_id {from} ORDER BY task_key, report_id",
            log.table
        ),
        format!("-- replay_compact\nDELETE {from}"),
    ];
    let mut moved = 0;
    for sql in &statements {
        let mut query = sqlx::query(sql)
            .bind(log.name)
            .bind(compaction.run)
            .bind(&lo[..]);
        if let Some(hi) = &hi {
            query = query.bind(&hi[..]);
        }
        moved = query.execute(&mut *conn).await.map_err(db)?.rows_affected();
    }
    let ended = compaction.slice >= compaction.slices;
    if ended {
        sqlx::query("-- replay_compact\nDELETE FROM replay_runs WHERE name = ? AND into_run = ?")
            .bind(log.name)
            .bind(compaction.run)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        record(conn, log, Compaction::default()).await?;
    } else {
        let next = Compaction {
            slice: compaction.slice + 1,
            ..compaction
        };
        record(conn, log, next).await?;
    }
    tracing::debug!(
        log = log.name,
        run = compaction.run,
        slice = compaction.slice,
        slices = compaction.slices,
        ids = moved,
        ms = now().saturating_duration_since(started).as_millis() as u64,
        "replay runs compaction slice"
    );
    Ok(ended)
}

/// Deletes a task's IDs from `log`'s table, and the runs that leaves empty, except a
/// compaction's (which it may still fill).
pub(super) async fn delete_task(
    conn: &mut SqliteConnection,
    log: &ReplayLog,
    task_id: &TaskId,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "-- delete_task\n\
         DELETE FROM {} WHERE run IN (SELECT run FROM replay_runs WHERE name = ?1) \
           AND task_key = (SELECT task_key FROM replay_tasks WHERE task_id = ?2)",
        log.table
    ))
    .bind(log.name)
    .bind(&task_id.0[..])
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query(&format!(
        "-- delete_task\n\
         DELETE FROM replay_runs WHERE name = ?1 \
           AND run NOT IN (SELECT compact_run FROM replay_logs WHERE name = ?1 AND compact_run > 0) \
           AND NOT EXISTS (SELECT 1 FROM {} WHERE run = replay_runs.run)",
        log.table
    ))
    .bind(log.name)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// The compaction under way in `log`, from its `replay_logs` row.
pub(super) fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Compaction, StoreError> {
    Ok(Compaction {
        run: col(row, "compact_run")?,
        slice: col(row, "compact_slice")?,
        slices: col(row, "compact_slices")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_grow_by_the_fanout() {
        assert_eq!(level(0, 100_000, 8), 0);
        assert_eq!(level(799_999, 100_000, 8), 0);
        assert_eq!(level(800_000, 100_000, 8), 1);
        assert_eq!(level(6_400_000, 100_000, 8), 2);
        assert_eq!(level(i64::MAX, 100_000, 8), 15);
    }

    #[test]
    fn slices_cover_every_first_byte_once() {
        for slices in [1, 2, 3, 8, 41, 256] {
            let mut next = 0u16;
            for slice in 1..=slices {
                let (lo, hi) = slice_range(slice, slices);
                assert_eq!(u16::from(lo[0]), next);
                next = hi.map_or(256, |hi| u16::from(hi[0]));
            }
            assert_eq!(next, 256);
        }
    }
}
