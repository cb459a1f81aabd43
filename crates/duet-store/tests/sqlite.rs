//! The conformance suite on a fresh SQLite file, and concurrent writers on one file.

use duet_core::AggregatorRole;
use duet_messages::dap09::{AggregationJobId, ReportId, TaskId, Time};
use duet_store::sqlite::SqliteDatastore;
use duet_store::{conformance, Datastore, NewReport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("duet.sqlite");
    let leader = SqliteDatastore::connect(path.to_str().expect("UTF-8 path"))
        .await
        .expect("connect");
    let helper = leader.with_role(AggregatorRole::Helper);
    assert_eq!(helper.role(), AggregatorRole::Helper);
    conformance::run_all(&leader, &helper).await;
    leader.close().await;
}

#[tokio::test]
async fn conformance_suite_in_memory() {
    let leader = SqliteDatastore::connect("sqlite::memory:")
        .await
        .expect("connect");
    let helper = leader.with_role(AggregatorRole::Helper);
    conformance::run_all(&leader, &helper).await;
}

#[tokio::test]
async fn connect_accepts_urls_and_reopens_migrated_files() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("url.sqlite");
    let url = format!("sqlite://{}", path.display());
    let first = SqliteDatastore::connect(&url)
        .await
        .expect("connect by URL");
    let task_id = TaskId::random();
    let report = NewReport {
        task_id,
        report_id: ReportId::random(),
        time: Time(1000),
        encoded: vec![1, 2],
    };
    assert_eq!(
        first
            .put_reports(std::slice::from_ref(&report))
            .await
            .expect("put_reports"),
        vec![true]
    );
    // The file holds keys and secrets: its owner's only, and so are SQLite's files beside it.
    #[cfg(unix)]
    for file in [path.clone(), dir.path().join("url.sqlite-wal")] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    }
    first.close().await;
    // Reopening runs the (already applied) migrations again and sees the data: the report
    // uploaded again is a replay, and the job holds it once.
    let second = SqliteDatastore::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("reconnect");
    second.put_reports(&[report]).await.expect("put_reports");
    assert_eq!(claim(&second, 1000).await, 1);
    let jobs = acquire(&second, 1000).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].reports.len(), 1);
    second.health_check().await.expect("health_check");
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connections_to_one_file() {
    const WRITERS: usize = 4;
    const BATCHES: usize = 10;
    const BATCH_SIZE: usize = 50;
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir
        .path()
        .join("shared.sqlite")
        .to_str()
        .expect("UTF-8 path")
        .to_string();
    // Two pools migrate the same new file at the same time.
    let (a, b) = tokio::join!(
        SqliteDatastore::connect(&path),
        SqliteDatastore::connect(&path)
    );
    let stores = [a.expect("connect a"), b.expect("connect b")];
    let task_id = TaskId::random();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = stores[w % 2].clone();
        writers.push(tokio::spawn(async move {
            let mut all = Vec::new();
            for batch in 0..BATCHES {
                let reports: Vec<NewReport> = (0..BATCH_SIZE)
                    .map(|i| NewReport {
                        task_id,
                        report_id: ReportId::random(),
                        time: Time((w * 1000 + batch * 10 + i) as u64),
                        encoded: vec![w as u8; 16],
                    })
                    .collect();
                let new = store.put_reports(&reports).await.expect("put_reports");
                assert!(new.iter().all(|n| *n));
                all.extend(reports);
            }
            all
        }));
    }
    let mut written = Vec::new();
    for writer in writers {
        written.extend(writer.await.expect("writer task"));
    }
    assert_eq!(written.len(), WRITERS * BATCHES * BATCH_SIZE);
    // Every row is there, seen through either connection.
    let everything = duet_messages::dap09::Interval {
        start: Time(0),
        duration: duet_messages::dap09::Duration(1_000_000),
    };
    for store in &stores {
        let count = store
            .count_unaggregated_reports(&task_id, &everything)
            .await
            .expect("count");
        assert_eq!(count, written.len() as u64);
    }
    // Replays through either connection, found when jobs claim the reports.
    for store in &stores {
        store.put_reports(&written).await.expect("put_reports");
    }
    // Concurrent job creation and acquisition through both pools hand out each report once.
    let (ca, cb) = tokio::join!(
        stores[0].create_aggregation_jobs(64, Time(10)),
        stores[1].create_aggregation_jobs(64, Time(10))
    );
    let created = ca.expect("create") + cb.expect("create");
    assert_eq!(created, written.len().div_ceil(64));
    let (ja, jb) = tokio::join!(
        stores[0].acquire_aggregation_jobs(Time(10), 60, 1000),
        stores[1].acquire_aggregation_jobs(Time(10), 60, 1000)
    );
    let jobs: Vec<_> = ja
        .expect("acquire")
        .into_iter()
        .chain(jb.expect("acquire"))
        .collect();
    assert_eq!(jobs.len(), created);
    let mut ids: Vec<ReportId> = jobs
        .iter()
        .flat_map(|j| j.reports.iter().map(|r| r.report_id))
        .collect();
    assert_eq!(ids.len(), written.len());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), written.len());
    for store in &stores {
        store.close().await;
    }
}

