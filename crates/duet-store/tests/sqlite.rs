//! The conformance suite on a fresh SQLite file, and concurrent writers on one file.

use duet_core::AggregatorRole;
use duet_messages::dap09::{ReportId, TaskId, Time};
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
    first.close().await;
    // Reopening runs the (already applied) migrations again and sees the data.
    let second = SqliteDatastore::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("reconnect");
    assert_eq!(
        second.put_reports(&[report]).await.expect("put_reports"),
        vec![false]
    );
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
        let again = store.put_reports(&written).await.expect("put_reports");
        assert!(again.iter().all(|n| !*n));
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
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), written.len());
    for store in &stores {
        store.close().await;
    }
}
