//! The conformance suite on PostgreSQL, and several replicas (pools) sharing one database.
//!
//! The tests need a server: `DATABASE_URL` names a database whose user may create databases
//! (`scripts/test` starts a throwaway cluster and sets it). Each test creates its own database
//! and drops it at the end. Without `DATABASE_URL` every test prints why it is skipped and passes,
//! so that a plain `cargo test` works on a machine without PostgreSQL.

use std::collections::{HashMap, HashSet};

use duet_core::AggregatorRole;
use duet_messages::dap09::{
    AggregationJobId, CollectionJobId, ReportId, ReportIdChecksum, TaskId, Time,
};
use duet_store::conformance::postgres::with_fresh_database;
use duet_store::postgres::PostgresDatastore;
use duet_store::{
    conformance, BatchAggregation, CollectionJob, CollectionJobState, Datastore,
    HelperAggregationJob, NewReport, StoreError, Wakeup,
};
use sqlx::{Connection, PgConnection};

mod common;

use common::{interval, next_wakeup, report, PRECISION, T0};

/// These tests' toy VDAF: a share is a little-endian `u64` count.
fn add_shares(a: &[u8], b: &[u8]) -> Result<Vec<u8>, String> {
    let a: [u8; 8] = a.try_into().map_err(|_| "bad share".to_string())?;
    let b: [u8; 8] = b.try_into().map_err(|_| "bad share".to_string())?;
    Ok((u64::from_le_bytes(a) + u64::from_le_bytes(b))
        .to_le_bytes()
        .to_vec())
}

fn checksum<'a>(ids: impl IntoIterator<Item = &'a ReportId>) -> ReportIdChecksum {
    ids.into_iter()
        .fold(ReportIdChecksum::default(), |c, id| c.updated_with(id))
}

/// One delta per bucket for reports at the given times, each counting 1.
fn deltas(task_id: TaskId, reports: &[(ReportId, Time)]) -> Vec<BatchAggregation> {
    let mut buckets: HashMap<u64, Vec<ReportId>> = HashMap::new();
    for (id, time) in reports {
        buckets
            .entry(time.0 - time.0 % PRECISION)
            .or_default()
            .push(*id);
    }
    buckets
        .into_iter()
        .map(|(start, ids)| BatchAggregation {
            task_id,
            bucket: interval(start, PRECISION),
            aggregation_parameter: Vec::new(),
            aggregate_share: (ids.len() as u64).to_le_bytes().to_vec(),
            report_count: ids.len() as u64,
            checksum: checksum(&ids),
        })
        .collect()
}

