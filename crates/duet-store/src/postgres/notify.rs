//! Wake-ups across replicas with `LISTEN`/`NOTIFY`.
//!
//! Writes that give a Leader's background jobs work call `pg_notify` on one channel inside their
//! transaction (at most once per transaction; PostgreSQL delivers at commit and drops the
//! notifications of a rolled-back transaction). The first [`Datastore::wakeups`] call on a pool
//! starts one listener task, which holds one of the pool's connections, `LISTEN`s, and forwards
//! each notification into a broadcast channel. It reconnects with backoff after errors and stops
//! when the pool closes or the last handle on it is dropped.
//!
//! [`Datastore::wakeups`]: crate::Datastore::wakeups

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Stops the listener when sent to ([`Wakeups::stop`]) or dropped (with the last handle).
    stop: watch::Sender<()>,
}

impl Wakeups {
    pub(super) fn new() -> Wakeups {
        Wakeups {
            tx: broadcast::channel(CAPACITY).0,
            started: AtomicBool::new(false),
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

    /// Stops the listener (before the pool is closed, which waits for its connection).
    pub(super) fn stop(&self) {
        self.stop.send_replace(());
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