/// A new database at `path` migrated to schema `version` only (with the migrations copied into
/// `dir`), and a pool on it.
async fn database_at_version(
    dir: &std::path::Path,
    path: &std::path::Path,
    version: usize,
) -> sqlx::SqlitePool {
    let old = dir.join(format!("v{version}-migrations"));
    std::fs::create_dir(&old).expect("mkdir");
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&all).expect("migrations") {
        let name = entry.expect("entry").file_name();
        let number: usize = name.to_str().expect("UTF-8 name")[..4]
            .parse()
            .expect("numbered");
        if number <= version {
            std::fs::copy(all.join(&name), old.join(&name)).expect("copy migration");
        }
    }
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .expect("open");
    let migrator = sqlx::migrate::Migrator::new(old.as_path())
        .await
        .expect("load the migrations");
    assert_eq!(migrator.iter().count(), version);
    migrator.run(&pool).await.expect("migrate");
    pool
}

/// A database made by schema version 1 (replay protection by a unique index on `reports`, rows
/// of finished jobs kept with a NULL payload) keeps its pending reports and its replay protection
/// through the upgrade.
#[tokio::test]
async fn upgrade_from_schema_1_keeps_reports_and_replay_protection() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("v1.sqlite");
    let task_id = TaskId::random();
    let report = |payload: Option<Vec<u8>>| NewReport {
        task_id,
        report_id: ReportId::random(),
        time: Time(1000),
        encoded: payload.unwrap_or_default(),
    };
    // A finished report (payload NULL), one in an active job, one not yet claimed.
    let (finished, in_job, pending) = (report(None), report(Some(vec![6])), report(Some(vec![7])));
    let in_job_id = AggregationJobId::random();
    {
        let pool = database_at_version(dir.path(), &path, 1).await;
        for (seq, r, payload) in [
            (1, &finished, None),
            (2, &in_job, Some(&in_job.encoded)),
            (3, &pending, Some(&pending.encoded)),
        ] {
            sqlx::query(
                "INSERT INTO reports (seq, task_id, report_id, client_time, payload) \
                 VALUES (?, ?, ?, 1000, ?)",
            )
            .bind(seq)
            .bind(&r.task_id.0[..])
            .bind(&r.report_id.0[..])
            .bind(payload)
            .execute(&pool)
            .await
            .expect("insert");
        }
        sqlx::query(
            "INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, first_seq, \
             last_seq, created_at, retry_at) VALUES (?, ?, 'active', 1, 2, 2, 1000, 1000)",
        )
        .bind(&task_id.0[..])
        .bind(&in_job_id.0[..])
        .execute(&pool)
        .await
        .expect("job");
        sqlx::query("UPDATE report_cursor SET claimed_seq = 2")
            .execute(&pool)
            .await
            .expect("cursor");
        pool.close().await;
    }
    let store = SqliteDatastore::connect(path.to_str().expect("UTF-8 path"))
        .await
        .expect("upgrade");
    // Each stored ID uploaded again with other contents, and a new report.
    let replays: Vec<NewReport> = [&finished, &in_job, &pending]
        .into_iter()
        .map(|r| NewReport {
            encoded: vec![99],
            ..r.clone()
        })
        .collect();
    let fresh = report(Some(vec![9]));
    store.put_reports(&replays).await.expect("put_reports");
    store
        .put_reports(std::slice::from_ref(&fresh))
        .await
        .expect("put_reports");
    assert_eq!(claim(&store, 2000).await, 1);
    let mut jobs = acquire(&store, 2000).await;
    jobs.sort_by_key(|j| j.job_id != in_job_id);
    let got: Vec<Vec<(ReportId, Vec<u8>)>> = jobs
        .iter()
        .map(|j| {
            j.reports
                .iter()
                .map(|r| (r.report_id, r.encoded.clone()))
                .collect()
        })
        .collect();
    assert_eq!(
        got,
        vec![
            vec![(in_job.report_id, in_job.encoded)],
            vec![
                (pending.report_id, pending.encoded),
                (fresh.report_id, fresh.encoded)
            ]
        ]
    );
    store.close().await;
}

