//! Operational counters, rendered for Prometheus (text exposition format 0.0.4) at `/metrics`.
//!
//! One [`Metrics`] per process, shared by the Leader and the Helper; everything is an atomic
//! (rejection reasons, which are few and rare, sit behind a mutex).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use duet_messages::problem::TYPE_URI_PREFIX;

use crate::error::Error;

/// The media type of the rendered metrics.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How an aggregation job step ended (Leader).
#[derive(Clone, Copy, Debug)]
pub(crate) enum AggregationOutcome {
    Finished,
    Retried,
    Abandoned,
}

/// How a collection job ended (Leader).
#[derive(Clone, Copy, Debug)]
pub(crate) enum CollectionOutcome {
    Finished,
    Abandoned,
}

/// The datastore operations whose latency is recorded.
#[derive(Clone, Copy, Debug)]
pub(crate) enum StoreOp {
    PutReports,
    CreateAggregationJobs,
    AcquireAggregationJobs,
    FinishAggregationJob,
    PutHelperAggregationJob,
}

const STORE_OPS: [(StoreOp, &str); 5] = [
    (StoreOp::PutReports, "put_reports"),
    (StoreOp::CreateAggregationJobs, "create_aggregation_jobs"),
    (StoreOp::AcquireAggregationJobs, "acquire_aggregation_jobs"),
    (StoreOp::FinishAggregationJob, "finish_aggregation_job"),
    (
        StoreOp::PutHelperAggregationJob,
        "put_helper_aggregation_job",
    ),
];

#[derive(Debug, Default)]
struct Timing {
    nanos: AtomicU64,
    count: AtomicU64,
}

/// The process's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    uploads: AtomicU64,
    upload_rejections: Mutex<BTreeMap<&'static str, u64>>,
    aggregation_jobs: [AtomicU64; 3],
    collection_jobs: [AtomicU64; 2],
    helper_continued: AtomicU64,
    helper_rejected: AtomicU64,
    /// Reports of the Leader's aggregation jobs, by [`LeaderReports`]'s fields in order, then
    /// those of abandoned jobs.
    leader_reports: [AtomicU64; 4],
    datastore: [Timing; STORE_OPS.len()],
}

/// What became of the reports of one finished Leader aggregation job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaderReports {
    /// Aggregated by both aggregators.
    pub aggregated: u64,
    /// Rejected by the Leader: its share did not decrypt, decode or prepare, or the report
    /// falls in a batch collected meanwhile.
    pub rejected: u64,
    /// Rejected by the Helper.
    pub rejected_by_helper: u64,
}

/// The outcomes of [`Metrics::leader_reports`], as the metric labels them.
const LEADER_REPORT_OUTCOMES: [&str; 4] =
    ["aggregated", "rejected", "rejected_by_helper", "abandoned"];

