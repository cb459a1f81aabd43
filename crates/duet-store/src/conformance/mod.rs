//! The conformance suite every [`Datastore`] backend must pass, written only against the trait.
//!
//! [`run_all`] takes two handles on the same fresh database, one bound to the Leader role and one
//! to the Helper role. Each check uses fresh random task IDs and deletes its tasks when done, so
//! checks don't see each other's rows (the job-acquiring methods are not per task, so a check
//! must not leave runnable jobs behind). Failures panic, as in any test.

mod collection;
mod helper;
mod leader;
pub mod postgres;
mod tasks;

use duet_core::auth::AuthenticationToken;
use duet_core::hpke::HpkeKeypair;
use duet_core::task::parse_endpoint;
use duet_core::{QueryTypeConfig, Task, VdafInstance};
use duet_messages::dap09::{
    Duration, HpkeCiphertext, HpkeConfigId, Interval, ReportId, ReportIdChecksum, TaskId, Time,
};

use crate::{BatchAggregation, Datastore, NewReport};

pub use collection::{check_collection_job_overlaps, check_collection_jobs};
pub use helper::{
    check_aggregate_share_jobs, check_batch_sums, check_helper_aggregation_jobs,
    check_helper_delete_task, check_old_helper_jobs_are_deleted, check_served_batches_are_final,
    check_served_batches_by_time,
};
pub use leader::{
    check_aggregation_jobs, check_jobs_across_uploads, check_leader_delete_task,
    check_pipelined_uploads, check_put_reports, unaggregated,
};
pub use tasks::{check_health, check_hpke_keypairs, check_settings, check_tasks};

/// Runs every check; `leader` and `helper` are handles on the same fresh database.
pub async fn run_all(leader: &dyn Datastore, helper: &dyn Datastore) {
    check_health(leader, helper).await;
    check_settings(leader).await;
    check_tasks(leader, helper).await;
    check_hpke_keypairs(leader, helper).await;
    check_put_reports(leader).await;
    check_pipelined_uploads(leader).await;
    check_aggregation_jobs(leader, helper).await;
    check_jobs_across_uploads(leader).await;
    check_leader_delete_task(leader, helper).await;
    check_collection_jobs(leader).await;
    check_collection_job_overlaps(leader).await;
    check_helper_aggregation_jobs(leader, helper).await;
    check_aggregate_share_jobs(leader, helper).await;
    check_batch_sums(leader, helper).await;
    check_served_batches_are_final(helper).await;
    check_served_batches_by_time(helper).await;
    check_old_helper_jobs_are_deleted(helper).await;
    check_helper_delete_task(leader, helper).await;
}

// ---- Fixtures ----

/// The bucket width used by the checks.
const PRECISION: u64 = 3600;
/// A `PRECISION`-aligned time the checks start from.
const T0: u64 = 444_444 * PRECISION;

/// A valid task with the given ID.
fn task(id: TaskId) -> Task {
    Task {
        id,
        leader_endpoint: parse_endpoint("https://leader.example/").expect("valid URL"),
        helper_endpoint: parse_endpoint("https://helper.example/").expect("valid URL"),
        query_type: QueryTypeConfig::TimeInterval,
        vdaf: VdafInstance::Prio3Count,
        vdaf_verify_key: rand::random(),
        max_batch_query_count: 1,
        task_expiration: None,
        report_expiry_age: None,
        min_batch_size: 10,
        time_precision: Duration(PRECISION),
        tolerable_clock_skew: Duration(60),
        collector_hpke_config: HpkeKeypair::generate(HpkeConfigId(1)).config,
        aggregator_auth_token: AuthenticationToken::random(),
        collector_auth_token: Some(AuthenticationToken::random()),
    }
}

/// A report with a fresh ID at `time`; its payload is recognisably its own.
fn report(task_id: TaskId, time: u64) -> NewReport {
    let report_id = ReportId::random();
    let mut encoded = b"report:".to_vec();
    encoded.extend_from_slice(&report_id.0);
    NewReport {
        task_id,
        report_id,
        time: Time(time),
        encoded,
    }
}

/// Creates aggregation jobs of at most `max_job_size` reports at `now`; how many were created.
async fn create_jobs(store: &dyn Datastore, max_job_size: usize, now: u64) -> usize {
    store
        .create_aggregation_jobs(max_job_size, Time(now))
        .await
        .expect("create_aggregation_jobs")
}

fn interval(start: u64, duration: u64) -> Interval {
    Interval {
        start: Time(start),
        duration: Duration(duration),
    }
}

/// A share in the checks' toy VDAF: a little-endian `u64`.
fn share(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Reads a toy share.
fn share_value(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8-byte share"))
}

/// The toy VDAF's share addition, in the shape of [`crate::MergeFn`].
fn add_shares(a: &[u8], b: &[u8]) -> Result<Vec<u8>, String> {
    let a: [u8; 8] = a.try_into().map_err(|_| "bad stored share".to_string())?;
    let b: [u8; 8] = b.try_into().map_err(|_| "bad delta share".to_string())?;
    Ok(share(
        u64::from_le_bytes(a).wrapping_add(u64::from_le_bytes(b)),
    ))
}

/// The checksum of a set of report IDs.
fn checksum(ids: &[ReportId]) -> ReportIdChecksum {
    ids.iter()
        .fold(ReportIdChecksum::default(), |c, id| c.updated_with(id))
}

/// A delta for the bucket starting at `bucket_start`, aggregating `ids` to `value`.
fn delta(task_id: TaskId, bucket_start: u64, value: u64, ids: &[ReportId]) -> BatchAggregation {
    BatchAggregation {
        task_id,
        bucket: interval(bucket_start, PRECISION),
        aggregation_parameter: Vec::new(),
        aggregate_share: share(value),
        report_count: ids.len() as u64,
        checksum: checksum(ids),
    }
}

/// A ciphertext with recognisable contents.
fn ciphertext(tag: u8) -> HpkeCiphertext {
    HpkeCiphertext {
        config_id: HpkeConfigId(tag),
        encapsulated_key: vec![tag; 32],
        payload: vec![tag; 24],
    }
}
