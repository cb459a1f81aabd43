//! Wiring: one HTTP listener serving the Leader, the Helper or both, with their background jobs.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use duet_core::Clock;
use duet_store::Datastore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AggregatorConfig;
use crate::connections::{self, ConnectionLimits};
use crate::error::Error;
use crate::helper::Helper;
use crate::http::{helper_router, leader_router};
use crate::leader::Leader;
use crate::metrics::{self, Metrics};

/// One role to serve: its store and the path it is mounted under (`""` for the root, or e.g.
/// `"/leader"`).
pub struct RoleConfig {
    /// The role's datastore handle.
    pub store: Arc<dyn Datastore>,
    /// Path prefix of the role's DAP endpoints.
    pub path_prefix: String,
}

/// Which roles a process serves.
#[derive(Default)]
pub struct Roles {
    /// The Leader, if served.
    pub leader: Option<RoleConfig>,
    /// The Helper, if served.
    pub helper: Option<RoleConfig>,
}

/// A running aggregator server.
pub struct RunningServer {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The address `/metrics` and `/healthz` are served on, when not on `local_addr`.
    pub admin_addr: Option<SocketAddr>,
    /// The Leader, if served (for in-process inspection).
    pub leader: Option<Arc<Leader>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<std::io::Result<()>>,
    admin: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Stops accepting requests, stops the background jobs, and waits for both.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(admin) = self.admin {
            let _ = admin.await;
        }
        self.server
            .await
            .map_err(|e| Error::Internal(format!("server task failed: {e}")))?
            .map_err(|e| Error::Internal(format!("server failed: {e}")))
    }

    /// Resolves when the server stops by itself (it normally doesn't).
    pub async fn wait(&mut self) -> Result<(), Error> {
        (&mut self.server)
            .await
            .map_err(|e| Error::Internal(format!("server task failed: {e}")))?
            .map_err(|e| Error::Internal(format!("server failed: {e}")))
    }
}

/// Connections the kernel may complete and queue for [`listen`]'s listener before they are
/// accepted. Linux caps it at `net.core.somaxconn` (4,096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `addr` (`HOST:PORT`; a name's addresses are tried in turn) with a queue of
/// [`LISTEN_BACKLOG`] connections not yet accepted.
///
/// The standard library's and tokio's `bind` ask for 128. A public endpoint sees bursts of new
/// clients: past the queue's length Linux drops their opening SYNs, and each such client's
/// connect then waits for its SYN to be resent, a second later.
pub async fn listen(addr: &str) -> std::io::Result<TcpListener> {
    let mut failed = None;
    for addr in tokio::net::lookup_host(addr).await? {
        match listen_on(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to no IP address",
        )
    }))
}

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted server may take its port back at once, while
    // the last one's closed connections linger. (On Windows it would let another process take
    // the port.)
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn mount(router: Router, prefix: &str, sub: Router) -> Router {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        router.merge(sub)
    } else {
        router.nest(prefix, sub)
    }
}

/// Starts serving on `listener` in the background.
pub async fn run(
    listener: TcpListener,
    roles: Roles,
    config: AggregatorConfig,
    clock: Arc<dyn Clock>,
) -> Result<RunningServer, Error> {
    run_with(listener, roles, config, clock, Router::new()).await
}

/// Like [`run`], and also serves `extra` on the same listener (e.g. a test API). Its paths must
/// not collide with the roles' DAP paths, `/healthz` or `/metrics`; its fallback, if any, answers
/// every path nothing else matches.
pub async fn run_with(
    listener: TcpListener,
    roles: Roles,
    config: AggregatorConfig,
    clock: Arc<dyn Clock>,
    extra: Router,
) -> Result<RunningServer, Error> {
    run_with_admin(listener, None, roles, config, clock, extra).await
}

/// Like [`run_with`], serving `/metrics` and `/healthz` on `admin` instead, when given, so that
/// the DAP listener, open to clients, shows neither.
pub async fn run_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    roles: Roles,
    config: AggregatorConfig,
    clock: Arc<dyn Clock>,
    extra: Router,
) -> Result<RunningServer, Error> {
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut router = Router::new();
    let mut tasks = Vec::new();
    let mut health_stores: Vec<Arc<dyn Datastore>> = Vec::new();
    let mut leader_handle = None;
    // One set of counters for both roles.
    let metrics = Arc::new(Metrics::default());
    for rc in roles.leader.iter().chain(&roles.helper) {
        // Only an optimisation: a store that fails to warm up still serves.
        if let Err(e) = rc.store.warm_up().await {
            tracing::warn!(error = %e, "warming up the datastore failed");
        }
    }
    if let Some(rc) = roles.leader {
        // No redirects: a request carries the Leader's token for the Helper, which a redirect
        // would send to whatever host it names.
        // Idle connections to the Helper are let go well before a Duet Helper closes them (its
        // `http_header_timeout_ms`), so that no request goes out on a connection as it closes.
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        let leader = Leader::with_metrics(
            Arc::clone(&rc.store),
            Arc::clone(&clock),
            config.clone(),
            http,
            Arc::clone(&metrics),
        )
        .await?;
        tasks.extend(leader.spawn_background(shutdown_rx.clone()));
        router = mount(router, &rc.path_prefix, leader_router(Arc::clone(&leader)));
        health_stores.push(rc.store);
        leader_handle = Some(leader);
    }
    if let Some(rc) = roles.helper {
        let helper = Helper::with_metrics(
            Arc::clone(&rc.store),
            Arc::clone(&clock),
            config.clone(),
            Arc::clone(&metrics),
        )
        .await?;
        tasks.push(helper.spawn_cleanup(shutdown_rx.clone()));
        router = mount(router, &rc.path_prefix, helper_router(helper));
        health_stores.push(rc.store);
    }
    let router = router.merge(extra);
    let ops = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                        text,
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let stores = health_stores.clone();
                async move {
                    for s in &stores {
                        // The error's text (hosts, users, paths) goes to the log, not to
                        // whoever asked.
                        if let Err(e) = s.health_check().await {
                            tracing::warn!(error = %e, "health check: the database failed");
                            return (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "database unavailable".to_string(),
                            );
                        }
                    }
                    (axum::http::StatusCode::OK, "ok".to_string())
                }
            }),
        );
    let limits = ConnectionLimits {
        header_timeout: std::time::Duration::from_millis(config.http_header_timeout_ms),
        max_connections: config.max_connections,
    };
    let (router, admin_addr, admin) = match admin {
        Some(admin) => {
            let addr = admin
                .local_addr()
                .map_err(|e| Error::Internal(e.to_string()))?;
            let served = connections::serve(admin, ops, limits, shutdown_rx.clone());
            (router, Some(addr), Some(tokio::spawn(served)))
        }
        None => (router.merge(ops), None, None),
    };
    let server = tokio::spawn(connections::serve(listener, router, limits, shutdown_rx));
    Ok(RunningServer {
        local_addr,
        admin_addr,
        admin,
        leader: leader_handle,
        shutdown,
        tasks,
        server,
    })
}
