//! The `duet` binary as a user runs it.

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

/// Runs `duet task create` for a Prio3Count task of aggregators that are not running, with the
/// collector key file `key`, writing `task`, with `extra` arguments.
fn create_offline_task(key: &str, task: &str, extra: &[&str]) -> Output {
    let args = [
        "task",
        "create",
        "--leader-url",
        "http://127.0.0.1:9/leader/",
        "--helper-url",
        "http://127.0.0.1:9/helper/",
        "--vdaf",
        "count",
        "--collector-key",
        key,
        "--out",
        task,
    ];
    run(&[&args[..], extra].concat())
}

/// `duet task create --report-expiry-age` puts the age into the task file.
#[test]
fn a_task_can_be_created_with_a_report_expiry_age() {
    let dir = tempfile::tempdir().expect("tmp");
    let (key, task) = (dir.path().join("k.json"), dir.path().join("t.json"));
    let (key, task) = (key.display().to_string(), task.display().to_string());
    assert!(run(&["keys", "generate", "--out", &key]).status.success());
    let out = create_offline_task(&key, &task, &["--report-expiry-age", "86400"]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&task).expect("task file");
    assert!(text.contains("\"report_expiry_age\": 86400"), "{text}");
}

/// `duet task import --sqlite-page-size` creates the database with that page size; a size SQLite
/// does not take is refused in one line, before anything is created.
#[test]
fn a_task_import_creates_the_database_with_its_page_size() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (key, task, db, bad) = (
        path("k.json"),
        path("t.json"),
        path("d.sqlite"),
        path("b.sqlite"),
    );
    assert!(run(&["keys", "generate", "--out", &key]).status.success());
    assert!(create_offline_task(&key, &task, &[]).status.success());
    let import = |db: &str, size: &str| {
        run(&[
            "task",
            "import",
            &task,
            "--db",
            db,
            "--role",
            "helper",
            "--sqlite-page-size",
            size,
        ])
    };
    let out = import(&db, "8192");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The page size is bytes 16–17 of the file's header, big-endian.
    let header = std::fs::read(&db).expect("read the database");
    assert_eq!(u16::from_be_bytes([header[16], header[17]]), 8192);
    let out = import(&bad, "1000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("power of two"), "{stderr}");
    assert!(!std::path::Path::new(&bad).exists());
}

/// `duet upload` and `duet collect` check the task file as the aggregators do before they use
/// it: a task whose time precision is 0 (reports would carry unrounded times) is refused with
/// one line naming the file and the field; `duet collect` refuses a key that is not the task's
/// collector key.
#[test]
fn task_files_are_checked_before_use() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("collector.json").display().to_string();
    let task = dir.path().join("task.json").display().to_string();
    for out in [
        run(&["keys", "generate", "--out", &key]),
        create_offline_task(&key, &task, &[]),
    ] {
        assert!(out.status.success(), "{:?}", out);
    }
    // Another collector's key could not decrypt the result: refused before any request.
    let other_key = dir.path().join("other.json").display().to_string();
    assert!(run(&["keys", "generate", "--out", &other_key])
        .status
        .success());
    let out = run(&[
        "collect",
        "--task",
        &task,
        "--key",
        &other_key,
        "--start",
        "0",
        "--duration",
        "3600",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not the collector key of the task"),
        "{stderr}"
    );
    let mut params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&task).expect("read")).expect("json");
    params["time_precision"] = 0.into();
    std::fs::write(&task, params.to_string()).expect("write");
    let measurements = write(dir.path(), "m.txt", "1\n");
    for args in [
        vec!["upload", "--task", &task, "--measurements", &measurements],
        vec![
            "collect",
            "--task",
            &task,
            "--key",
            &key,
            "--start",
            "0",
            "--duration",
            "3600",
        ],
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains("is not a valid task") && stderr.contains("time_precision"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

/// Files of secrets (a collector's private key, a task's tokens) are readable by their owner
/// only, and an existing one is kept unless `--force` says to replace it.
#[test]
fn secret_files_are_private_and_kept() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("collector.json").display().to_string();
    let task = dir.path().join("task.json").display().to_string();
    let force = |force: bool| if force { vec!["--force"] } else { vec![] };
    let create_task = |f: bool| create_offline_task(&key, &task, &force(f));
    let generate = |f: bool| run(&[&["keys", "generate", "--out", &key][..], &force(f)].concat());
    assert!(generate(false).status.success());
    assert!(create_task(false).status.success());
    type Writer<'a> = &'a dyn Fn(bool) -> Output;
    let writers: [(&str, &String, Writer); 2] =
        [("key", &key, &generate), ("task", &task, &create_task)];
    for (what, path, write_it) in writers {
        let before = std::fs::read_to_string(path).expect("read");
        let again = write_it(false);
        assert_eq!(
            std::fs::read_to_string(path).expect("read"),
            before,
            "{what}"
        );
        let forced = write_it(true);
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(
            !again.status.success(),
            "{what} file replaced without --force"
        );
        assert!(stderr.contains("pass --force"), "{what}: {stderr}");
        assert!(forced.status.success(), "{what}: {:?}", forced);
        assert_ne!(
            std::fs::read_to_string(path).expect("read"),
            before,
            "{what}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{what} file mode");
        }
    }
}

