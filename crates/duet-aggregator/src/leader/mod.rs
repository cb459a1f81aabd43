//! The Leader: takes uploads, drives aggregation jobs with the Helper and runs collection jobs.

mod aggregation;
mod collection;
mod upload;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use duet_core::Clock;
use duet_messages::dap09::{Interval, TaskId, Time};
use duet_messages::problem::DapProblemType;
use duet_store::{Datastore, Wakeup};
use tokio::sync::{broadcast, mpsc, watch, Notify};

use crate::config::AggregatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::shared::Shared;

pub use collection::PollResult;

/// The Leader role of one process.
pub struct Leader {
    pub(crate) shared: Shared,
    pub(crate) http: reqwest::Client,
    uploads: upload::UploadQueue,
    upload_rx: std::sync::Mutex<Option<mpsc::Receiver<upload::PendingUpload>>>,
    /// Woken when reports are stored (by this process, or by another one sharing the database if
    /// the store has [`Datastore::wakeups`]).
    pub(crate) wake_job_creator: Notify,
    /// Woken when aggregation jobs are created.
    pub(crate) wake_aggregation: Notify,
    /// Woken when reports are aggregated or collection jobs created.
    pub(crate) wake_collection: Notify,
    /// Each task's collected intervals and the second they were read at.
    collected: RwLock<HashMap<TaskId, CollectedIntervals>>,
    /// A Helper served on the same paths, whose tasks `/hpke_config` also answers for.
    colocated_helper: std::sync::OnceLock<Arc<crate::helper::Helper>>,
}

/// A task's collected intervals as read from the store at the given second.
type CollectedIntervals = (Time, Arc<Vec<Interval>>);

impl Leader {
    /// A Leader over `store`, with metrics of its own.
    pub async fn new(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
        http: reqwest::Client,
    ) -> Result<Arc<Self>, Error> {
        Self::with_metrics(store, clock, config, http, Arc::default()).await
    }

    /// A Leader over `store` counting into `metrics` (which a Helper may share).
    pub async fn with_metrics(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, Error> {
        let (uploads, upload_rx) =
            upload::UploadQueue::new(config.upload_queue_capacity, config.upload_queue_bytes);
        let shared = Shared::new(store, clock, config, metrics).await?;
        Ok(Arc::new(Self {
            shared,
            http,
            uploads,
            upload_rx: std::sync::Mutex::new(Some(upload_rx)),
            wake_job_creator: Notify::new(),
            wake_aggregation: Notify::new(),
            wake_collection: Notify::new(),
            colocated_helper: std::sync::OnceLock::new(),
            collected: RwLock::new(HashMap::new()),
        }))
    }

    /// Starts the Leader's background tasks (report writer, job creator, aggregation and
    /// collection drivers, and the forwarder of the store's wake-ups if it has any; only the
    /// report writer when the config's `run_jobs` is off); they stop when `shutdown` turns true.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles = Vec::new();
        if let Some(rx) = self.upload_rx.lock().ok().and_then(|mut g| g.take()) {
            handles.push(tokio::spawn(upload::run_report_writer(
                Arc::clone(self),
                rx,
                shutdown.clone(),
            )));
        }
        if !self.shared.config.run_jobs {
            return handles;
        }
        handles.push(tokio::spawn(aggregation::run_job_creator(
            Arc::clone(self),
            shutdown.clone(),
        )));
        handles.push(tokio::spawn(aggregation::run_aggregation_driver(
            Arc::clone(self),
            shutdown.clone(),
        )));
        if let Some(wakeups) = self.shared.store.wakeups() {
            handles.push(tokio::spawn(forward_wakeups(
                Arc::clone(self),
                wakeups,
                shutdown.clone(),
            )));
        }
        handles.push(tokio::spawn(collection::run_collection_driver(
            Arc::clone(self),
            shutdown,
        )));
        handles
    }

    /// The Leader's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// How long a request's body may take to arrive (`http_body_timeout_ms`).
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shared.config.http_body_timeout_ms)
    }

    /// The HPKE configs this Leader publishes, for any task; for `task_id`, only if it knows
    /// the task (`unrecognizedTask` otherwise).
    pub async fn hpke_config_list(
        &self,
        task_id: Option<duet_messages::dap09::TaskId>,
    ) -> Result<duet_messages::dap09::HpkeConfigList, Error> {
        if let Some(task_id) = task_id {
            let helper = self.colocated_helper.get();
            if self.shared.task(&task_id).await?.is_none()
                && !matches!(helper, Some(h) if h.shared.task(&task_id).await?.is_some())
            {
                return Err(Error::abort(
                    DapProblemType::UnrecognizedTask,
                    Some(task_id),
                    "no such task",
                ));
            }
        }
        Ok(self.shared.hpke_config_list())
    }

    /// Makes `/hpke_config` answer for `helper`'s tasks too, for a process that serves both
    /// roles on the same paths with one key ring (where the Leader's route answers for both).
    pub fn share_hpke_config_with(&self, helper: Arc<crate::helper::Helper>) {
        let _ = self.colocated_helper.set(helper);
    }

    /// Intervals already collected for a task. Cached for the rest of the second it was read in
    /// (replicas sharing a database collect too, so a cached list goes stale), and dropped when
    /// this process finishes a collection.
    pub(crate) async fn collected_intervals(
        &self,
        task_id: &TaskId,
    ) -> Result<Arc<Vec<Interval>>, Error> {
        let now = self.shared.clock.now();
        if let Some(c) = self
            .collected
            .read()
            .ok()
            .and_then(|m| m.get(task_id).filter(|(read, _)| *read == now).cloned())
        {
            return Ok(c.1);
        }
        let c = Arc::new(
            self.shared
                .store
                .collected_intervals(task_id, &Interval::ALL_TIME)
                .await?,
        );
        if let Ok(mut m) = self.collected.write() {
            m.insert(*task_id, (now, Arc::clone(&c)));
        }
        Ok(c)
    }

    pub(crate) fn invalidate_collected(&self, task_id: &TaskId) {
        if let Ok(mut m) = self.collected.write() {
            m.remove(task_id);
        }
    }
}