/// Everything stored for a task in `[T0, T0 + span)`, summed over buckets: (share, count,
/// checksum).
async fn totals(store: &dyn Datastore, task_id: TaskId, span: u64) -> (u64, u64, ReportIdChecksum) {
    let rows = store
        .get_batch_aggregations(&task_id, &interval(T0, span), &[])
        .await
        .expect("get_batch_aggregations");
    rows.iter().fold(
        (0, 0, ReportIdChecksum::default()),
        |(share, count, sum), row| {
            let value = u64::from_le_bytes(row.aggregate_share[..].try_into().expect("8 bytes"));
            (
                share + value,
                count + row.report_count,
                sum.combined_with(&row.checksum),
            )
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    with_fresh_database("conformance_suite", |url| async move {
        let leader = PostgresDatastore::connect(&url).await.expect("connect");
        let helper = leader.with_role(AggregatorRole::Helper);
        assert_eq!(helper.role(), AggregatorRole::Helper);
        conformance::run_all(&leader, &helper).await;
        // Connecting again finds the migrations applied.
        let again = PostgresDatastore::connect(&url).await.expect("reconnect");
        again.health_check().await.expect("health_check");
        again.close().await;
        leader.close().await;
    })
    .await;
}

/// Two replicas (pools) migrate a new database at once, upload overlapping batches, and run
/// job creators and drivers side by side: every report is accepted, lands in exactly one job
/// (the copy the other replica queued is a replay, dropped when a job claims it), and is merged
/// into the aggregates exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_aggregation_work() {
    with_fresh_database("replicas_share_aggregation_work", |url| async move {
        const TASKS: usize = 3;
        const REPORTS_PER_TASK: usize = 700;
        const JOB_SIZE: usize = 40;
        const WORKERS: usize = 6;
        let (a, b) = tokio::join!(
            PostgresDatastore::connect(&url),
            PostgresDatastore::connect(&url)
        );
        let replicas = [a.expect("connect a"), b.expect("connect b")];
        let task_ids: Vec<TaskId> = (0..TASKS).map(|_| TaskId::random()).collect();
        let reports: Vec<NewReport> = task_ids
            .iter()
            .flat_map(|t| {
                (0..REPORTS_PER_TASK).map(|i| report(*t, T0 + (i as u64 * 7) % (3 * PRECISION)))
            })
            .collect();

        // Both replicas upload every report, in batches cut differently and at the same time.
        let (new_a, new_b) = tokio::join!(
            async {
                let mut new = Vec::new();
                for batch in reports.chunks(97) {
                    new.extend(replicas[0].put_reports(batch).await.expect("put_reports"));
                }
                new
            },
            async {
                let mut new = Vec::new();
                for batch in reports.rchunks(131).collect::<Vec<_>>().into_iter().rev() {
                    new.extend(replicas[1].put_reports(batch).await.expect("put_reports"));
                }
                new
            }
        );
        for i in 0..reports.len() {
            assert!(new_a[i] || new_b[i], "report {i} must be accepted");
        }

        // Workers on both replicas create, lease and finish jobs until nothing is left.
        let now = Time(T0 + 10 * PRECISION);
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let store = replicas[w % 2].clone();
            let task_ids = task_ids.clone();
            workers.push(tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    store
                        .create_aggregation_jobs(JOB_SIZE, now)
                        .await
                        .expect("create_aggregation_jobs");
                    let jobs = store
                        .acquire_aggregation_jobs(now, 3600, 2)
                        .await
                        .expect("acquire_aggregation_jobs");
                    if jobs.is_empty() {
                        let mut pending = 0;
                        for t in &task_ids {
                            pending += store
                                .count_unaggregated_reports(t, &interval(0, u64::MAX / 2))
                                .await
                                .expect("count_unaggregated_reports");
                        }
                        if pending == 0 {
                            return done;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    for job in jobs {
                        let ids: Vec<(ReportId, Time)> =
                            job.reports.iter().map(|r| (r.report_id, r.time)).collect();
                        store
                            .finish_aggregation_job(&job, &deltas(job.task_id, &ids), &add_shares)
                            .await
                            .expect("finish_aggregation_job");
                        done.push((w, job));
                    }
                }
            }));
        }
        let mut jobs = Vec::new();
        for worker in workers {
            jobs.extend(worker.await.expect("worker"));
        }

        let job_ids: HashSet<AggregationJobId> = jobs.iter().map(|(_, j)| j.job_id).collect();
        assert_eq!(job_ids.len(), jobs.len(), "no job is leased twice");
        let mut seen: HashSet<ReportId> = HashSet::new();
        for (_, job) in &jobs {
            assert!(!job.reports.is_empty() && job.reports.len() <= JOB_SIZE);
            for r in &job.reports {
                assert!(seen.insert(r.report_id), "report in two jobs");
            }
        }
        assert_eq!(seen.len(), reports.len(), "every report is in a job");
        let per_replica = |parity| jobs.iter().filter(|(w, _)| w % 2 == parity).count();
        println!(
            "{} jobs: {} by replica a, {} by replica b",
            jobs.len(),
            per_replica(0),
            per_replica(1)
        );

        // Concurrent merges into the same buckets lost nothing.
        for t in &task_ids {
            let ids: Vec<ReportId> = reports
                .iter()
                .filter(|r| r.task_id == *t)
                .map(|r| r.report_id)
                .collect();
            let (share, count, sum) = totals(&replicas[0], *t, 3 * PRECISION).await;
            assert_eq!((share, count), (ids.len() as u64, ids.len() as u64));
            assert_eq!(sum, checksum(&ids));
        }
        for store in &replicas {
            store.close().await;
        }
    })
    .await;
}

