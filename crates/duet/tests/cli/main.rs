//! The `duet` binary as a user runs it: helpers and the checks of bad input here, the rest by
//! command in the modules.

mod bench;
mod quickstart;
mod serve;
mod tasks;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn duet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.env_remove("RUST_LOG")
        .env_remove("DUET_DATABASE")
        .env_remove("DUET_LISTEN");
    c
}

fn run(args: &[&str]) -> Output {
    duet().args(args).output().expect("run duet")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

/// Standard output that cannot be written (a full disk here; a closed pipe alike) is a readable
/// error, not a panic.
#[cfg(target_os = "linux")]
#[test]
fn an_unwritable_standard_output_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("collector.json").display().to_string();
    assert!(run(&["keys", "generate", "--out", &key]).status.success());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = duet()
        .args([
            "task",
            "create",
            "--leader-url",
            "http://leader.test/",
            "--helper-url",
            "http://helper.test/",
            "--vdaf",
            "count",
            "--collector-key",
            &key,
        ])
        .stdout(Stdio::from(full))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not write to standard output"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_gets_one_readable_line_and_no_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = write(dir.path(), "bad.txt", "1\n12\n");
    let key = dir.path().join("collector.json").display().to_string();
    assert!(run(&["keys", "generate", "--out", &key]).status.success());
    let missing_db = dir.path().join("missing.sqlite").display().to_string();
    let key = key.as_str();
    let create = |leader: &'static str, helper: &'static str, extra: &[&'static str]| {
        let mut args = vec![
            "task",
            "create",
            "--leader-url",
            leader,
            "--helper-url",
            helper,
            "--vdaf",
            "count",
            "--collector-key",
            key,
        ];
        args.extend_from_slice(extra);
        args
    };
    for (args, expect) in [
        (
            create("http://a.test/", "http://a.test/", &[]),
            "--leader-url and --helper-url are the same",
        ),
        (
            create("http://u:p@a.test/", "http://b.test/", &[]),
            "--leader-url carries a user name or password",
        ),
        (
            create(
                "http://a.test/",
                "http://b.test/",
                &["--task-expiration", "5"],
            ),
            "--task-expiration 5 is in the past",
        ),
        (
            create(
                "http://a.test/",
                "http://b.test/",
                &["--report-expiry-age", "60"],
            ),
            "--report-expiry-age 60 is shorter than --time-precision 3600",
        ),
        (
            vec!["task", "list", "--db", &missing_db, "--role", "leader"],
            "there is no database at",
        ),
        (
            vec![
                "quickstart",
                "--vdaf",
                "histogram",
                "--length",
                "10",
                "--measurements",
                &f,
            ],
            "bad.txt:2",
        ),
        (
            vec!["quickstart", "--vdaf", "count", "--bits", "3"],
            "--bits does not apply",
        ),
        (vec!["quickstart", "--vdaf", "sum", "--bits", "0"], "bits"),
        (
            vec![
                "quickstart",
                "--vdaf",
                "count",
                "--measurements",
                "/nonexistent/m.txt",
            ],
            "could not read",
        ),
        (
            vec!["serve", "--config", "/nonexistent/duet.toml"],
            "could not read the config file",
        ),
        (
            vec![
                "quickstart",
                "--vdaf",
                "sumvec",
                "--bits",
                "16",
                "--length",
                "1152921504606846976",
            ],
            "too large",
        ),
        (
            vec![
                "quickstart",
                "--vdaf",
                "sumvec",
                "--bits",
                "64",
                "--length",
                "100000000000",
            ],
            "may be at most",
        ),
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
    }
}
