//! A Leader and a Helper in one process over one temporary SQLite file, on a loopback port.
#![allow(dead_code)]

use std::sync::Arc;

use duet_aggregator::server::{run, RoleConfig, Roles, RunningServer};
use duet_aggregator::AggregatorConfig;
use duet_core::hpke::HpkeKeypair;
use duet_core::task::{parse_endpoint, QueryTypeConfig};
use duet_core::{AggregatorRole, AuthenticationToken, Clock, RealClock, Task, VdafInstance};
use duet_messages::dap09::{Duration, HpkeConfigId, TaskId};
use duet_store::sqlite::SqliteDatastore;
use duet_store::Datastore;

pub struct Harness {
    pub server: Option<RunningServer>,
    pub leader_store: Arc<dyn Datastore>,
    pub helper_store: Arc<dyn Datastore>,
    pub leader_url: url::Url,
    pub helper_url: url::Url,
    pub _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(AggregatorConfig {
            polling_interval_ms: 200,
            ..AggregatorConfig::default()
        })
        .await
    }

    /// Starts the server with the given tunables.
    pub async fn start_with(config: AggregatorConfig) -> Self {
        Self::start_with_clock(config, Arc::new(RealClock)).await
    }

    /// Starts the server with the given tunables, its roles reading the time from `clock`.
    pub async fn start_with_clock(config: AggregatorConfig, clock: Arc<dyn Clock>) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), config, clock).await
    }

    /// Stops the server and starts another, with `config`, on the same database (on a new
    /// port).
    pub async fn restart_with(mut self, config: AggregatorConfig) -> Self {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("shutdown");
        }
        Self::start_in(self._dir, config, Arc::new(RealClock)).await
    }

    /// Starts the server on the database in `dir` (created if new).
    async fn start_in(
        dir: tempfile::TempDir,
        config: AggregatorConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let path = dir.path().join("duet.sqlite");
        let store = SqliteDatastore::connect(path.to_str().expect("utf-8 path"))
            .await
            .expect("open");
        let leader_store: Arc<dyn Datastore> = Arc::new(store.with_role(AggregatorRole::Leader));
        let helper_store: Arc<dyn Datastore> = Arc::new(store.with_role(AggregatorRole::Helper));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let roles = Roles {
            leader: Some(RoleConfig {
                store: Arc::clone(&leader_store),
                path_prefix: "/leader".into(),
            }),
            helper: Some(RoleConfig {
                store: Arc::clone(&helper_store),
                path_prefix: "/helper".into(),
            }),
        };
        let server = run(listener, roles, config, clock).await.expect("server");
        let addr = server.local_addr;
        Self {
            leader_url: parse_endpoint(&format!("http://{addr}/leader/")).expect("url"),
            helper_url: parse_endpoint(&format!("http://{addr}/helper/")).expect("url"),
            server: Some(server),
            leader_store,
            helper_store,
            _dir: dir,
        }
    }

    /// Provisions a task on both aggregators; returns it (Leader copy) and the collector's key.
    pub async fn task(&self, vdaf: VdafInstance, min_batch_size: u64) -> (Task, HpkeKeypair) {
        let helper = self.helper_url.clone();
        self.task_via(vdaf, min_batch_size, &helper).await
    }

    /// Provisions a task on both aggregators, with the Leader reaching the Helper at
    /// `helper_endpoint` (a proxy in front of it, say).
    pub async fn task_via(
        &self,
        vdaf: VdafInstance,
        min_batch_size: u64,
        helper_endpoint: &url::Url,
    ) -> (Task, HpkeKeypair) {
        let (task, collector_key) = self
            .leader_task(vdaf, min_batch_size, helper_endpoint)
            .await;
        self.helper_task(&task).await;
        (task, collector_key)
    }

    /// Provisions the Helper's copy of `task` (without the collector's token).
    pub async fn helper_task(&self, task: &Task) {
        self.helper_task_with(task, |_| {}).await;
    }

    /// [`Harness::helper_task`], with the Helper's copy of the task changed by `change` (a
    /// Helper whose settings differ from the Leader's).
    pub async fn helper_task_with(&self, task: &Task, change: impl FnOnce(&mut Task)) {
        let mut helper_task = task.clone();
        helper_task.collector_auth_token = None;
        change(&mut helper_task);
        self.helper_store
            .put_task(&helper_task)
            .await
            .expect("helper task");
    }

    /// Provisions a task on the Leader only, whose Helper is at `helper_endpoint`.
    pub async fn leader_task(
        &self,
        vdaf: VdafInstance,
        min_batch_size: u64,
        helper_endpoint: &url::Url,
    ) -> (Task, HpkeKeypair) {
        let collector_key = HpkeKeypair::generate(HpkeConfigId(1));
        let task = Task {
            id: TaskId::random(),
            leader_endpoint: self.leader_url.clone(),
            helper_endpoint: helper_endpoint.clone(),
            query_type: QueryTypeConfig::TimeInterval,
            vdaf,
            vdaf_verify_key: rand::random(),
            max_batch_query_count: 1,
            task_expiration: None,
            report_expiry_age: None,
            min_batch_size,
            time_precision: Duration(3600),
            tolerable_clock_skew: Duration(60),
            collector_hpke_config: collector_key.config.clone(),
            aggregator_auth_token: AuthenticationToken::random(),
            collector_auth_token: Some(AuthenticationToken::random()),
        };
        self.leader_store
            .put_task(&task)
            .await
            .expect("leader task");
        (task, collector_key)
    }

    /// Starts a second Leader on the same database that serves the API but runs no jobs
    /// (`run_jobs = false`), as a replica behind a load balancer may; returns it and its Leader
    /// URL. The caller shuts it down.
    pub async fn api_replica(&self) -> (RunningServer, url::Url) {
        let path = self._dir.path().join("duet.sqlite");
        let store = SqliteDatastore::connect(path.to_str().expect("utf-8 path"))
            .await
            .expect("open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let roles = Roles {
            leader: Some(RoleConfig {
                store: Arc::new(store.with_role(AggregatorRole::Leader)),
                path_prefix: "/leader".into(),
            }),
            helper: None,
        };
        let config = AggregatorConfig {
            run_jobs: false,
            ..AggregatorConfig::default()
        };
        let server = run(listener, roles, config, Arc::new(RealClock))
            .await
            .expect("server");
        let url = parse_endpoint(&format!("http://{}/leader/", server.local_addr)).expect("url");
        (server, url)
    }

    /// A connection of its own to the server's SQLite file, to look at or change stored rows.
    pub async fn sqlite(&self) -> sqlx::SqliteConnection {
        let path = self._dir.path().join("duet.sqlite");
        <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
            "sqlite://{}",
            path.display()
        ))
        .await
        .expect("open")
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("shutdown");
        }
    }
}