/// A replica that leased jobs and died: its leases block the others until they expire, then
/// the work is taken over and the dead replica's leases are worthless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_replica_leases_are_taken_over() {
    with_fresh_database("crashed_replica_leases_are_taken_over", |url| async move {
        let crashed = PostgresDatastore::connect(&url).await.expect("connect");
        let survivor = PostgresDatastore::connect(&url).await.expect("connect");
        let task_id = TaskId::random();
        let reports: Vec<NewReport> = (0..10).map(|i| report(task_id, T0 + i)).collect();
        crashed.put_reports(&reports).await.expect("put_reports");
        let collection = CollectionJob {
            task_id,
            id: CollectionJobId::random(),
            batch_interval: interval(T0, PRECISION),
            aggregation_parameter: Vec::new(),
            state: CollectionJobState::Start,
        };
        crashed
            .put_collection_job(&collection)
            .await
            .expect("put_collection_job");
        let t = T0 + PRECISION;
        assert_eq!(
            crashed
                .create_aggregation_jobs(5, Time(t))
                .await
                .expect("create"),
            2
        );
        let lost_jobs = crashed
            .acquire_aggregation_jobs(Time(t), 300, 10)
            .await
            .expect("acquire");
        let lost_collections = crashed
            .acquire_collection_jobs(Time(t), 300, 10)
            .await
            .expect("acquire");
        assert_eq!((lost_jobs.len(), lost_collections.len()), (2, 1));
        crashed.close().await;

        // Before expiry: nothing for the survivor.
        let early = survivor
            .acquire_aggregation_jobs(Time(t + 299), 300, 10)
            .await
            .expect("acquire");
        assert!(early.is_empty());
        assert!(survivor
            .acquire_collection_jobs(Time(t + 299), 300, 10)
            .await
            .expect("acquire")
            .is_empty());

        // At expiry: the same work, second attempt.
        let taken = survivor
            .acquire_aggregation_jobs(Time(t + 300), 300, 10)
            .await
            .expect("acquire");
        assert_eq!(taken.len(), 2);
        for job in &taken {
            assert_eq!(job.lease.attempts, 2);
            let old = lost_jobs
                .iter()
                .find(|j| j.job_id == job.job_id)
                .expect("same job");
            assert_eq!(old.reports, job.reports);
            // The crashed replica's lease (were it to come back) is stale.
            assert!(matches!(
                survivor.finish_aggregation_job(old, &[], &add_shares).await,
                Err(StoreError::LeaseLost)
            ));
            survivor
                .finish_aggregation_job(job, &[], &add_shares)
                .await
                .expect("finish");
        }
        let taken = survivor
            .acquire_collection_jobs(Time(t + 300), 300, 10)
            .await
            .expect("acquire");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].lease.attempts, 2);
        assert!(matches!(
            survivor
                .release_collection_job(&lost_collections[0], Time(t), true)
                .await,
            Err(StoreError::LeaseLost)
        ));
        assert_eq!(
            survivor
                .count_unaggregated_reports(&task_id, &interval(T0, PRECISION))
                .await
                .expect("count"),
            0
        );
        survivor.close().await;
    })
    .await;
}

