//! A Leader and a Helper in one process over one temporary SQLite file, on a loopback port.
#![allow(dead_code)]

use std::sync::Arc;

use duet_aggregator::server::{run, RoleConfig, Roles, RunningServer};
use duet_aggregator::AggregatorConfig;
use duet_core::hpke::HpkeKeypair;
use duet_core::task::{parse_endpoint, QueryTypeConfig};
use duet_core::{AggregatorRole, AuthenticationToken, RealClock, Task, VdafInstance};
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
        let dir = tempfile::tempdir().expect("tempdir");
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
        let config = AggregatorConfig {
            polling_interval_ms: 200,
            ..AggregatorConfig::default()
        };
        let server = run(listener, roles, config, Arc::new(RealClock))
            .await
            .expect("server");
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
        let collector_key = HpkeKeypair::generate(HpkeConfigId(1));
        let task = Task {
            id: TaskId::random(),
            leader_endpoint: self.leader_url.clone(),
            helper_endpoint: self.helper_url.clone(),
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
        let mut helper_task = task.clone();
        helper_task.collector_auth_token = None;
        self.helper_store
            .put_task(&helper_task)
            .await
            .expect("helper task");
        (task, collector_key)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.expect("shutdown");
        }
    }
}