/// Kills the server when the test ends, however it ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_task_upload_collect() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("agg.sqlite").display().to_string();
    let config = write(
        dir.path(),
        "duet.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndatabase = \"{db}\"\n[leader]\npath_prefix = \"/leader\"\n[helper]\npath_prefix = \"/helper\"\n[aggregator]\npolling_interval_ms = 200\n"
        ),
    );
    // Started with a soft limit on open files below its connections' (`exec` keeps the PID).
    let mut server = Child(
        Command::new("sh")
            .args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\""])
            .args([env!("CARGO_BIN_EXE_duet"), "serve", "--config", &config])
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve"),
    );
    let stderr = server.0.stderr.take().expect("stderr");
    let mut stderr = BufReader::new(stderr);
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read");
    // It raised the limit to what 4,096 connections need, or to the hard limit.
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", server.0.id())).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("open files")
        .split_whitespace()
        .collect();
    let hard = open_files[1].parse().unwrap_or(u64::MAX);
    assert_eq!(open_files[0].parse(), Ok(hard.min(4096 + 1024)), "{limits}");
    let base = line
        .trim()
        .strip_prefix("duet serving on ")
        .expect("address line")
        .to_string();
    // `/healthz` (and `/metrics`) on the admin listener, not on the DAP one.
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read");
    let admin = line
        .trim()
        .strip_prefix("duet serving /metrics and /healthz on http://")
        .expect("admin address line")
        .to_string();
    let get = |addr: &str, path: &str| {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut conn, &mut answer).expect("read");
        answer
    };
    assert!(get(&admin, "/healthz").starts_with("HTTP/1.1 200"));
    let dap = base.strip_prefix("http://").expect("http");
    assert!(get(dap, "/healthz").starts_with("HTTP/1.1 404"));

    let key = dir.path().join("collector.json").display().to_string();
    assert!(run(&["keys", "generate", "--out", &key]).status.success());
    let task = dir.path().join("task.json").display().to_string();
    let out = run(&[
        "task",
        "create",
        "--leader-url",
        &format!("{base}/leader/"),
        "--helper-url",
        &format!("{base}/helper/"),
        "--vdaf",
        "histogram",
        "--length",
        "4",
        "--collector-key",
        &key,
        "--min-batch-size",
        "5",
        "--out",
        &task,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A fixed-size copy of the task is refused: Duet's aggregators serve time intervals.
    let mut fixed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&task).expect("read")).expect("json");
    fixed["query_type"] = serde_json::json!({"type": "fixed_size", "max_batch_size": 10});
    let fixed = write(dir.path(), "fixed.json", &fixed.to_string());
    let out = run(&["task", "import", &fixed, "--db", &db, "--role", "leader"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("fixed_size"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    for role in ["leader", "helper"] {
        let out = run(&["task", "import", &task, "--db", &db, "--role", role]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = run(&["task", "list", "--db", &db, "--role", "helper"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("Prio3Histogram"));

    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&task).expect("read")).expect("json");
    let precision = params["time_precision"].as_u64().expect("precision");
    let now = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .expect("clock")
        .as_secs();
    let start = (now / precision * precision)
        .saturating_sub(precision)
        .to_string();
    let duration = (3 * precision).to_string();
    let collect = |start: &str, extra: &[&str]| {
        let mut args = vec![
            "collect",
            "--task",
            &task,
            "--key",
            &key,
            "--start",
            start,
            "--duration",
            &duration,
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let collected = |out: Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    // A collection that times out before its batch has its reports names its job, which a
    // later `duet collect --job` picks up again.
    let out = collect(&start, &["--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not ready: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let job = stderr
        .split_once("plus `--job ")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(job, _)| job.to_string())
        .unwrap_or_else(|| panic!("no job named: {stderr}"));
    let job = job.as_str();
    // Given the job, the same command polls it again.
    let out = collect(&start, &["--job", job, "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not ready: {stderr}");
    assert!(
        stderr.contains("poll it again with the same command"),
        "{stderr}"
    );
    // A base64url ID may start with `-`, and is still the flag's value.
    let dashed = "-ZVldC1jb2xsZWN0LWpvYg";
    let out = collect(&start, &["--job", dashed, "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "not ready: {stderr}");
    let out = collect(&start, &["--job", "not base64!"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--job") && stderr.contains("base64url"),
        "{stderr}"
    );

    // Clients get the task's public part only.
    let client = dir.path().join("client.json").display().to_string();
    let out = run(&["task", "client-file", &task, "--out", &client]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&client).expect("read")).expect("json");
    let fields: Vec<&str> = public
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "helper_endpoint",
            "leader_endpoint",
            "task_id",
            "time_precision",
            "vdaf"
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&client)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    let mut up = duet()
        .args(["upload", "--task", &client])
        .stdin(Stdio::piped())
        .spawn()
        .expect("upload");
    up.stdin
        .take()
        .expect("stdin")
        .write_all(b"0\n3\n3\n1\n3\n2\n")
        .expect("write");
    assert!(up.wait().expect("wait").success());

    let json = ["--json", "--timeout", "60"];
    let v = collected(collect(
        &start,
        &["--job", job, "--json", "--timeout", "60"],
    ));
    assert_eq!(v["report_count"], 6);
    assert_eq!(v["result"], serde_json::json!([1, 1, 1, 3]));

    // Collecting the same batch again is the same query: the same result.
    let w = collected(collect(&start, &json));
    assert_eq!(
        (&w["report_count"], &w["result"]),
        (&v["report_count"], &v["result"])
    );
    // A batch that overlaps the collected one: a readable refusal.
    let later = (start.parse::<u64>().expect("start") + precision).to_string();
    let out = collect(&later, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("batchOverlap"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

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
            "--server-logs",
            logs.to_str().expect("utf-8 path"),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(v["runs"][0]["reports"], 20);
    assert_eq!(v["runs"][0]["history"], 300);
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
    }
}
