//! What the bench measures with: measurements to upload, older reports already in the databases,
//! and the cryptographic floor.

use anyhow::Result;
use duet_core::hpke::{open, HpkeApplicationInfo, HpkeKeypair};
use duet_core::{AggregatorRole, Clock, Measurement, RealClock, VdafInstance};
use duet_messages::dap09::{
    AggregationJobId, InputShareAad, PlaintextInputShareRef, Report, ReportId, Role, TaskId, Time,
};
use rand::{Rng, SeedableRng};

use super::now;

/// Measurements of `vdaf`, the same for every run (a fixed seed).
pub(super) fn generate(vdaf: &VdafInstance, n: usize) -> Vec<Measurement> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| match vdaf {
            VdafInstance::Prio3Count => Measurement::Count(rng.gen_bool(0.5)),
            VdafInstance::Prio3Sum { .. } => Measurement::Sum(rng.gen_range(0..256)),
            VdafInstance::Prio3Histogram { length, .. } => {
                Measurement::Histogram(rng.gen_range(0..*length))
            }
            VdafInstance::Prio3SumVec { length, .. } => {
                Measurement::SumVec((0..*length).map(|_| rng.gen_range(0..2)).collect())
            }
        })
        .collect()
}

/// Reports per history batch: each is stored, then aggregated.
const HISTORY_BATCH: usize = 10_000;
/// Reports per history aggregation job.
const HISTORY_JOB: usize = 1_000;

/// Fills the Helper's database with `n` report IDs of task `task_id` taken in by aggregation
/// jobs long finished, through the store's own job lifecycle, as a long-running deployment of
/// that task would have.
pub(super) async fn add_helper_history(
    helper_db: &str,
    sqlite: duet_store::sqlite::SqliteSetup,
    task_id: TaskId,
    n: usize,
) -> Result<()> {
    // The database is created here, before its server starts: with the server's setup.
    let helper = crate::db::open_with(helper_db, AggregatorRole::Helper, sqlite).await?;
    let keep_first = |a: &[u8], _: &[u8]| Ok(a.to_vec());
    let pb = crate::upload::progress_bar(n as u64, "Helper history");
    let mut done = 0;
    while done < n {
        let ids: Vec<ReportId> = (done..n.min(done + HISTORY_JOB))
            .map(|_| ReportId::random())
            .collect();
        done += ids.len();
        let job = duet_store::HelperAggregationJob {
            task_id,
            id: AggregationJobId::random(),
            request_hash: [0; 32],
            step: 0,
            response: Vec::new(),
        };
        helper
            .put_helper_aggregation_job(&job, &ids, &[], &keep_first)
            .await?;
        pb.set_position(done as u64);
    }
    pb.finish_and_clear();
    helper.close().await;
    Ok(())
}

/// Fills the Leader's database with `n` reports of task `task_id`, uploaded a month ago and
/// aggregated since, through the store's own job lifecycle (uploads, jobs, finished jobs).
pub(super) async fn add_leader_history(leader_db: &str, task_id: TaskId, n: usize) -> Result<()> {
    let store = crate::db::open(leader_db, AggregatorRole::Leader).await?;
    let keep_first = |a: &[u8], _: &[u8]| Ok(a.to_vec());
    let pb = crate::upload::progress_bar(n as u64, "Leader history");
    let t0 = RealClock.now().0.saturating_sub(30 * 86_400);
    let mut done = 0;
    while done < n {
        let batch: Vec<duet_store::NewReport> = (done..n.min(done + HISTORY_BATCH))
            .map(|i| duet_store::NewReport {
                task_id,
                report_id: ReportId::random(),
                time: Time(t0 + i as u64 / 100),
                encoded: vec![0; 200],
            })
            .collect();
        done += batch.len();
        store.put_reports(&batch).await?;
        store
            .create_aggregation_jobs(HISTORY_JOB, RealClock.now())
            .await?;
        loop {
            let jobs = store
                .acquire_aggregation_jobs(RealClock.now(), 600, 100)
                .await?;
            if jobs.is_empty() {
                break;
            }
            for job in &jobs {
                store.finish_aggregation_job(job, &[], &keep_first).await?;
            }
        }
        pb.set_position(done as u64);
    }
    pb.finish_and_clear();
    store.close().await;
    Ok(())
}

