//! `duet bench --repeat`: each case's median figures over its runs.

use super::Run;

/// The medians of one case's (backend and VDAF's) runs.
#[derive(Debug, PartialEq, serde::Serialize)]
pub(super) struct Medians {
    pub(super) backend: String,
    pub(super) vdaf: &'static str,
    /// How many runs the medians are of.
    pub(super) runs: usize,
    pub(super) floor_reports_per_s: f64,
    pub(super) upload_reports_per_s: f64,
    pub(super) upload_leader_cpu_us_per_report: f64,
    pub(super) end_to_end_reports_per_s: f64,
    pub(super) ratio: f64,
    /// The median of each run's `upload_reports_per_s / end_to_end_reports_per_s`.
    pub(super) upload_over_end_to_end: f64,
    pub(super) collect_latency_s: f64,
    pub(super) peak_rss_bytes: u64,
}

/// The medians of each case in `runs`, in the order the cases first appear.
pub(super) fn medians(runs: &[Run]) -> Vec<Medians> {
    let mut cases: Vec<(&str, &'static str)> = Vec::new();
    for r in runs {
        if !cases.contains(&(r.backend.as_str(), r.vdaf)) {
            cases.push((r.backend.as_str(), r.vdaf));
        }
    }
    cases
        .into_iter()
        .map(|(backend, vdaf)| {
            let case: Vec<&Run> = runs
                .iter()
                .filter(|r| r.backend == backend && r.vdaf == vdaf)
                .collect();
            let of = |figure: fn(&Run) -> f64| median(case.iter().map(|r| figure(r)).collect());
            Medians {
                backend: backend.to_owned(),
                vdaf,
                runs: case.len(),
                floor_reports_per_s: of(|r| r.floor_reports_per_s),
                upload_reports_per_s: of(|r| r.upload_reports_per_s),
                upload_leader_cpu_us_per_report: of(|r| r.upload_leader_cpu_us_per_report),
                end_to_end_reports_per_s: of(|r| r.end_to_end_reports_per_s),
                ratio: of(|r| r.ratio),
                upload_over_end_to_end: of(|r| r.upload_reports_per_s / r.end_to_end_reports_per_s),
                collect_latency_s: of(|r| r.collect_latency_s),
                // Bytes: far below 2^53, so exact as a float.
                peak_rss_bytes: of(|r| r.peak_rss_bytes as f64).round() as u64,
            }
        })
        .collect()
}

/// The middle value, or the mean of the middle two (0 for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::{median, medians};
    use crate::bench::Run;

    fn run(backend: &str, vdaf: &'static str, e2e: f64, upload: f64) -> Run {
        Run {
            backend: backend.to_owned(),
            vdaf,
            reports: 10,
            history: 0,
            concurrency: 10,
            hpke_open_us: 20.0,
            leader_cpu_us_per_report: 20.0,
            helper_cpu_us_per_report: 20.0,
            floor_reports_per_s: 50_000.0,
            upload_reports_per_s: upload,
            upload_leader_cpu_us_per_report: upload / 10_000.0,
            upload_client_cpu_us_per_report: 5.0,
            upload_while_aggregating_reports_per_s: 1.0,
            end_to_end_reports_per_s: e2e,
            ratio: e2e / 50_000.0,
            collect_latency_s: e2e / 100_000.0,
            peak_rss_bytes: e2e as u64,
            leader_process_cpu_us_per_report: 40.0,
            helper_process_cpu_us_per_report: 30.0,
            client_cpu_us_per_report: 7.0,
            database: Vec::new(),
        }
    }

    #[test]
    fn a_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
        assert_eq!(median(Vec::new()), 0.0);
    }

    /// Each case gets its own medians, in the order the cases came, whatever order the rounds
    /// interleave them in; the upload ratio is the median of each run's, not a ratio of medians.
    #[test]
    fn each_case_gets_the_medians_of_its_own_runs() {
        let runs = [
            run("sqlite", "Prio3Count", 20_000.0, 80_000.0),
            run("sqlite", "Prio3Histogram(100)", 15_000.0, 45_000.0),
            run("sqlite", "Prio3Count", 24_000.0, 60_000.0),
            run("sqlite", "Prio3Histogram(100)", 16_000.0, 50_000.0),
            run("sqlite", "Prio3Count", 22_000.0, 77_000.0),
        ];
        let m = medians(&runs);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].vdaf, m[0].runs), ("Prio3Count", 3));
        assert_eq!(m[0].end_to_end_reports_per_s, 22_000.0);
        assert_eq!(m[0].upload_reports_per_s, 77_000.0);
        assert_eq!(m[0].upload_leader_cpu_us_per_report, 7.7);
        // 4.0, 2.5 and 3.5 per run.
        assert_eq!(m[0].upload_over_end_to_end, 3.5);
        assert_eq!(m[0].ratio, 0.44);
        assert_eq!(m[0].peak_rss_bytes, 22_000);
        assert_eq!((m[1].vdaf, m[1].runs), ("Prio3Histogram(100)", 2));
        assert_eq!(m[1].end_to_end_reports_per_s, 15_500.0);
        assert_eq!(m[1].collect_latency_s, 0.155);
    }
}
