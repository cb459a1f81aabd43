//! Batch arithmetic: buckets, batch-interval validation and per-bucket accumulation.

use std::collections::BTreeMap;

use duet_core::vdaf::{AggregateShare, OutputShare, Vdaf};
use duet_core::CoreError;
use duet_messages::dap09::{Duration, Interval, ReportId, ReportIdChecksum, TaskId, Time};
use duet_store::{BatchAggregation, BatchSum};

/// The `time_precision`-aligned bucket a report's timestamp falls in.
pub fn bucket_of(time: Time, precision: Duration) -> Interval {
    Interval {
        start: time.round_down(precision),
        duration: precision,
    }
}

/// Whether a time-interval batch is well-formed (DAP-09 §4.6.5.1.1): at least one
/// `time_precision` long, start and duration multiples of it, and ending by 2^63 - 1 s.
pub fn is_valid_batch_interval(interval: &Interval, precision: Duration) -> bool {
    precision.0 > 0
        && interval.duration.0 >= precision.0
        && interval.start.0 % precision.0 == 0
        && interval.duration.0 % precision.0 == 0
        // No report time is past 2^63 - 1 s (uploads refuse them), nor can the stores keep one.
        && interval
            .start
            .0
            .checked_add(interval.duration.0)
            .is_some_and(|end| i64::try_from(end).is_ok())
}

/// The smallest interval holding every one of `times` (empty if there are none): the collected
/// batches a set of reports can fall in are those that overlap it.
pub fn span_of(times: impl IntoIterator<Item = Time>) -> Interval {
    Interval::spanning(times.into_iter().map(|start| Interval {
        start,
        duration: Duration(1),
    }))
}

/// Whether `t` lies in any of `intervals`.
pub fn in_any(intervals: &[Interval], t: Time) -> bool {
    intervals
        .iter()
        .any(|i| i.start.0 <= t.0 && t.0 - i.start.0 < i.duration.0)
}

/// Sums output shares per bucket in memory, so that one job writes one row per bucket.
pub struct BucketAccumulator<'a> {
    vdaf: &'a Vdaf,
    precision: Duration,
    buckets: BTreeMap<u64, (AggregateShare, u64, ReportIdChecksum)>,
}

impl<'a> BucketAccumulator<'a> {
    /// An empty accumulator.
    pub fn new(vdaf: &'a Vdaf, precision: Duration) -> Self {
        Self {
            vdaf,
            precision,
            buckets: BTreeMap::new(),
        }
    }

    /// Adds one report's output share.
    pub fn add(
        &mut self,
        time: Time,
        report_id: &ReportId,
        out: &OutputShare,
    ) -> Result<(), CoreError> {
        let start = time.round_down(self.precision).0;
        let entry = match self.buckets.entry(start) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((self.vdaf.empty_aggregate()?, 0, ReportIdChecksum::default()))
            }
        };
        self.vdaf.accumulate(&mut entry.0, out)?;
        entry.1 += 1;
        entry.2 = entry.2.updated_with(report_id);
        Ok(())
    }

    /// The per-bucket deltas to merge into the store.
    pub fn into_deltas(self, task_id: TaskId) -> Result<Vec<BatchAggregation>, CoreError> {
        self.buckets
            .into_iter()
            .map(|(start, (share, count, checksum))| {
                Ok(BatchAggregation {
                    task_id,
                    bucket: Interval {
                        start: Time(start),
                        duration: self.precision,
                    },
                    aggregation_parameter: Vec::new(),
                    aggregate_share: self.vdaf.encode_aggregate(&share)?,
                    report_count: count,
                    checksum,
                })
            })
            .collect()
    }
}

/// The sum of a batch's bucket aggregations.
pub struct BatchTotal {
    /// Encoded aggregate share.
    pub aggregate_share: Vec<u8>,
    /// Reports in the batch.
    pub report_count: u64,
    /// Checksum of the batch.
    pub checksum: ReportIdChecksum,
    /// The smallest interval covering the non-empty buckets (the batch interval if empty).
    pub spanned: Interval,
}

/// A batch's total from the sum of its bucket aggregations, which the store adds up one bucket
/// at a time (`Datastore::sum_batch_aggregations`). The summed share is decoded once more, so
/// that a batch of one bucket has its stored share checked as a sum of many has.
pub fn total(
    vdaf: &Vdaf,
    batch_interval: &Interval,
    sum: BatchSum,
) -> Result<BatchTotal, CoreError> {
    let share = match sum.aggregate_share {
        Some(bytes) => vdaf.decode_aggregate(&bytes)?,
        None => vdaf.empty_aggregate()?,
    };
    Ok(BatchTotal {
        aggregate_share: vdaf.encode_aggregate(&share)?,
        report_count: sum.report_count,
        checksum: sum.checksum,
        spanned: sum.spanned.unwrap_or(*batch_interval),
    })
}

/// The merge function handed to the store.
pub fn merger(vdaf: &Vdaf) -> impl Fn(&[u8], &[u8]) -> Result<Vec<u8>, String> + Send + Sync + '_ {
    move |a, b| vdaf.merge_encoded(a, b).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_interval_rules() {
        let p = Duration(3600);
        // Ending past 2^63 - 1 s: no report is there, and no store keeps such a batch.
        let late = (i64::MAX as u64) / 3600 * 3600;
        assert!(is_valid_batch_interval(
            &Interval {
                start: Time(late - 3600),
                duration: Duration(3600)
            },
            p
        ));
        assert!(!is_valid_batch_interval(
            &Interval {
                start: Time(late),
                duration: Duration(3600)
            },
            p
        ));
        assert!(is_valid_batch_interval(
            &Interval {
                start: Time(7200),
                duration: Duration(3600)
            },
            p
        ));
        assert!(is_valid_batch_interval(
            &Interval {
                start: Time(0),
                duration: Duration(7200)
            },
            p
        ));
        assert!(!is_valid_batch_interval(
            &Interval {
                start: Time(7201),
                duration: Duration(3600)
            },
            p
        ));
        assert!(!is_valid_batch_interval(
            &Interval {
                start: Time(7200),
                duration: Duration(1800)
            },
            p
        ));
        assert!(!is_valid_batch_interval(
            &Interval {
                start: Time(7200),
                duration: Duration(5400)
            },
            p
        ));
        assert!(!is_valid_batch_interval(
            &Interval {
                start: Time(u64::MAX - 3599),
                duration: Duration(7200)
            },
            Duration(1)
        ));
    }

    #[test]
    fn the_span_of_times_holds_each_and_no_more() {
        assert_eq!(span_of([]), Interval::default());
        let span = span_of([Time(50), Time(7), Time(30)]);
        assert_eq!(
            span,
            Interval {
                start: Time(7),
                duration: Duration(44),
            }
        );
        assert!(span.contains(Time(50)) && !span.contains(Time(51)) && !span.contains(Time(6)));
        assert_eq!(span_of([Time(9)]).end(), Time(10));
    }

    #[test]
    fn buckets_and_membership() {
        let b = bucket_of(Time(7300), Duration(3600));
        assert_eq!(
            b,
            Interval {
                start: Time(7200),
                duration: Duration(3600)
            }
        );
        assert!(in_any(&[b], Time(7200)));
        assert!(in_any(&[b], Time(10799)));
        assert!(!in_any(&[b], Time(10800)));
    }
}