/// Writes the dirty pages of what came before a timed phase out now, not during it: the
/// previous run's or phase's writes, or the history's, as a database that had been quiet for a
/// while would have. Without this a phase paid for whatever the work before it left unwritten
/// (on PostgreSQL a checkpoint that the previous run's log made due), and its figure depended on
/// which runs came before it. `sync` for the whole system (opening and closing a SQLite file
/// here would drop SQLite's POSIX locks), and on PostgreSQL a `CHECKPOINT` too, which writes out
/// its own buffer cache (it needs a superuser or the `pg_checkpoint` role; without either the
/// bench says so and goes on). The phase's own writes then count in full: every page it changes
/// is written whole to the log once, the worst case of a steady state.
pub(super) async fn settle(database: &str) {
    let _ = std::process::Command::new("sync").status();
    if !(database.starts_with("postgres://") || database.starts_with("postgresql://")) {
        return;
    }
    let checkpoint = async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(database).await?;
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await
    };
    if let Err(e) = checkpoint.await {
        eprintln!(
            "warning: could not checkpoint the database before a timed phase ({e}): the \
             dirty pages of what came before will be written during the measurement"
        );
    }
}

/// Passes over the sample when measuring the floor; each figure is its fastest pass.
const FLOOR_PASSES: usize = 5;

/// Single-threaded CPU per report (seconds) of the Leader's and the Helper's work, and of one
/// HPKE open alone: the fastest of [`FLOOR_PASSES`] passes over `reports` for each, so that a
/// pass slowed by other work on the machine (preemption, the previous run's disk writes) does
/// not lower the floor and flatter the ratio.
pub(super) fn floor(
    task: &duet_core::Task,
    leader_key: &HpkeKeypair,
    helper_key: &HpkeKeypair,
    reports: &[Report],
) -> Result<(f64, f64, f64)> {
    let mut best = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..FLOOR_PASSES {
        let (leader, helper, open) = floor_pass(task, leader_key, helper_key, reports)?;
        best = (best.0.min(leader), best.1.min(helper), best.2.min(open));
    }
    Ok(best)
}

/// One pass of [`floor`].
fn floor_pass(
    task: &duet_core::Task,
    leader_key: &HpkeKeypair,
    helper_key: &HpkeKeypair,
    reports: &[Report],
) -> Result<(f64, f64, f64)> {
    let vdaf = task.vdaf.instantiate()?;
    let mut leader = std::time::Duration::ZERO;
    let mut helper = std::time::Duration::ZERO;
    let mut opens = std::time::Duration::ZERO;
    let mut leader_agg = vdaf.empty_aggregate()?;
    let mut helper_agg = vdaf.empty_aggregate()?;
    for r in reports {
        let aad = InputShareAad::encode_parts(&task.id, &r.metadata, &r.public_share);
        let t = now();
        let pt = open(
            leader_key,
            &HpkeApplicationInfo::InputShare {
                server: Role::Leader,
            },
            &r.leader_encrypted_input_share,
            &aad,
        )?;
        opens += t.elapsed();
        let share = PlaintextInputShareRef::get_decoded(&pt)?;
        let (state, msg) = vdaf.leader_init(
            &task.vdaf_verify_key,
            &r.metadata.id,
            &r.public_share,
            share.payload,
        )?;
        leader += t.elapsed();

        let t = now();
        let pt = open(
            helper_key,
            &HpkeApplicationInfo::InputShare {
                server: Role::Helper,
            },
            &r.helper_encrypted_input_share,
            &aad,
        )?;
        let share = PlaintextInputShareRef::get_decoded(&pt)?;
        let (out, reply) = vdaf.helper_init(
            &task.vdaf_verify_key,
            &r.metadata.id,
            &r.public_share,
            share.payload,
            &msg,
        )?;
        vdaf.accumulate(&mut helper_agg, &out)?;
        helper += t.elapsed();

        let t = now();
        let out = vdaf.leader_continued(state, &reply)?;
        vdaf.accumulate(&mut leader_agg, &out)?;
        leader += t.elapsed();
    }
    let n = reports.len().max(1) as f64;
    Ok((
        leader.as_secs_f64() / n,
        helper.as_secs_f64() / n,
        opens.as_secs_f64() / n,
    ))
}
