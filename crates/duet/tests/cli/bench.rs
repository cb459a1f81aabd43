//! `duet bench`.

use super::*;

/// Runs `duet bench --json` with `args` on SQLite through `command`, asserts that it succeeded and
/// returns its standard output.
fn bench_json(mut command: Command, args: &[&str]) -> String {
    let out = command
        .env_remove("DATABASE_URL")
        .args(["bench", "--json"])
        .args(args)
        .output()
        .expect("run duet bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `duet bench` with a verbose `RUST_LOG` and older reports (`--history`): the servers it starts
/// log before they serve (each warms its replay filter up first), and the bench still finds
/// their addresses. With `--server-logs` (a directory it creates) each server's whole log goes
/// to a file of its own.
#[test]
fn bench_runs_with_verbose_server_logs() {
    let dir = tempfile::tempdir().expect("tmp");
    let logs = dir.path().join("logs").join("run");
    let mut bench = duet();
    bench.env("RUST_LOG", "debug");
    let stdout = bench_json(
        bench,
        &[
            "--reports",
            "20",
            "--floor-reports",
            "5",
            "--vdaf",
            "count",
            "--history",
            "300",
            "--concurrency",
            "30",
            "--server-logs",
            logs.to_str().expect("utf-8 path"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["runs"][0]["reports"], 20);
    assert_eq!(v["runs"][0]["history"], 300);
    // No more connections than reports: each is opened for its first upload.
    assert_eq!(v["runs"][0]["concurrency"], 20);
    for role in ["helper", "leader-api", "leader"] {
        let path = logs.join(format!("sqlite-count-{role}.log"));
        let log =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            log.contains("duet serving on http://127.0.0.1:"),
            "{role}: {log}"
        );
        // Debug lines from before and after the server started serving.
        assert!(log.lines().count() > 2, "{role}: {log}");
        // Each server warmed its replay filter up before it served.
        let (built, serving) = (log.find("replay filter built"), log.find("duet serving on"));
        assert!(built.is_some() && built < serving, "{role}: {log}");
    }
}

/// `duet bench --json` on SQLite: one JSON object with every figure of every run. The bench
/// itself fails if the collected aggregate differs from the sum of the measurements.
#[test]
fn bench_prints_one_json_object_with_every_figure() {
    let stdout = bench_json(
        duet(),
        &[
            "--reports",
            "300",
            "--floor-reports",
            "20",
            "--vdaf",
            "count",
            "--vdaf",
            "histogram",
        ],
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for (run, vdaf) in runs.iter().zip(["Prio3Count", "Prio3Histogram(100)"]) {
        assert_eq!(run["backend"], "sqlite");
        assert_eq!(run["vdaf"], vdaf);
        assert_eq!(run["reports"], 300);
        assert_eq!(run["concurrency"], 256, "the default: {run}");
        // The database the figures were measured on, and how durable its commits were.
        assert_eq!(run["database"]["engine"], "sqlite", "{run}");
        assert_eq!(run["database"]["journal_mode"], "wal", "{run}");
        assert_eq!(run["database"]["synchronous"], "FULL", "{run}");
        for rate in [
            "floor_reports_per_s",
            "upload_reports_per_s",
            "upload_while_aggregating_reports_per_s",
            "end_to_end_reports_per_s",
            "collect_latency_s",
            "hpke_open_us",
        ] {
            let x = run[rate]
                .as_f64()
                .unwrap_or_else(|| panic!("{rate}: {run}"));
            assert!(x > 0.0 && x.is_finite(), "{rate}: {run}");
        }
        let ratio = run["end_to_end_reports_per_s"].as_f64().expect("e2e")
            / run["floor_reports_per_s"].as_f64().expect("floor");
        assert!((run["ratio"].as_f64().expect("ratio") - ratio).abs() < 1e-9);
        assert!(run["peak_rss_bytes"].as_u64().expect("rss") > 1_000_000);
        // CPU time is counted in 10 ms ticks: each process's may round to zero in so short a
        // run, their sum not.
        let cpu: Vec<f64> = [
            "leader_process_cpu_us_per_report",
            "helper_process_cpu_us_per_report",
            "client_cpu_us_per_report",
        ]
        .iter()
        .map(|k| run[k].as_f64().unwrap_or_else(|| panic!("{k}: {run}")))
        .collect();
        assert!(cpu.iter().all(|x| *x >= 0.0 && x.is_finite()), "{run}");
        assert!(cpu.iter().sum::<f64>() > 0.0, "{run}");
        // The same for the uploads alone, a phase too short here for a tick to be sure.
        for k in [
            "upload_leader_cpu_us_per_report",
            "upload_client_cpu_us_per_report",
        ] {
            let x = run[k].as_f64().unwrap_or_else(|| panic!("{k}: {run}"));
            assert!(x >= 0.0 && x.is_finite(), "{k}: {run}");
        }
    }
}

/// `duet bench --repeat 3`: each case runs three times, in rounds, and each case's medians come
/// after the runs: the middle run's figure for each, and none without `--repeat`.
#[test]
fn bench_repeats_give_each_case_its_medians() {
    let stdout = bench_json(
        duet(),
        &[
            "--reports",
            "100",
            "--floor-reports",
            "10",
            "--vdaf",
            "count",
            "--vdaf",
            "histogram",
            "--repeat",
            "3",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    let vdafs: Vec<&str> = runs
        .iter()
        .map(|r| r["vdaf"].as_str().expect("vdaf"))
        .collect();
    // In rounds: every case once, then again.
    assert_eq!(
        vdafs,
        ["Prio3Count", "Prio3Histogram(100)"].repeat(3),
        "{stdout}"
    );
    let medians = v["medians"].as_array().expect("medians");
    assert_eq!(medians.len(), 2, "{stdout}");
    for (m, vdaf) in medians.iter().zip(["Prio3Count", "Prio3Histogram(100)"]) {
        assert_eq!(
            (m["vdaf"].as_str(), m["runs"].as_u64()),
            (Some(vdaf), Some(3))
        );
        for figure in [
            "end_to_end_reports_per_s",
            "upload_reports_per_s",
            "ratio",
            "collect_latency_s",
        ] {
            let mut of_runs: Vec<f64> = runs
                .iter()
                .filter(|r| r["vdaf"] == vdaf)
                .map(|r| r[figure].as_f64().expect("figure"))
                .collect();
            of_runs.sort_by(f64::total_cmp);
            assert_eq!(m[figure].as_f64(), Some(of_runs[1]), "{figure}: {stdout}");
        }
    }
    let once = bench_json(duet(), &["--reports", "50", "--floor-reports", "10"]);
    let v: serde_json::Value = serde_json::from_str(&once).expect("json");
    assert!(v.get("medians").is_none(), "{once}");
    let refused = run(&["bench", "--repeat", "0"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--repeat must be at least 1"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
