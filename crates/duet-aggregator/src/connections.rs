//! Serving HTTP/1.1 connections with the limits a public endpoint needs: a deadline for each
//! request's head (a client that sends nothing, or its headers a byte at a time, is closed, and so
//! is a keep-alive connection left idle that long), at most `max_connections` connections at once
//! (the next is accepted when one closes), and a graceful shutdown that lets requests in flight
//! finish, for up to 30 s.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// How long `serve` waits after a failed `accept` (say, out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a shutdown waits for the requests in flight before it lets go of them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Limits on the connections [`serve`] takes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    /// The longest a request's head may take to arrive, from when the connection is ready for it.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Serves `router` on the connections `listener` accepts until `shutdown` turns true, then stops
/// accepting and waits for the connections' requests in flight (idle keep-alive connections are
/// closed at once).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // Failed accepts in a row: the first of a streak is logged as a warning, the rest quietly.
    let mut failing = 0u64;
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    failing = 0;
                    tcp
                }
                Err(e) => {
                    if failing == 0 {
                        tracing::warn!(error = %e, "accepting a connection failed (raise `ulimit -n` if it says too many open files)");
                    } else {
                        tracing::debug!(error = %e, failing, "accepting a connection failed again");
                    }
                    failing += 1;
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        // Answers go out at once rather than waiting on Nagle's algorithm for the peer's ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on a connection");
        }
        let connection =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    // New connections are refused from here on, not left in the backlog while requests finish.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still running {SHUTDOWN_GRACE:?} after shutdown began; leaving them"
        );
    }
    Ok(())
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