/// Writes the `HELP` and `TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    /// Counts an upload: stored, or rejected for the error's reason (the DAP problem type's short
    /// name, `overloaded` for a 429, `internal` for a 500).
    pub(crate) fn upload(&self, result: Result<(), &Error>) {
        let reason = match result {
            Ok(()) => return add(&self.uploads, 1),
            Err(Error::Abort(abort)) => {
                let uri = abort.problem.type_uri();
                uri.strip_prefix(TYPE_URI_PREFIX).unwrap_or(uri)
            }
            Err(Error::Overloaded) => "overloaded",
            Err(_) => "internal",
        };
        if let Ok(mut rejections) = self.upload_rejections.lock() {
            *rejections.entry(reason).or_default() += 1;
        }
    }

    pub(crate) fn aggregation_job(&self, outcome: AggregationOutcome) {
        add(&self.aggregation_jobs[outcome as usize], 1);
    }

    pub(crate) fn collection_job(&self, outcome: CollectionOutcome) {
        add(&self.collection_jobs[outcome as usize], 1);
    }

    /// Counts the reports of a Helper aggregation job the Helper prepared.
    pub(crate) fn helper_reports(&self, continued: u64, rejected: u64) {
        add(&self.helper_continued, continued);
        add(&self.helper_rejected, rejected);
    }

    /// Counts the reports of a finished Leader aggregation job.
    pub(crate) fn leader_reports(&self, reports: LeaderReports) {
        add(&self.leader_reports[0], reports.aggregated);
        add(&self.leader_reports[1], reports.rejected);
        add(&self.leader_reports[2], reports.rejected_by_helper);
    }

    /// Counts the reports of an abandoned Leader aggregation job: dropped.
    pub(crate) fn leader_reports_abandoned(&self, reports: u64) {
        add(&self.leader_reports[3], reports);
    }

    /// Runs a datastore call, recording how long it took (successful or not).
    pub(crate) async fn time<T>(&self, op: StoreOp, call: impl Future<Output = T>) -> T {
        #[allow(clippy::disallowed_methods)] // Measuring a duration, not reading the time.
        let start = std::time::Instant::now();
        let output = call.await;
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let timing = &self.datastore[op as usize];
        add(&timing.nanos, nanos);
        add(&timing.count, 1);
        output
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "duet_uploads_total",
            "counter",
            "Reports accepted and stored by the Leader.",
        );
        let _ = writeln!(out, "duet_uploads_total {}", get(&self.uploads));
        family(
            &mut out,
            "duet_upload_rejections_total",
            "counter",
            "Uploads refused, by DAP problem type (or overloaded, internal).",
        );
        if let Ok(rejections) = self.upload_rejections.lock() {
            for (reason, n) in rejections.iter() {
                let _ = writeln!(
                    out,
                    "duet_upload_rejections_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        family(
            &mut out,
            "duet_aggregation_jobs_total",
            "counter",
            "Leader aggregation job steps, by outcome.",
        );
        for (i, outcome) in ["finished", "retried", "abandoned"].iter().enumerate() {
            let _ = writeln!(
                out,
                "duet_aggregation_jobs_total{{outcome=\"{outcome}\"}} {}",
                get(&self.aggregation_jobs[i])
            );
        }
        family(
            &mut out,
            "duet_collection_jobs_total",
            "counter",
            "Leader collection jobs ended, by outcome.",
        );
        for (i, outcome) in ["finished", "abandoned"].iter().enumerate() {
            let _ = writeln!(
                out,
                "duet_collection_jobs_total{{outcome=\"{outcome}\"}} {}",
                get(&self.collection_jobs[i])
            );
        }
        family(
            &mut out,
            "duet_helper_reports_total",
            "counter",
            "Reports the Helper prepared in aggregation jobs, by outcome.",
        );
        let _ = writeln!(
            out,
            "duet_helper_reports_total{{outcome=\"continued\"}} {}\n\
             duet_helper_reports_total{{outcome=\"rejected\"}} {}",
            get(&self.helper_continued),
            get(&self.helper_rejected)
        );
        family(
            &mut out,
            "duet_leader_reports_total",
            "counter",
            "Reports of the Leader's aggregation jobs, by outcome (those of abandoned jobs are \
             dropped).",
        );
        for (counter, outcome) in self.leader_reports.iter().zip(LEADER_REPORT_OUTCOMES) {
            let _ = writeln!(
                out,
                "duet_leader_reports_total{{outcome=\"{outcome}\"}} {}",
                get(counter)
            );
        }
        family(
            &mut out,
            "duet_datastore_seconds",
            "summary",
            "Time spent in datastore calls, by operation.",
        );
        for (op, name) in STORE_OPS {
            let timing = &self.datastore[op as usize];
            let _ = writeln!(
                out,
                "duet_datastore_seconds_sum{{operation=\"{name}\"}} {}\n\
                 duet_datastore_seconds_count{{operation=\"{name}\"}} {}",
                get(&timing.nanos) as f64 / 1e9,
                get(&timing.count)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use duet_messages::problem::DapProblemType;

    use super::*;

    #[tokio::test]
    async fn renders_counters() {
        let m = Metrics::default();
        m.upload(Ok(()));
        m.upload(Err(&Error::abort(
            DapProblemType::ReportTooEarly,
            None,
            "x",
        )));
        m.upload(Err(&Error::Overloaded));
        m.aggregation_job(AggregationOutcome::Retried);
        m.collection_job(CollectionOutcome::Abandoned);
        m.helper_reports(4, 1);
        m.time(StoreOp::FinishAggregationJob, async {}).await;
        let text = m.render();
        for line in [
            "duet_uploads_total 1",
            "duet_upload_rejections_total{reason=\"reportTooEarly\"} 1",
            "duet_upload_rejections_total{reason=\"overloaded\"} 1",
            "duet_aggregation_jobs_total{outcome=\"finished\"} 0",
            "duet_aggregation_jobs_total{outcome=\"retried\"} 1",
            "duet_collection_jobs_total{outcome=\"abandoned\"} 1",
            "duet_helper_reports_total{outcome=\"continued\"} 4",
            "duet_helper_reports_total{outcome=\"rejected\"} 1",
            "duet_datastore_seconds_count{operation=\"finish_aggregation_job\"} 1",
            "duet_datastore_seconds_count{operation=\"put_reports\"} 0",
            "# TYPE duet_datastore_seconds summary",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
