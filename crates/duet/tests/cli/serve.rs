//! `duet serve` with tasks imported, reports uploaded and batches collected by the other commands.

use super::*;

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

/// A port another process holds, and an address that is not `HOST:PORT`, are refused with the
/// reason and the fix, before the database is opened.
#[test]
fn serve_says_why_it_cannot_listen() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("agg.sqlite");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("address").port();
    for (listen, fix) in [
        (format!("127.0.0.1:{port}"), "another process has the port"),
        ("nonsense".to_string(), "`listen` takes HOST:PORT"),
    ] {
        let config = write(
            dir.path(),
            "duet.toml",
            &format!(
                "listen = \"{listen}\"\ndatabase = \"{}\"\n[leader]\n",
                db.display()
            ),
        );
        // Killed after a while rather than left serving, should it listen after all.
        let mut server = Child(
            duet()
                .args(["serve", "--config", &config])
                .stderr(Stdio::piped())
                .spawn()
                .expect("serve"),
        );
        // Up to 30 s, in steps of 20 ms.
        let mut steps = 0;
        let status = loop {
            if let Some(status) = server.0.try_wait().expect("wait") {
                break status;
            }
            steps += 1;
            assert!(
                steps < 1_500,
                "duet serve still runs with listen = {listen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut server.0.stderr.take().expect("stderr"), &mut stderr)
            .expect("read");
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("could not listen on {listen}")) && stderr.contains(fix),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!db.exists(), "the database was opened: {stderr}");
    }
    drop(held);
}

/// `duet serve` listens with a queue that holds a burst of new connections: with
/// `max_connections = 1` and one connection open, it accepts no more, and each of 300 clients'
/// connects still completes at once in the kernel's queue, none waiting a second for its SYN to
/// be resent (as past a queue of 128, the standard library's).
#[cfg(target_os = "linux")]
#[test]
fn serve_queues_a_burst_of_connections() {
    const BURST: usize = 300;
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    if somaxconn.is_none_or(|n| n < BURST) {
        eprintln!("skipped: net.core.somaxconn is {somaxconn:?}, not at least {BURST}");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("agg.sqlite").display().to_string();
    let config = write(
        dir.path(),
        "duet.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{db}\"\n[leader]\n[aggregator]\nmax_connections = 1\n"
        ),
    );
    let mut server = Child(
        duet()
            .args(["serve", "--config", &config])
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve"),
    );
    // Kept open until the end, so that the server's later log lines have somewhere to go.
    let mut stderr = BufReader::new(server.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("read");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("duet serving on http://")
        .unwrap_or_else(|| panic!("address line: {line}"))
        .parse()
        .expect("address");
    // The one connection served: the server accepts the next only once it closes.
    let held = std::net::TcpStream::connect(addr).expect("connect");
    let connects: Vec<_> = (0..BURST)
        .map(|_| {
            std::thread::spawn(move || {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(700))
            })
        })
        .collect();
    let failed: Vec<String> = connects
        .into_iter()
        .filter_map(|c| c.join().expect("connect thread").err())
        .map(|e| e.to_string())
        .collect();
    let mut reasons = failed.clone();
    reasons.dedup();
    assert!(
        failed.is_empty(),
        "{} of {BURST} connects waited past 700 ms or failed: {reasons:?}",
        failed.len()
    );
    drop((held, stderr));
}