/// When the jobs a driver released for a retry become due again, so that the driver leases each
/// then rather than at its next poll (which may be much later). Jobs other replicas release are
/// still found by the poll.
#[derive(Default)]
pub(super) struct RetryTimer {
    /// The retry times noted and not yet due, with their deadlines.
    pending: BTreeMap<Time, tokio::time::Instant>,
    /// A sleep until the earliest of them.
    next: Option<(Time, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl RetryTimer {
    /// Notes a job released until `at`.
    pub(super) fn retry_at(&mut self, at: Time, now: Time) {
        if self.pending.contains_key(&at) {
            return;
        }
        // Job times are whole seconds: a job released until `at` is leased from `at.0` on.
        let wait = std::time::Duration::from_secs(at.0.saturating_sub(now.0));
        let sleep = Box::pin(tokio::time::sleep(wait));
        self.pending.insert(at, sleep.deadline());
        if self.next.as_ref().is_none_or(|(next, _)| at < *next) {
            self.next = Some((at, sleep));
        }
    }

    /// Resolves when the earliest noted retry is due (never, if none is), and forgets it and
    /// any earlier; the next one noted is due in its turn.
    pub(super) async fn due(&mut self) {
        match self.next.as_mut() {
            Some((at, sleep)) => {
                sleep.await;
                let after = Time(at.0.saturating_add(1));
                self.pending = self.pending.split_off(&after);
                self.next = self
                    .pending
                    .iter()
                    .next()
                    .map(|(at, deadline)| (*at, Box::pin(tokio::time::sleep_until(*deadline))));
            }
            None => std::future::pending().await,
        }
    }
}

/// The drivers' polling timer, first due one polling interval from now. An interval rather than
/// a sleep per pass, so that jobs finishing all the time do not put off the next poll.
pub(super) fn poll_timer(cfg: &AggregatorConfig) -> tokio::time::Interval {
    let period = cfg
        .polling_interval()
        .max(std::time::Duration::from_millis(1));
    let mut timer = tokio::time::interval(period);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Not due at once: each driver makes its first pass without waiting for a tick.
    timer.reset();
    timer
}

/// Turns the store's wake-ups (writes by any process sharing the database) into the in-process
/// ones; polling still covers whatever gets lost.
async fn forward_wakeups(
    leader: Arc<Leader>,
    mut wakeups: broadcast::Receiver<Wakeup>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let wakeup = tokio::select! {
            w = wakeups.recv() => w,
            _ = shutdown.changed() => return,
        };
        match wakeup {
            Ok(Wakeup::ReportsStored) => leader.wake_job_creator.notify_one(),
            Ok(Wakeup::AggregationJobsCreated) => leader.wake_aggregation.notify_one(),
            Ok(Wakeup::CollectionWorkReady) => leader.wake_collection.notify_one(),
            // Wake-ups may have been missed: wake everything.
            Ok(Wakeup::Listening) | Err(broadcast::error::RecvError::Lagged(_)) => {
                leader.wake_job_creator.notify_one();
                leader.wake_aggregation.notify_one();
                leader.wake_collection.notify_one();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every noted retry comes due in its turn, the earliest first, each once.
    #[tokio::test(start_paused = true)]
    #[allow(clippy::disallowed_methods)] // the test's paused clock, which the timer runs on
    async fn every_retry_comes_due() {
        let start = tokio::time::Instant::now();
        let now = Time(1_000);
        let mut timer = RetryTimer::default();
        timer.retry_at(Time(1_005), now);
        timer.retry_at(Time(1_002), now);
        timer.retry_at(Time(1_005), now);
        timer.retry_at(Time(1_009), now);
        let hour = std::time::Duration::from_secs(3600);
        for at in [2, 5, 9] {
            tokio::time::timeout(hour, timer.due())
                .await
                .expect("the next retry comes due");
            assert_eq!(start.elapsed().as_secs(), at);
        }
        let idle = tokio::time::timeout(hour, timer.due()).await;
        assert!(idle.is_err(), "nothing is due once every retry was");
    }
}