/// Creates the jobs of the reports `store` holds at `now`, of up to 10 reports; returns how many.
async fn claim(store: &SqliteDatastore, now: u64) -> usize {
    store
        .create_aggregation_jobs(10, Time(now))
        .await
        .expect("create_aggregation_jobs")
}

/// Leases up to 10 of `store`'s jobs at `now`, with their reports.
async fn acquire(store: &SqliteDatastore, now: u64) -> Vec<duet_store::AcquiredAggregationJob> {
    store
        .acquire_aggregation_jobs(Time(now), 60, 10)
        .await
        .expect("acquire_aggregation_jobs")
}

/// The `seq`s of the rows of `reports` in the file at `path`, read on a connection of their own.
async fn seqs_in(path: &std::path::Path) -> Vec<i64> {
    let pool =
        sqlx::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
            .await
            .expect("open");
    let seqs = sqlx::query_scalar("SELECT seq FROM reports ORDER BY seq")
        .fetch_all(&pool)
        .await
        .expect("seqs");
    pool.close().await;
    seqs
}

/// A report of `task_id` uploaded at time 1000.
fn new_report(task_id: TaskId) -> NewReport {
    NewReport {
        task_id,
        report_id: ReportId::random(),
        time: Time(1000),
        encoded: vec![5],
    }
}

/// `seq` never goes back: not once every report went to a job that ended (the queue drained),
/// nor once a deleted task took the highest ones with it. A report numbered at or below the
/// claim cursor would never join a job.
#[tokio::test]
async fn seq_keeps_rising_after_reports_are_deleted() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("seq.sqlite");
    let store = SqliteDatastore::connect(path.to_str().expect("UTF-8 path"))
        .await
        .expect("connect");
    let (task, other) = (TaskId::random(), TaskId::random());
    let first: Vec<NewReport> = (0..3).map(|_| new_report(task)).collect();
    store.put_reports(&first).await.expect("put_reports");
    assert_eq!(claim(&store, 2000).await, 1);
    let jobs = acquire(&store, 2000).await;
    store
        .abandon_aggregation_job(&jobs[0])
        .await
        .expect("abandon");
    assert_eq!(seqs_in(&path).await, Vec::<i64>::new());

    // The queue drained: the next report still joins a job.
    store
        .put_reports(&[new_report(task)])
        .await
        .expect("put_reports");
    assert_eq!(seqs_in(&path).await, vec![4]);
    assert_eq!(claim(&store, 2000).await, 1);

    // Two reports not yet claimed go with their task.
    store
        .put_reports(&[new_report(task), new_report(task)])
        .await
        .expect("put_reports");
    assert!(store.delete_task(&task).await.is_ok());
    assert_eq!(seqs_in(&path).await, Vec::<i64>::new());
    store
        .put_reports(&[new_report(other), new_report(other)])
        .await
        .expect("put_reports");
    assert_eq!(seqs_in(&path).await, vec![7, 8]);
    assert_eq!(claim(&store, 2000).await, 1);
    store.close().await;
}

