//! Wake-ups across replicas with `LISTEN`/`NOTIFY`.
//!
//! Writes that give a Leader's background jobs work call `pg_notify` on one channel inside their
//! transaction (at most once per transaction; PostgreSQL delivers at commit and drops the
//! notifications of a rolled-back transaction). Uploads are the exception: batches of reports
//! commit hundreds of times a second, and a notification each woke every listening replica (and
//! its server process) as often, so `ReportsStored` goes out after the commit, at most once per
//! [`REPORTS_STORED_INTERVAL`] per pool, and always within that interval of the batch it
//! announces ([`Wakeups::reports_stored`]). The first [`Datastore::wakeups`] call on a pool
//! starts one listener task, which holds one of the pool's connections, `LISTEN`s, and forwards
//! each notification into a broadcast channel. It reconnects with backoff after errors and stops
//! when the pool closes or the last handle on it is dropped.
//!
//! [`Datastore::wakeups`]: crate::Datastore::wakeups

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{broadcast, watch};

use super::TxError;
use crate::Wakeup;

/// The channel every wake-up goes out on; the payload says which.
pub(super) const CHANNEL: &str = "duet_wakeup";
/// Wake-ups a slow subscriber may fall behind by before it sees `Lagged` (then it wakes all).
const CAPACITY: usize = 64;
/// The shortest time between two `ReportsStored` wake-ups from one pool, and the longest a
/// stored batch waits for its wake-up.
pub(super) const REPORTS_STORED_INTERVAL: Duration = Duration::from_millis(25);
/// The first and the longest pause before reconnecting the listener after an error.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The payload of a wake-up.
pub(super) fn payload(wakeup: Wakeup) -> &'static str {
    match wakeup {
        Wakeup::ReportsStored => "reports_stored",
        Wakeup::AggregationJobsCreated => "aggregation_jobs_created",
        Wakeup::CollectionWorkReady => "collection_work_ready",
        Wakeup::Listening => "listening",
    }
}

fn parse(payload: &str) -> Option<Wakeup> {
    match payload {
        "reports_stored" => Some(Wakeup::ReportsStored),
        "aggregation_jobs_created" => Some(Wakeup::AggregationJobsCreated),
        "collection_work_ready" => Some(Wakeup::CollectionWorkReady),
        _ => None,
    }
}

/// Sends a wake-up from inside a transaction. `sql` is `SELECT pg_notify($1, $2)` behind the
/// caller's comment.
pub(super) async fn notify(
    conn: &mut PgConnection,
    sql: &'static str,
    wakeup: Wakeup,
) -> Result<(), TxError> {
    sqlx::query(sql)
        .bind(CHANNEL)
        .bind(payload(wakeup))
        .execute(conn)
        .await?;
    Ok(())
}

/// The wake-up state of one pool, shared by all its handles.
#[derive(Debug)]
pub(super) struct Wakeups {
    tx: broadcast::Sender<Wakeup>,
    started: AtomicBool,
    /// Reports were stored since the last `ReportsStored` wake-up went out.
    reports_pending: Arc<AtomicBool>,
    /// A task sending `ReportsStored` wake-ups is running.
    reports_sender: Arc<AtomicBool>,
    /// Stops the listener when sent to ([`Wakeups::stop`]) or dropped (with the last handle).
    stop: watch::Sender<()>,
}

impl Wakeups {
    pub(super) fn new() -> Wakeups {
        Wakeups {
            tx: broadcast::channel(CAPACITY).0,
            started: AtomicBool::new(false),
            reports_pending: Arc::new(AtomicBool::new(false)),
            reports_sender: Arc::new(AtomicBool::new(false)),
            stop: watch::channel(()).0,
        }
    }

    /// A new receiver, starting the listener on `pool` if it isn't running. `None` outside a
    /// Tokio runtime.
    pub(super) fn subscribe(&self, pool: &PgPool) -> Option<broadcast::Receiver<Wakeup>> {
        let rx = self.tx.subscribe();
        if !self.started.swap(true, Ordering::SeqCst) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                self.started.store(false, Ordering::SeqCst);
                tracing::warn!("no Tokio runtime: PostgreSQL wake-ups are off");
                return None;
            };
            runtime.spawn(listen(pool.clone(), self.tx.clone(), self.stop.subscribe()));
        }
        Some(rx)
    }

    /// Announces reports stored by a committed write: the wake-up goes out now if none did in
    /// the last [`REPORTS_STORED_INTERVAL`], else when that interval ends (one for every write
    /// meanwhile).
    pub(super) fn reports_stored(&self, pool: &PgPool) {
        self.reports_pending.store(true, Ordering::SeqCst);
        if self.reports_sender.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reports_sender.store(false, Ordering::SeqCst);
            tracing::warn!("no Tokio runtime: the ReportsStored wake-up is not sent");
            return;
        };
        runtime.spawn(send_reports_stored(
            pool.clone(),
            Arc::clone(&self.reports_pending),
            Arc::clone(&self.reports_sender),
        ));
    }

    /// Stops the listener (before the pool is closed, which waits for its connection).
    pub(super) fn stop(&self) {
        self.stop.send_replace(());
    }
}

/// Sends `ReportsStored` while writes keep announcing reports, at most once per interval; exits
/// after an interval with none.
async fn send_reports_stored(pool: PgPool, pending: Arc<AtomicBool>, running: Arc<AtomicBool>) {
    loop {
        if !pending.swap(false, Ordering::SeqCst) {
            running.store(false, Ordering::SeqCst);
            // A write that announced reports after the swap, but still saw this task running,
            // left them to it: carry on unless another task has started meanwhile.
            if pending.load(Ordering::SeqCst) && !running.swap(true, Ordering::SeqCst) {
                continue;
            }
            return;
        }
        if pool.is_closed() {
            running.store(false, Ordering::SeqCst);
            return;
        }
        let sent = match pool.acquire().await {
            Ok(mut conn) => notify(
                &mut conn,
                "-- put_reports\nSELECT pg_notify($1, $2)",
                Wakeup::ReportsStored,
            )
            .await
            .map_err(|e| e.describe()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "sending the ReportsStored wake-up failed");
        }
        tokio::time::sleep(REPORTS_STORED_INTERVAL).await;
    }
}

/// The listener task: (re)connects until stopped, the pool is closed, or the handles are gone.
async fn listen(pool: PgPool, tx: broadcast::Sender<Wakeup>, mut stop: watch::Receiver<()>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let error = tokio::select! {
            result = listen_once(&pool, &tx, &mut backoff) => match result {
                Err(e) => e,
                Ok(never) => match never {},
            },
            _ = stop.changed() => return,
        };
        if pool.is_closed() {
            return;
        }
        tracing::warn!(error = %error, retry_in = ?backoff, "PostgreSQL wake-up listener failed");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One listening session; returns only on an error.
async fn listen_once(
    pool: &PgPool,
    tx: &broadcast::Sender<Wakeup>,
    backoff: &mut Duration,
) -> Result<Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    *backoff = MIN_BACKOFF;
    // Whatever happened before this point was not heard.
    let _ = tx.send(Wakeup::Listening);
    loop {
        match listener.try_recv().await? {
            Some(notification) => {
                if let Some(wakeup) = parse(notification.payload()) {
                    // No subscriber is not an error.
                    let _ = tx.send(wakeup);
                }
            }
            // The connection was lost and has been re-established (and `LISTEN` re-issued).
            None => {
                let _ = tx.send(Wakeup::Listening);
            }
        }
    }
}
