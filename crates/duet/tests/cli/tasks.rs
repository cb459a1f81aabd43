//! `duet task` and `duet keys`: task files, their checks, imports and secrets.

use super::*;

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
