//! Tunables of the aggregator.

use serde::{Deserialize, Serialize};

/// How an aggregator batches, leases and polls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// Largest number of reports in one aggregation job.
    pub max_aggregation_job_size: usize,
    /// Largest number of report bytes in one aggregation job, as the task's VDAF makes them: a
    /// task with larger reports gets smaller jobs (16 MiB by default: about 960 Prio3SumVec(1000)
    /// reports; Prio3Count and Prio3Histogram(100) jobs are held by `max_aggregation_job_size`).
    /// Each side holds a job's reports and their preparation in memory while it runs.
    pub max_aggregation_job_bytes: usize,
    /// Largest number of bytes of aggregates one aggregation job sums its reports into: one
    /// aggregate share per time bucket its reports fall in, each as long as the task's VDAF
    /// makes it (8 bytes for Prio3Count, 16,000 for Prio3SumVec(1000)). A Helper refuses a job
    /// whose reports fall in more buckets than fit (a job in one bucket always fits), before it
    /// prepares any, so that a job of many small report shares spread over many buckets cannot
    /// take more memory than this; a Leader makes no job of more reports than fit. A Leader's
    /// setting must not be above its Helper's.
    pub max_job_aggregate_bytes: usize,
    /// How long a job driver holds a lease, in seconds.
    pub lease_duration_s: u64,
    /// How often job drivers look for work when nothing wakes them, in milliseconds.
    pub polling_interval_ms: u64,
    /// How long the job creator waits after a wake-up for more reports, in milliseconds. Longer
    /// waits cut fewer partial jobs: on PostgreSQL, 300 gave Prio3Count about 10 % more
    /// throughput for 0.2–0.3 s more latency (on SQLite it cost a few percent), so `duet serve`
    /// uses 300 there unless its config sets this.
    pub job_creation_delay_ms: u64,
    /// Largest number of uploaded reports written in one transaction.
    pub upload_batch_size: usize,
    /// Largest number of uploaded bytes written in one transaction (a larger report goes alone).
    /// Large reports make long writes, and each upload waits for the write before its own: at
    /// about 384 KiB a batch of 17 kB Prio3SumVec(1000) reports takes PostgreSQL about as long to
    /// insert as a flush of its log, which it can then overlap (see `duet-store`'s
    /// `put_reports_pipelined`: PostgreSQL does so from 192 KiB).
    pub upload_batch_bytes: usize,
    /// Uploads waiting to be written before new uploads are refused with 429.
    pub upload_queue_capacity: usize,
    /// Report bytes waiting to be written before new uploads are refused with 429, each
    /// report counted in whole KiB (a report longer than this is taken only into an empty
    /// queue): clients that upload large reports and hang up at once cannot make the queue
    /// hold more.
    pub upload_queue_bytes: usize,
    /// Aggregation jobs the driver keeps in flight at once (a freed slot is leased again at once).
    pub max_concurrent_jobs: usize,
    /// Attempts before a failing job is abandoned (an aggregation job's reports are then
    /// dropped). The delays between attempts double from 2 s up to `max_retry_delay_s`: the
    /// default 25 attempts span about three hours, so that reports outlast a Helper that is down
    /// or unreachable for that long.
    pub max_job_attempts: u32,
    /// The longest delay before a failed job is tried again, in seconds (at most a day).
    pub max_retry_delay_s: u64,
    /// The longest a request's head (its line and headers) may take to arrive, in milliseconds,
    /// from when its connection is ready for it: a client that sends nothing, or its headers a
    /// byte at a time, or that leaves a keep-alive connection idle that long, is disconnected.
    /// Keep it above the idle timeout of any proxy in front (often 60 s), or the proxy may send
    /// a request on a connection just as it closes.
    pub http_header_timeout_ms: u64,
    /// The longest a request's body may take to arrive once its head has, in milliseconds
    /// (408 after that): uploads are at most a few megabytes, another aggregator's requests at
    /// most 256 MiB.
    pub http_body_timeout_ms: u64,
    /// The most connections served at once; the next is accepted when one closes. The process's
    /// limit on open files (`ulimit -n`) must allow this many and more: `duet serve` raises
    /// its soft limit to this plus 1,024, as far as the hard limit allows.
    pub max_connections: usize,
    /// How long a Helper keeps an aggregation job's request hash and response, to answer a
    /// Leader's retry of it the same way, in seconds. A Leader's retry after that would find its
    /// reports replayed while the Helper holds them aggregated, and the batch's counts would
    /// disagree (`batchMismatch`), so this must outlast any Leader's retries (Duet's take about
    /// three hours by default): at least a day.
    pub helper_job_retention_s: u64,
    /// Whether this process runs the Leader's job creator and its aggregation and collection
    /// drivers. Off, it only serves the API (uploads are stored, collection jobs are accepted)
    /// and leaves the jobs to replicas on the same database that have it on.
    pub run_jobs: bool,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            max_aggregation_job_size: 2500,
            max_aggregation_job_bytes: 16 << 20,
            max_job_aggregate_bytes: 256 << 20,
            lease_duration_s: 600,
            polling_interval_ms: 5000,
            job_creation_delay_ms: 100,
            upload_batch_size: 1000,
            upload_batch_bytes: 384 * 1024,
            upload_queue_capacity: 50_000,
            upload_queue_bytes: 64 << 20,
            max_concurrent_jobs: 4,
            max_job_attempts: 25,
            max_retry_delay_s: 600,
            http_header_timeout_ms: 75_000,
            http_body_timeout_ms: 120_000,
            max_connections: 4096,
            helper_job_retention_s: 7 * 24 * 3600,
            run_jobs: true,
        }
    }
}

