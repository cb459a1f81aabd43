//! `duet quickstart`: the whole pipeline in one command.

use super::*;

fn quickstart_json(args: &[&str]) -> serde_json::Value {
    let out = run(&[&["quickstart", "--json"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed: {stderr}\n{stdout}"
    );
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    serde_json::from_str(&stdout).expect("json")
}

#[test]
fn quickstart_histogram_from_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "m.txt", "0\n9\n9\n# a comment\n\n3\n9\n0\n");
    let v = quickstart_json(&[
        "--vdaf",
        "histogram",
        "--length",
        "10",
        "--measurements",
        &f,
    ]);
    assert_eq!(v["vdaf"], "histogram");
    assert_eq!(v["report_count"], 6);
    assert_eq!(
        v["result"],
        serde_json::json!([2, 0, 0, 1, 0, 0, 0, 0, 0, 3])
    );
    assert_eq!(v["plaintext"], v["result"]);
}

#[test]
fn quickstart_count_sum_sumvec_from_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "c.txt", "1\n0\n1\n1\n");
    let v = quickstart_json(&["--vdaf", "count", "--measurements", &f]);
    assert_eq!(
        (v["report_count"].clone(), v["result"].clone()),
        (4.into(), 3.into())
    );

    let f = write(dir.path(), "s.txt", "250\n5\n0\n");
    let v = quickstart_json(&["--vdaf", "sum", "--bits", "8", "--measurements", &f]);
    assert_eq!(v["result"], 255);

    let f = write(dir.path(), "v.txt", "1,2,3\n4,5,6\n");
    let v = quickstart_json(&[
        "--vdaf",
        "sumvec",
        "--bits",
        "4",
        "--length",
        "3",
        "--measurements",
        &f,
    ]);
    assert_eq!(v["result"], serde_json::json!([5, 7, 9]));
    assert_eq!(v["plaintext"], v["result"]);
}

#[test]
fn quickstart_generated_with_a_kept_database() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("q.sqlite").display().to_string();
    let v = quickstart_json(&[
        "--vdaf",
        "sum",
        "--bits",
        "16",
        "--reports",
        "300",
        "--db",
        &db,
    ]);
    assert_eq!(v["report_count"], 300);
    assert_eq!(v["result"], v["plaintext"]);
    assert!(Path::new(&db).exists());
}
