//! `duet interop`: the DAP interoperation test API (draft-dcook-ppm-dap-interop-test-design-07).
//!
//! One process per role, as the draft's containers are: `client`, `aggregator` (a Leader or a
//! Helper, decided per task by `add_task`) and `collector`. Each serves `POST /internal/test/*`
//! with JSON bodies; a request that parses gets 200 and the DAP outcome in `status`
//! (`"success"`/`"error"`, with `error` saying why), one that doesn't parse gets 400 in the same
//! shape, and an unknown `/internal/test/…` path gets 404.
//!
//! These endpoints provision tasks and keys without any authentication: they are for test
//! deployments only.

mod aggregator;
mod client;
mod collector;
mod json;

use std::process::ExitCode;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// `duet interop` roles.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Serve the Client test API (`ready`, `upload`).
    Client(ListenArgs),
    /// Serve the Aggregator test API (`ready`, `endpoint_for_task`, `add_task`) and DAP itself,
    /// as each task's Leader or Helper, at the root of the same port.
    Aggregator(aggregator::Args),
    /// Serve the Collector test API (`ready`, `add_task`, `collection_start`, `collection_poll`).
    Collector(ListenArgs),
}

/// The listening address.
#[derive(clap::Args)]
pub struct ListenArgs {
    /// Address to listen on (the draft's containers use 0.0.0.0:8080).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

impl ListenArgs {
    async fn bind(&self) -> Result<TcpListener> {
        duet_aggregator::server::listen(&self.listen)
            .await
            .with_context(|| format!("could not listen on {} (is the port in use?)", self.listen))
    }
}

/// Runs one interop role until interrupted.
pub async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Client(args) => serve(args.bind().await?, client::router()).await?,
        Command::Aggregator(args) => aggregator::run(args).await?,
        Command::Collector(args) => serve(args.bind().await?, collector::router()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves a test API router until SIGINT or SIGTERM.
async fn serve(listener: TcpListener, router: Router) -> Result<()> {
    let addr = listener.local_addr()?;
    eprintln!("duet serving on http://{addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server failed")?;
    eprintln!("shutting down");
    Ok(())
}

/// The routes every role has: `ready`, and 404 for any other test path. `ready` answers 200 when
/// `is_ready` says so, 503 otherwise.
fn common_routes<F, Fut>(is_ready: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    Router::new()
        .route(
            "/internal/test/ready",
            post(move || {
                let is_ready = is_ready.clone();
                async move {
                    match is_ready().await {
                        Ok(()) => reply(json!({})),
                        Err(e) => with_status(
                            StatusCode::SERVICE_UNAVAILABLE,
                            json!({"status": "error", "error": e}),
                        ),
                    }
                }
            }),
        )
        .route("/internal/test/{*rest}", any(unknown_test_path))
}

async fn unknown_test_path(uri: axum::http::Uri) -> Response {
    with_status(
        StatusCode::NOT_FOUND,
        json!({"status": "error", "error": format!("no test API at {}", uri.path())}),
    )
}

/// A 200 response with a JSON body.
fn reply(body: Value) -> Response {
    with_status(StatusCode::OK, body)
}

fn with_status(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `{"status": "success", …fields}` or `{"status": "error", "error": …}`, logged.
fn outcome(endpoint: &str, result: Result<Value, String>) -> Response {
    match result {
        Ok(mut fields) => {
            tracing::info!(endpoint, "success");
            if let Value::Object(map) = &mut fields {
                map.insert("status".into(), "success".into());
            }
            reply(fields)
        }
        Err(e) => {
            tracing::warn!(endpoint, error = %e, "failed");
            reply(json!({"status": "error", "error": e}))
        }
    }
}

/// A request body that did not parse: a 400 in the API's error shape.
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        with_status(
            StatusCode::BAD_REQUEST,
            json!({"status": "error", "error": self.0}),
        )
    }
}

/// Parses a request body.
fn parse<T: DeserializeOwned>(endpoint: &str, body: &Bytes) -> Result<T, BadRequest> {
    serde_json::from_slice(body).map_err(|e| {
        tracing::warn!(endpoint, error = %e, "unparsable request");
        BadRequest(format!("bad {endpoint} request: {e}"))
    })
}

/// Checks that a token can be sent as an HTTP header value, as the draft requires.
fn header_safe(field: &str, token: &str) -> Result<(), String> {
    if token.is_empty() || axum::http::HeaderValue::from_str(token).is_err() {
        return Err(format!(
            "\"{field}\" must be a non-empty, header-safe string"
        ));
    }
    Ok(())
}

/// An HTTP client for DAP requests to the aggregators.
fn http_client() -> Result<reqwest::Client, String> {
    // No redirects: requests carry tokens, which a redirect would send to another host.
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("could not build the HTTP client: {e}"))
}

/// Resolves on SIGINT or SIGTERM (how a test runner stops a container).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