/// A database made by schema version 8, whose `reports` were keyed by AUTOINCREMENT, keeps its
/// pending reports through the upgrade, and numbers new ones above every `seq` it issued.
#[tokio::test]
async fn upgrade_from_schema_8_keeps_seq_rising() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("v8.sqlite");
    let task_id = TaskId::random();
    let pending = new_report(task_id);
    {
        let pool = database_at_version(dir.path(), &path, 8).await;
        // A pending report at 5; the one at 7 was deleted with its task.
        for seq in [5, 7] {
            sqlx::query(
                "INSERT INTO reports (seq, task_id, report_id, client_time, payload) \
                 VALUES (?, ?, ?, 1000, ?)",
            )
            .bind(seq)
            .bind(&task_id.0[..])
            .bind(&ReportId::random().0[..])
            .bind(&pending.encoded[..])
            .execute(&pool)
            .await
            .expect("insert");
        }
        // The report at 5 is in an active job.
        for sql in [
            "DELETE FROM reports WHERE seq = 7",
            "UPDATE report_cursor SET claimed_seq = 5",
        ] {
            sqlx::query(sql).execute(&pool).await.expect(sql);
        }
        sqlx::query(
            "INSERT INTO aggregation_jobs (task_id, job_id, state, report_count, first_seq, \
             last_seq, created_at, retry_at) VALUES (?, ?, 'active', 1, 5, 5, 1000, 1000)",
        )
        .bind(&task_id.0[..])
        .bind(&AggregationJobId::random().0[..])
        .execute(&pool)
        .await
        .expect("job");
        pool.close().await;
    }
    let store = SqliteDatastore::connect(path.to_str().expect("UTF-8 path"))
        .await
        .expect("upgrade");
    let unaggregated = || conformance::unaggregated(&store, task_id, 1000, 1);
    // The job from before the upgrade knows no times of its reports: it meets every interval.
    assert_eq!(unaggregated().await, 1);
    let fresh = NewReport {
        encoded: vec![8],
        ..new_report(task_id)
    };
    store
        .put_reports(std::slice::from_ref(&fresh))
        .await
        .expect("put_reports");
    assert_eq!(seqs_in(&path).await, vec![5, 8]);
    assert_eq!(unaggregated().await, 2);
    assert_eq!(claim(&store, 2000).await, 1);
    assert_eq!(unaggregated().await, 2);
    let mut jobs = acquire(&store, 2000).await;
    jobs.sort_by_key(|j| j.reports[0].encoded.clone());
    let contents: Vec<Vec<Vec<u8>>> = jobs
        .iter()
        .map(|j| j.reports.iter().map(|r| r.encoded.clone()).collect())
        .collect();
    assert_eq!(
        contents,
        vec![vec![pending.encoded.clone()], vec![fresh.encoded.clone()]]
    );
    store.close().await;
}

/// A new database gets 8 KiB pages, or the page size its opening gives; a database keeps its
/// size when opened again with another or none; sizes SQLite does not take are refused.
#[tokio::test]
async fn a_new_database_takes_the_page_size_it_is_given() {
    use duet_store::sqlite::{LogSync, SqliteSetup, DEFAULT_PAGE_SIZE};
    let dir = tempfile::TempDir::new().expect("temp dir");
    let file = |name: &str| dir.path().join(name).display().to_string();
    let setup = |page_size| SqliteSetup {
        log_sync: LogSync::Commit,
        page_size,
    };
    let page_size = |store: &SqliteDatastore| {
        let store = store.clone();
        async move {
            store
                .settings()
                .await
                .expect("settings")
                .into_iter()
                .find(|(name, _)| name == "page_size")
                .map(|(_, value)| value)
        }
    };
    let default = DEFAULT_PAGE_SIZE.to_string();
    for (path, first, again, want) in [
        (file("default.sqlite"), None, Some(4096), default.as_str()),
        (file("small.sqlite"), Some(4096), None, "4096"),
    ] {
        let store = SqliteDatastore::connect_setup(&path, setup(first))
            .await
            .expect("create");
        assert_eq!(page_size(&store).await.as_deref(), Some(want), "{path}");
        store
            .put_reports(&[new_report(TaskId::random())])
            .await
            .expect("put_reports");
        store.close().await;
        let store = SqliteDatastore::connect_setup(&path, setup(again))
            .await
            .expect("reopen");
        assert_eq!(page_size(&store).await.as_deref(), Some(want), "{path}");
        assert_eq!(seqs_in(std::path::Path::new(&path)).await, vec![1]);
        store.close().await;
    }
    assert_eq!(DEFAULT_PAGE_SIZE, 8192);
    let path = file("bad.sqlite");
    for bad in [0, 1000, 256, 131_072] {
        let Err(e) = SqliteDatastore::connect_setup(&path, setup(Some(bad))).await else {
            panic!("page size {bad} accepted");
        };
        assert!(e.to_string().contains("power of two"), "{e}");
    }
}