/// Helper replicas: concurrent jobs replaying the same report IDs (exactly one wins, the others
/// are `Conflict` and leave nothing), and concurrent jobs merging into one new bucket (all
/// counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_replicas_race_on_report_ids_and_buckets() {
    with_fresh_database(
        "helper_replicas_race_on_report_ids_and_buckets",
        |url| async move {
            const RACERS: usize = 6;
            let (a, b) = tokio::join!(
                PostgresDatastore::connect(&url),
                PostgresDatastore::connect(&url)
            );
            let replicas = [
                a.expect("connect").with_role(AggregatorRole::Helper),
                b.expect("connect").with_role(AggregatorRole::Helper),
            ];
            let task_id = TaskId::random();
            let job = |tag: u8| HelperAggregationJob {
                task_id,
                id: AggregationJobId::random(),
                request_hash: [tag; 32],
                step: 1,
                response: vec![tag],
            };
            let one = |ids: &[ReportId]| {
                let timed: Vec<(ReportId, Time)> = ids.iter().map(|id| (*id, Time(T0))).collect();
                deltas(task_id, &timed)
            };

            // Replays: every racer carries the same shared ID among its own.
            for round in 0..5u8 {
                let shared = ReportId::random();
                let mut racers = Vec::new();
                for r in 0..RACERS {
                    let store = replicas[r % 2].clone();
                    let mut ids: Vec<ReportId> = (0..20).map(|_| ReportId::random()).collect();
                    ids.insert(r, shared);
                    let j = job(round);
                    let d = one(&ids);
                    racers.push(tokio::spawn(async move {
                        let outcome = store
                            .put_helper_aggregation_job(&j, &ids, &d, &add_shares)
                            .await;
                        (outcome, ids)
                    }));
                }
                let mut winners = 0;
                for racer in racers {
                    let (outcome, ids) = racer.await.expect("racer");
                    match outcome {
                        Ok(()) => winners += 1,
                        Err(StoreError::Conflict) => {
                            let seen = replicas[0]
                                .seen_report_ids(&task_id, &ids)
                                .await
                                .expect("seen_report_ids");
                            assert_eq!(seen, HashSet::from([shared]), "a loser leaves nothing");
                        }
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                assert_eq!(
                    winners, 1,
                    "round {round}: exactly one job stores the shared ID"
                );
            }
            let (_, count, _) = totals(&replicas[0], task_id, PRECISION).await;
            assert_eq!(count, 5 * 21);

            // Disjoint jobs racing to create and merge into the same new bucket.
            let fresh = TaskId::random();
            let mut racers = Vec::new();
            let mut all_ids = Vec::new();
            for r in 0..RACERS {
                let store = replicas[r % 2].clone();
                let ids: Vec<ReportId> = (0..50).map(|_| ReportId::random()).collect();
                all_ids.extend(ids.iter().copied());
                let mut j = job(100);
                j.task_id = fresh;
                let timed: Vec<(ReportId, Time)> =
                    ids.iter().map(|id| (*id, Time(T0 + 1))).collect();
                let d = deltas(fresh, &timed);
                racers.push(tokio::spawn(async move {
                    store
                        .put_helper_aggregation_job(&j, &ids, &d, &add_shares)
                        .await
                }));
            }
            for racer in racers {
                racer
                    .await
                    .expect("racer")
                    .expect("disjoint jobs all succeed");
            }
            let (share, count, sum) = totals(&replicas[1], fresh, PRECISION).await;
            assert_eq!((share, count), (all_ids.len() as u64, all_ids.len() as u64));
            assert_eq!(sum, checksum(&all_ids));
            for store in &replicas {
                store.close().await;
            }
        },
    )
    .await;
}

/// Times are BIGINTs: values past `i64::MAX` are refused with an error, never wrapped or
/// panicked on, and range queries clamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_times_are_errors() {
    with_fresh_database("out_of_range_times_are_errors", |url| async move {
        let store = PostgresDatastore::connect(&url).await.expect("connect");
        let task_id = TaskId::random();
        let mut late = report(task_id, 0);
        late.time = Time(u64::MAX);
        assert!(matches!(
            store.put_reports(&[late, report(task_id, T0)]).await,
            Err(StoreError::Database(_))
        ));
        assert!(matches!(
            store.create_aggregation_jobs(10, Time(u64::MAX)).await,
            Err(StoreError::Database(_))
        ));
        let everything = interval(0, u64::MAX);
        assert_eq!(
            store
                .count_unaggregated_reports(&task_id, &everything)
                .await
                .expect("count"),
            0,
            "the refused batch stored nothing"
        );
        assert!(store
            .get_batch_aggregations(&task_id, &interval(u64::MAX - 1, u64::MAX), &[])
            .await
            .expect("get_batch_aggregations")
            .is_empty());
        store.close().await;
    })
    .await;
}