/// The largest aggregation job a config may ask for, and the most reports a Helper prepares in
/// one job: one request's preparation runs on one thread, so a larger job would hold it for
/// minutes (and be prepared again on a retry).
pub(crate) const MAX_AGGREGATION_JOB_SIZE: usize = 100_000;
/// The shortest lease that outlasts the Leader's 120 s request timeout.
const SAFE_LEASE_DURATION_S: u64 = 150;

/// The longest retry delay any config gets: a day.
const MAX_RETRY_DELAY_S: u64 = 24 * 3600;

impl AggregatorConfig {
    /// The most time buckets one aggregation job's reports may fall in, for a VDAF whose
    /// aggregate shares are `aggregate_len` bytes long: as many as fit
    /// `max_job_aggregate_bytes`, and at least one.
    pub fn max_job_buckets(&self, aggregate_len: usize) -> usize {
        (self.max_job_aggregate_bytes / aggregate_len.max(1)).max(1)
    }

    /// The polling interval.
    pub fn polling_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.polling_interval_ms)
    }

    /// Refuses values that would break the server, naming the setting and what it takes: jobs
    /// that aggregate nothing, drivers that spin, leases that expire while their job runs, jobs
    /// abandoned at their first failure.
    pub fn validate(&self) -> Result<(), String> {
        let at_least = |name: &str, value: u64, least: u64, why: &str| {
            if value < least {
                Err(format!(
                    "{name} must be at least {least} ({why}); it is {value}"
                ))
            } else {
                Ok(())
            }
        };
        let size = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        at_least(
            "max_aggregation_job_size",
            size(self.max_aggregation_job_size),
            1,
            "a job of no reports aggregates nothing",
        )?;
        at_least(
            "max_aggregation_job_bytes",
            size(self.max_aggregation_job_bytes),
            1,
            "a job of no bytes aggregates nothing",
        )?;
        if self.max_aggregation_job_size > MAX_AGGREGATION_JOB_SIZE {
            return Err(format!(
                "max_aggregation_job_size must be at most {MAX_AGGREGATION_JOB_SIZE} (what a \
                 Duet Helper takes per job); it is {}",
                self.max_aggregation_job_size
            ));
        }
        at_least(
            "max_job_aggregate_bytes",
            size(self.max_job_aggregate_bytes),
            1,
            "0 leaves a job no room for its aggregates",
        )?;
        at_least(
            "lease_duration_s",
            self.lease_duration_s,
            1,
            "a lease of 0 s is over before its job starts",
        )?;
        at_least(
            "polling_interval_ms",
            self.polling_interval_ms,
            10,
            "shorter polls only load the database",
        )?;
        at_least(
            "max_job_attempts",
            u64::from(self.max_job_attempts),
            1,
            "a job needs an attempt",
        )?;
        at_least(
            "max_retry_delay_s",
            self.max_retry_delay_s,
            1,
            "retries need a pause",
        )?;
        for (name, value) in [
            ("upload_batch_size", self.upload_batch_size),
            ("upload_batch_bytes", self.upload_batch_bytes),
            ("upload_queue_capacity", self.upload_queue_capacity),
            ("upload_queue_bytes", self.upload_queue_bytes),
            ("max_concurrent_jobs", self.max_concurrent_jobs),
            ("max_connections", self.max_connections),
        ] {
            at_least(name, size(value), 1, "none would do nothing")?;
        }
        at_least(
            "helper_job_retention_s",
            self.helper_job_retention_s,
            24 * 3600,
            "a Leader may retry a job for hours, and a retry after it is gone loses its reports",
        )?;
        at_least(
            "http_header_timeout_ms",
            self.http_header_timeout_ms,
            100,
            "clients need time to send a request",
        )?;
        at_least(
            "http_body_timeout_ms",
            self.http_body_timeout_ms,
            100,
            "clients need time to send a body",
        )?;
        Ok(())
    }

    /// Settings that work but risk more than they save, as messages for the log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let retries: u64 = (1..self.max_job_attempts)
            .map(|a| self.retry_delay_s(a))
            .fold(0, u64::saturating_add);
        if retries.saturating_mul(2) > self.helper_job_retention_s {
            warnings.push(format!(
                "a Leader's job may be retried for {retries} s (max_job_attempts, \
                 max_retry_delay_s), over half of helper_job_retention_s ({} s): a Helper of the \
                 same settings may forget a job before its last retry, and the batch's counts \
                 would then disagree",
                self.helper_job_retention_s
            ));
        }
        if self.lease_duration_s < SAFE_LEASE_DURATION_S {
            warnings.push(format!(
                "lease_duration_s is {} s: a job whose request to the Helper takes longer (up to \
                 120 s) may be leased again and run twice; {SAFE_LEASE_DURATION_S} s or more \
                 avoids that",
                self.lease_duration_s
            ));
        }
        warnings
    }

    /// Seconds to wait before trying a job again after its `attempts`-th attempt failed:
    /// `2^attempts`, at most `max_retry_delay_s` (and a day) and at least 1.
    pub fn retry_delay_s(&self, attempts: u32) -> u64 {
        1u64.checked_shl(attempts)
            .unwrap_or(u64::MAX)
            .min(self.max_retry_delay_s.min(MAX_RETRY_DELAY_S))
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_break_the_server_are_refused() {
        assert_eq!(AggregatorConfig::default().validate(), Ok(()));
        let refused = |config: AggregatorConfig, name: &str| {
            let e = config.validate().expect_err(name);
            assert!(e.starts_with(name), "{e}");
        };
        let d = AggregatorConfig::default;
        refused(
            AggregatorConfig {
                max_aggregation_job_size: 0,
                ..d()
            },
            "max_aggregation_job_size",
        );
        refused(
            AggregatorConfig {
                max_aggregation_job_size: 100_001,
                ..d()
            },
            "max_aggregation_job_size",
        );
        refused(
            AggregatorConfig {
                max_aggregation_job_bytes: 0,
                ..d()
            },
            "max_aggregation_job_bytes",
        );
        refused(
            AggregatorConfig {
                max_job_aggregate_bytes: 0,
                ..d()
            },
            "max_job_aggregate_bytes",
        );
        refused(
            AggregatorConfig {
                lease_duration_s: 0,
                ..d()
            },
            "lease_duration_s",
        );
        let short = AggregatorConfig {
            lease_duration_s: 60,
            ..d()
        };
        assert_eq!(short.validate(), Ok(()));
        assert!(short.warnings()[0].starts_with("lease_duration_s is 60 s"));
        assert!(d().warnings().is_empty());
        let long_retries = AggregatorConfig {
            max_job_attempts: 2_000,
            ..d()
        };
        assert!(long_retries.warnings()[0].contains("helper_job_retention_s"));
        refused(
            AggregatorConfig {
                polling_interval_ms: 0,
                ..d()
            },
            "polling_interval_ms",
        );
        refused(
            AggregatorConfig {
                max_job_attempts: 0,
                ..d()
            },
            "max_job_attempts",
        );
        refused(
            AggregatorConfig {
                upload_batch_size: 0,
                ..d()
            },
            "upload_batch_size",
        );
        refused(
            AggregatorConfig {
                max_connections: 0,
                ..d()
            },
            "max_connections",
        );
        refused(
            AggregatorConfig {
                http_header_timeout_ms: 0,
                ..d()
            },
            "http_header_timeout_ms",
        );
        refused(
            AggregatorConfig {
                helper_job_retention_s: 3600,
                ..d()
            },
            "helper_job_retention_s",
        );
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let config = AggregatorConfig::default();
        let delays: Vec<u64> = (1..=11).map(|a| config.retry_delay_s(a)).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(config.retry_delay_s(64), 600);
        assert_eq!(config.retry_delay_s(u32::MAX), 600);
        let no_wait = AggregatorConfig {
            max_retry_delay_s: 0,
            ..config.clone()
        };
        assert_eq!(no_wait.retry_delay_s(3), 1);
        let forever = AggregatorConfig {
            max_retry_delay_s: u64::MAX,
            ..config.clone()
        };
        assert_eq!(forever.retry_delay_s(200), 24 * 3600);
        // The default attempts outlast a three-hour outage of the Helper.
        let waited: u64 = (1..config.max_job_attempts)
            .map(|a| config.retry_delay_s(a))
            .sum();
        assert!(waited >= 3 * 3600 - 1000, "{waited} s");
    }
}