/// A raw HTTP response: status, content type and body.
pub struct Raw {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Raw {
    /// The problem document's `type`, if the body is one.
    pub fn problem_type(&self) -> Option<String> {
        if self.content_type != duet_messages::problem::PROBLEM_JSON {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["type"].as_str().map(str::to_string)
    }

    /// Asserts this is a problem document of the given DAP type.
    #[track_caller]
    pub fn assert_problem(&self, status: u16, problem: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.problem_type().as_deref(),
            Some(format!("urn:ietf:params:ppm:dap:error:{problem}").as_str()),
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
    }
}

/// Sends a request and reads the whole response.
pub async fn send(
    method: reqwest::Method,
    url: url::Url,
    content_type: Option<&str>,
    auth: Option<&AuthenticationToken>,
    body: Vec<u8>,
) -> Raw {
    let mut req = reqwest::Client::new().request(method, url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if let Some(token) = auth {
        let (name, value) = token.request_header();
        req = req.header(name, value);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.bytes().await.expect("body").to_vec();
    Raw {
        status,
        content_type,
        body,
    }
}

/// A client for a task that needs no network to prepare reports.
pub async fn client(task: &Task) -> duet_client::Client {
    duet_client::Client::new(
        duet_client::ClientParameters {
            task_id: task.id,
            leader_endpoint: task.leader_endpoint.clone(),
            helper_endpoint: task.helper_endpoint.clone(),
            time_precision: task.time_precision,
        },
        task.vdaf.clone(),
        reqwest::Client::new(),
    )
    .await
    .expect("client")
}