/// Writes on one replica (pool) wake another's background jobs through `LISTEN`/`NOTIFY`: one
/// wake-up per transaction that gave work, none for writes that gave none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_reach_other_replicas() {
    with_fresh_database("wakeups_reach_other_replicas", |url| async move {
        let writer = PostgresDatastore::connect(&url).await.expect("connect");
        let listener = PostgresDatastore::connect(&url).await.expect("connect");
        let mut rx = listener.wakeups().expect("PostgreSQL has wake-ups");
        // A second subscriber on the same pool shares the one listener.
        let mut rx2 = listener
            .with_role(AggregatorRole::Helper)
            .wakeups()
            .expect("PostgreSQL has wake-ups");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::Listening);
        assert_eq!(next_wakeup(&mut rx2).await, Wakeup::Listening);

        let task_id = TaskId::random();
        let reports: Vec<NewReport> = (0..5).map(|i| report(task_id, T0 + i)).collect();
        writer.put_reports(&reports).await.expect("put_reports");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::ReportsStored);
        assert_eq!(next_wakeup(&mut rx2).await, Wakeup::ReportsStored);
        // A creator that finds no reports wakes nobody.
        let now = Time(T0 + PRECISION);
        assert_eq!(
            writer
                .create_aggregation_jobs(3, now)
                .await
                .expect("create"),
            2
        );
        assert_eq!(
            writer
                .create_aggregation_jobs(3, now)
                .await
                .expect("create"),
            0
        );
        // One wake-up per job, each sent as it commits.
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::AggregationJobsCreated);
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::AggregationJobsCreated);

        let jobs = writer
            .acquire_aggregation_jobs(now, 300, 10)
            .await
            .expect("acquire");
        assert_eq!(jobs.len(), 2);
        let ids: Vec<(ReportId, Time)> = jobs[0]
            .reports
            .iter()
            .map(|r| (r.report_id, r.time))
            .collect();
        writer
            .finish_aggregation_job(&jobs[0], &deltas(task_id, &ids), &add_shares)
            .await
            .expect("finish");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::CollectionWorkReady);
        writer
            .abandon_aggregation_job(&jobs[1])
            .await
            .expect("abandon");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::CollectionWorkReady);

        let collection = CollectionJob {
            task_id,
            id: CollectionJobId::random(),
            batch_interval: interval(T0, PRECISION),
            aggregation_parameter: Vec::new(),
            state: CollectionJobState::Start,
        };
        writer
            .put_collection_job(&collection)
            .await
            .expect("put_collection_job");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::CollectionWorkReady);
        // Storing the same job again is no new work.
        writer
            .put_collection_job(&collection)
            .await
            .expect("put_collection_job");
        writer
            .put_reports(&[report(task_id, T0)])
            .await
            .expect("put_reports");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::ReportsStored);
        assert!(rx.is_empty(), "one wake-up per transaction");

        // Closing stops the listener (closing would otherwise wait for its connection).
        tokio::time::timeout(std::time::Duration::from_secs(10), listener.close())
            .await
            .expect("close returns");
        writer.close().await;
    })
    .await;
}

/// Pooled connections are pinged only after they sat idle for a while, so a connection the
/// server dropped (a restart, an administrator) can fail the one call that finds it; the pool then
/// replaces it, and the store works again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_replaced() {
    with_fresh_database("dropped_connections_are_replaced", |url| async move {
        let store = PostgresDatastore::connect(&url).await.expect("connect");
        store.health_check().await.expect("health_check");
        let mut admin = PgConnection::connect(&url).await.expect("admin connection");
        let ended = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut admin)
        .await
        .expect("terminate the store's connections");
        assert!(!ended.is_empty(), "the store had a connection open");
        let mut failed = 0;
        for _ in 0..40 {
            if store.health_check().await.is_err() {
                failed += 1;
            }
        }
        assert!(
            failed <= ended.len(),
            "{failed} calls failed for {} dropped connections",
            ended.len()
        );
        store
            .health_check()
            .await
            .expect("health_check after the drop");
        admin.close().await.expect("close");
        store.close().await;
    })
    .await;
}

/// Upload batches in quick succession share `ReportsStored` wake-ups instead of sending one each,
/// and a batch after a quiet spell still wakes the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_stored_wakeups_are_coalesced() {
    with_fresh_database("reports_stored_wakeups_are_coalesced", |url| async move {
        let writer = PostgresDatastore::connect(&url).await.expect("connect");
        let listener = PostgresDatastore::connect(&url).await.expect("connect");
        let mut rx = listener.wakeups().expect("PostgreSQL has wake-ups");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::Listening);
        let task_id = TaskId::random();
        let batches = 40;
        for i in 0..batches {
            writer
                .put_reports(&[report(task_id, T0 + i)])
                .await
                .expect("put_reports");
        }
        // Everything sent has arrived by now.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut woken = 0;
        while let Ok(wakeup) = rx.try_recv() {
            assert_eq!(wakeup, Wakeup::ReportsStored);
            woken += 1;
        }
        assert!(
            (1..batches).contains(&woken),
            "{woken} wake-ups for {batches} batches"
        );
        writer
            .put_reports(&[report(task_id, T0 + batches)])
            .await
            .expect("put_reports");
        assert_eq!(next_wakeup(&mut rx).await, Wakeup::ReportsStored);
        tokio::time::timeout(std::time::Duration::from_secs(10), listener.close())
            .await
            .expect("close returns");
        writer.close().await;
    })
    .await;
}

/// A large batch of uploads is written without waiting for the log's flush, and its
/// `Durable` waits for a flush of its own; a small one waits for the flush in its commit. Both
/// are stored once durable.
#[tokio::test]
async fn large_upload_batches_commit_before_their_flush() {
    with_fresh_database("large_upload_batches", |url| async move {
        let store = PostgresDatastore::connect(&url).await.expect("connect");
        let task_id = TaskId::random();
        let small: Vec<NewReport> = (0..3).map(|i| report(task_id, T0 + i)).collect();
        let large: Vec<NewReport> = (0..20)
            .map(|i| {
                let mut r = report(task_id, T0 + i);
                r.encoded.resize(17_000, 7);
                r
            })
            .collect();
        let (_, durable) = store.put_reports_pipelined(&small).await.expect("small");
        assert!(matches!(durable, duet_store::Durable::Now));
        let (fresh, durable) = store.put_reports_pipelined(&large).await.expect("large");
        assert!(fresh.iter().all(|f| *f));
        assert!(matches!(durable, duet_store::Durable::Later(_)));
        durable.wait().await.expect("flushed");
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM report_queue")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(stored, 23);
        conn.close().await.expect("close");
        store.close().await;
    })
    .await;
}

/// A server that cannot be reached is named as such (once the wait for it is over), not as the
/// pool's "pool timed out" (no server is needed: nothing listens on port 1).
#[tokio::test]
async fn an_unreachable_server_says_why() {
    let unreachable = "postgres://duet@127.0.0.1:1/duet";
    let Err(e) = PostgresDatastore::connect_within(unreachable, std::time::Duration::ZERO).await
    else {
        panic!("connected to port 1");
    };
    let text = e.to_string();
    assert!(text.contains("refused"), "{text}");
}

/// A server that starts after the store began connecting (one starting alongside Duet) is
/// waited for: here a port that refuses connections until, a moment later, it forwards them to
/// the real server.
#[tokio::test]
async fn a_server_that_comes_up_later_is_waited_for() {
    with_fresh_database("server_comes_up_later", |url| async move {
        let options: sqlx::postgres::PgConnectOptions = url.parse().expect("url");
        let real_addr = format!("{}:{}", options.get_host(), options.get_port());
        assert!(url.contains(&real_addr), "{url} names {real_addr}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let later = url.replacen(&real_addr, &format!("127.0.0.1:{port}"), 1);
        let forwarder = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind the port again");
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let real_addr = real_addr.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(real_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let store = PostgresDatastore::connect_within(&later, std::time::Duration::from_secs(20))
            .await
            .expect("connected once the server came up");
        store.health_check().await.expect("health check");
        store.close().await;
        forwarder.abort();
    })
    .await;
}
