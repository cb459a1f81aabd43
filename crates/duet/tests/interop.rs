//! The interop test API end to end: four `duet interop` processes (client, Leader, Helper and
//! collector, the Leader and the Helper being two `aggregator` processes) driven through the
//! sequence of draft-dcook-ppm-dap-interop-test-design-07 ("Test Runner Operation"), with the
//! VDAFs, measurements and JSON shapes of Janus 0.7's interop end-to-end test.
//!
//! Mixed pairs (a Duet Leader with another implementation's Helper, and the reverse) run when
//! `DUET_INTEROP_PEER_AGGREGATOR` names a command that starts a peer's interop aggregator, with
//! `{port}` standing for the loopback port it must listen on, for example
//! `DUET_INTEROP_PEER_AGGREGATOR="/opt/janus/run-interop-aggregator.sh {port}"`. The command
//! runs in its own process group, which is killed when the test ends. Without the variable those
//! two tests say so and pass.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use duet_core::{Clock, RealClock};
use serde_json::{json, Value};

/// Time precision of every task, as in Janus's end-to-end test.
const TIME_PRECISION: u64 = 3600;
/// Bound on each test as a whole.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// One `duet interop ROLE` process, killed on drop.
struct Role {
    child: Child,
    /// `http://127.0.0.1:PORT`, no trailing slash.
    url: String,
    /// Whether the child leads a process group of its own (a peer's launcher and what it
    /// started), to be killed as a whole.
    group: bool,
}

impl Role {
    /// Starts `duet interop ROLE --listen 127.0.0.1:0 EXTRA…` and reads the bound address from
    /// the first line of its standard error; later lines are forwarded to the test's output.
    fn spawn(name: &'static str, role: &str, extra: &[&str]) -> Role {
        let mut child = Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["interop", role, "--listen", "127.0.0.1:0", "--log"])
            .arg("warn,duet=info")
            .args(extra)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start duet");
        let stderr = child.stderr.take().expect("piped stderr");
        let (first_line, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines().map_while(Result::ok);
            if let Some(first) = lines.next() {
                let _ = first_line.send(first);
            }
            for line in lines {
                eprintln!("[{name}] {line}");
            }
        });
        let mut role = Role {
            child,
            url: String::new(),
            group: false,
        };
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{name} did not start ({e})"));
        let addr = first
            .strip_prefix("duet serving on ")
            .unwrap_or_else(|| panic!("{name}'s first line is not the address: {first}"));
        role.url = addr.trim_end_matches('/').to_owned();
        role
    }
}

impl Role {
    /// Starts a peer's interop aggregator from `template` (a command line in which `{port}` is
    /// replaced by a free loopback port), in a process group of its own.
    fn spawn_peer(name: &'static str, template: &str) -> Role {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("find a free port")
            .port();
        let command = template.replace("{port}", &port.to_string());
        let mut child = Command::new("sh")
            .args(["-c", &command])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({command}): {e}"));
        let (stdout, stderr) = (
            child.stdout.take().expect("piped stdout"),
            child.stderr.take().expect("piped stderr"),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
            }
        });
        Role {
            child,
            url: format!("http://127.0.0.1:{port}"),
            group: true,
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if self.group {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which aggregator processes a deployment runs.
enum Aggregators {
    /// Two Duet aggregators.
    Duet,
    /// One Duet aggregator, the Leader and Helper of every task.
    OneDuet,
    /// A Duet Leader and a peer's Helper, started from this command template.
    DuetLeaderPeerHelper(String),
    /// A peer's Leader, started from this command template, and a Duet Helper.
    PeerLeaderDuetHelper(String),
}

/// The four processes, the aggregators on databases in a directory removed on drop.
struct Deployment {
    client: Role,
    leader: Role,
    /// `None` when the Leader's process is the Helper too.
    helper: Option<Role>,
    collector: Role,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Deployment {
    async fn start() -> Deployment {
        Self::start_with(Aggregators::Duet).await
    }

    async fn start_with(aggregators: Aggregators) -> Deployment {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = |name: &str| dir.path().join(name).display().to_string();
        let (leader_db, helper_db) = (db("leader.sqlite"), db("helper.sqlite"));
        let duet_leader = || Role::spawn("leader", "aggregator", &["--db", &leader_db]);
        let duet_helper = || Role::spawn("helper", "aggregator", &["--db", &helper_db]);
        let (leader, helper) = match &aggregators {
            Aggregators::Duet => (duet_leader(), Some(duet_helper())),
            Aggregators::OneDuet => (duet_leader(), None),
            Aggregators::DuetLeaderPeerHelper(peer) => {
                (duet_leader(), Some(Role::spawn_peer("peer helper", peer)))
            }
            Aggregators::PeerLeaderDuetHelper(peer) => {
                (Role::spawn_peer("peer leader", peer), Some(duet_helper()))
            }
        };
        let d = Deployment {
            client: Role::spawn("client", "client", &[]),
            leader,
            helper,
            collector: Role::spawn("collector", "collector", &[]),
            http: reqwest::Client::new(),
            _dir: dir,
        };
        for role in [&d.client, &d.leader, d.helper(), &d.collector] {
            d.await_ready(role).await;
        }
        d
    }

    fn helper(&self) -> &Role {
        self.helper.as_ref().unwrap_or(&self.leader)
    }

    /// Retries `/internal/test/ready` until it answers 200 with `{}`.
    async fn await_ready(&self, role: &Role) {
        // A peer may need a while to set up its own database.
        for _ in 0..600 {
            let url = format!("{}/internal/test/ready", role.url);
            if let Ok(resp) = self.http.post(url).body("{}").send().await {
                if resp.status() == 200 {
                    assert_eq!(resp.text().await.expect("body"), "{}");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} never became ready", role.url);
    }

    /// POSTs JSON to a test endpoint; returns the HTTP status and the JSON answer.
    async fn post(&self, role: &Role, endpoint: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/internal/test/{endpoint}", role.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {endpoint}: {e}"));
        let status = resp.status().as_u16();
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{endpoint}"
        );
        let text = resp.text().await.expect("body");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{endpoint} answered non-JSON ({e}): {text}"));
        (status, value)
    }

    /// POSTs and requires 200 with `"status": "success"`.
    async fn ok(&self, role: &Role, endpoint: &str, body: &Value) -> Value {
        let (status, value) = self.post(role, endpoint, body).await;
        assert_eq!(status, 200, "{endpoint}: {value}");
        assert_eq!(value["status"], "success", "{endpoint}: {value}");
        value
    }

    /// The draft's sequence for one task; returns the completed `collection_poll` answer.
    async fn run(&self, vdaf: Value, measurements: &[Value]) -> Value {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let task_id = b64(&rand::random::<[u8; 32]>());
        let aggregator_token = b64(&rand::random::<[u8; 16]>());
        let collector_token = b64(&rand::random::<[u8; 16]>());
        let verify_key = b64(&rand::random::<[u8; 16]>());

        let mut endpoints = Vec::new();
        for (role, name) in [(&self.leader, "leader"), (self.helper(), "helper")] {
            let answer = self
                .ok(
                    role,
                    "endpoint_for_task",
                    &json!({"task_id": task_id, "role": name, "hostname": "127.0.0.1"}),
                )
                .await;
            let endpoint = answer["endpoint"].as_str().expect("endpoint").to_owned();
            // Janus's runner requires "/" (it builds `http://NAME:8080/` itself).
            assert_eq!(endpoint, "/");
            // A relative endpoint is joined to the aggregator's own address.
            let base = url::Url::parse(&format!("{}/", role.url)).expect("url");
            endpoints.push(base.join(&endpoint).expect("join").to_string());
        }
        let (leader, helper) = (&endpoints[0], &endpoints[1]);

        let answer = self
            .ok(
                &self.collector,
                "add_task",
                &json!({
                    "task_id": task_id,
                    "leader": leader,
                    "vdaf": vdaf,
                    "collector_authentication_token": collector_token,
                    "query_type": 1,
                }),
            )
            .await;
        let collector_hpke_config = answer["collector_hpke_config"]
            .as_str()
            .expect("collector_hpke_config");
        URL_SAFE_NO_PAD
            .decode(collector_hpke_config)
            .expect("unpadded base64url");

        let mut add_task = json!({
            "task_id": task_id,
            "leader": leader,
            "helper": helper,
            "vdaf": vdaf,
            "leader_authentication_token": aggregator_token,
            "collector_authentication_token": collector_token,
            "role": "leader",
            "vdaf_verify_key": verify_key,
            "max_batch_query_count": 1,
            "query_type": 1,
            "min_batch_size": measurements.len(),
            "time_precision": TIME_PRECISION,
            "collector_hpke_config": collector_hpke_config,
        });
        self.ok(&self.leader, "add_task", &add_task).await;
        add_task["role"] = "helper".into();
        add_task
            .as_object_mut()
            .expect("object")
            .remove("collector_authentication_token");
        self.ok(self.helper(), "add_task", &add_task).await;

        let start = RealClock.now().0;
        for (i, measurement) in measurements.iter().enumerate() {
            let mut upload = json!({
                "task_id": task_id,
                "leader": leader,
                "helper": helper,
                "vdaf": vdaf,
                "measurement": measurement,
                "time_precision": TIME_PRECISION,
            });
            // Half the uploads name their time, as a runner may.
            if i % 2 == 1 {
                upload["time"] = RealClock.now().0.into();
            }
            self.ok(&self.client, "upload", &upload).await;
        }

        // As Janus's runner does: two time precisions from the hour of the first upload.
        let batch_interval_start = start - start % TIME_PRECISION;
        let answer = self
            .ok(
                &self.collector,
                "collection_start",
                &json!({
                    "task_id": task_id,
                    "agg_param": "",
                    "query": {
                        "type": 1,
                        "batch_interval_start": batch_interval_start,
                        "batch_interval_duration": 2 * TIME_PRECISION,
                    },
                }),
            )
            .await;
        let handle = answer["handle"].as_str().expect("handle string").to_owned();

        for _ in 0..300 {
            let (status, answer) = self
                .post(
                    &self.collector,
                    "collection_poll",
                    &json!({ "handle": handle }),
                )
                .await;
            assert_eq!(status, 200, "{answer}");
            match answer["status"].as_str() {
                Some("in progress") => tokio::time::sleep(Duration::from_millis(200)).await,
                Some("complete") => {
                    assert_eq!(
                        answer["report_count"].as_u64(),
                        Some(measurements.len() as u64),
                        "{answer}"
                    );
                    let interval_start = answer["interval_start"].as_u64().expect("number");
                    let interval_duration = answer["interval_duration"].as_u64().expect("number");
                    assert!(interval_start >= batch_interval_start, "{answer}");
                    assert!(
                        interval_start + interval_duration
                            <= batch_interval_start + 2 * TIME_PRECISION,
                        "{answer}"
                    );
                    assert_eq!(interval_duration % TIME_PRECISION, 0, "{answer}");
                    assert!(answer.get("batch_id").is_none(), "{answer}");
                    return answer;
                }
                _ => panic!("collection failed: {answer}"),
            }
        }
        panic!("collection did not complete in time");
    }
}

fn strings(values: &[&str]) -> Vec<Value> {
    values.iter().map(|v| json!(v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_duet_roles_aggregate_every_vdaf() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let d = Deployment::start().await;
        every_vdaf(&d).await;
    })
    .await
    .expect("the interop run timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_aggregator_process_can_be_leader_and_helper_of_a_task() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let d = Deployment::start_with(Aggregators::OneDuet).await;
        let buckets = strings(&["3", "0", "3"]);
        let answer = d
            .run(
                json!({"type": "Prio3Histogram", "length": "4", "chunk_length": "2"}),
                &buckets,
            )
            .await;
        assert_eq!(answer["result"], json!(["1", "0", "0", "2"]));
    })
    .await
    .expect("the interop run timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported_in_the_api_shape() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let d = Deployment::start().await;
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let task_id = b64(&[5; 32]);

        // Unknown test paths are 404 on every role; unparsable bodies are 400.
        for role in [&d.client, &d.leader, &d.collector] {
            let (status, _) = d.post(role, "fetch_batch_ids", &json!({})).await;
            assert_eq!(status, 404);
        }
        let (status, answer) = d.post(&d.leader, "add_task", &json!({"task_id": 3})).await;
        assert_eq!(
            (status, &answer["status"]),
            (400, &json!("error")),
            "{answer}"
        );

        // The collector accepts both query types, but no unknown VDAF.
        let answer = d
            .ok(
                &d.collector,
                "add_task",
                &json!({
                    "task_id": task_id,
                    "leader": format!("{}/", d.leader.url),
                    "vdaf": {"type": "Prio3Count"},
                    "collector_authentication_token": "token",
                    "query_type": 2,
                }),
            )
            .await;
        let collector_hpke_config = answer["collector_hpke_config"].clone();
        let (status, answer) = d
            .post(
                &d.collector,
                "add_task",
                &json!({
                    "task_id": b64(&[6; 32]),
                    "leader": format!("{}/", d.leader.url),
                    "vdaf": {"type": "Poplar1", "bits": "8"},
                    "collector_authentication_token": "token",
                    "query_type": 1,
                }),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(answer["status"], "error");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("Poplar1")),
            "{answer}"
        );

        // fixed_size is parsed and refused by the aggregator with a clear reason.
        let add_task = json!({
            "task_id": task_id,
            "leader": format!("{}/", d.leader.url),
            "helper": format!("{}/", d.helper().url),
            "vdaf": {"type": "Prio3Count"},
            "leader_authentication_token": "aggregator-token",
            "collector_authentication_token": "token",
            "role": "leader",
            "vdaf_verify_key": b64(&[1; 16]),
            "max_batch_query_count": "1",
            "query_type": 2,
            "min_batch_size": 10,
            "max_batch_size": null,
            "time_precision": 3600,
            "collector_hpke_config": collector_hpke_config,
        });
        let (status, answer) = d.post(&d.leader, "add_task", &add_task).await;
        assert_eq!(status, 200);
        assert_eq!(answer["status"], "error");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("fixed_size")),
            "{answer}"
        );

        // A fixed_size query is passed on to the Leader, which knows no such task here.
        let (status, answer) = d
            .post(
                &d.collector,
                "collection_start",
                &json!({"task_id": task_id, "agg_param": "", "query": {"type": 2, "subtype": 1}}),
            )
            .await;
        assert_eq!(
            (status, &answer["status"]),
            (200, &json!("error")),
            "{answer}"
        );

        // Uploads for a task the Leader does not know fail with the Leader's reason.
        let (status, answer) = d
            .post(
                &d.client,
                "upload",
                &json!({
                    "task_id": task_id,
                    "leader": format!("{}/", d.leader.url),
                    "helper": format!("{}/", d.helper().url),
                    "vdaf": {"type": "Prio3Count"},
                    "measurement": "1",
                    "time_precision": 3600,
                }),
            )
            .await;
        assert_eq!(
            (status, &answer["status"]),
            (200, &json!("error")),
            "{answer}"
        );
        assert!(answer["error"].is_string(), "{answer}");

        let (status, answer) = d
            .post(&d.collector, "collection_poll", &json!({"handle": "nope"}))
            .await;
        assert_eq!(
            (status, &answer["status"]),
            (200, &json!("error")),
            "{answer}"
        );
    })
    .await
    .expect("the error checks timed out");
}

/// The peer aggregator command from `DUET_INTEROP_PEER_AGGREGATOR`, or `None` (with a message).
fn peer_aggregator(test: &str) -> Option<String> {
    match std::env::var("DUET_INTEROP_PEER_AGGREGATOR") {
        Ok(command) if command.contains("{port}") => Some(command),
        Ok(command) => panic!("DUET_INTEROP_PEER_AGGREGATOR must contain {{port}}: {command}"),
        Err(_) => {
            println!(
                "skipping {test}: DUET_INTEROP_PEER_AGGREGATOR does not name a peer's interop \
                 aggregator (see this file's header)"
            );
            None
        }
    }
}

/// Every VDAF, with the measurements of Janus's interop end-to-end test, through whichever pair of
/// aggregators `d` runs.
async fn every_vdaf(d: &Deployment) {
    let counts = strings(&[
        "0", "1", "1", "0", "1", "0", "1", "0", "1", "1", "0", "1", "0", "1", "0", "0", "0", "0",
    ]);
    let answer = d.run(json!({"type": "Prio3Count"}), &counts).await;
    assert_eq!(answer["result"], json!("8"));

    let sums = strings(&["0", "10", "9", "21", "8", "12", "14"]);
    let answer = d
        .run(json!({"type": "Prio3Sum", "bits": "64"}), &sums)
        .await;
    assert_eq!(answer["result"], json!("74"));

    let vectors = [
        json!(["0", "0", "0", "10"]),
        json!(["0", "0", "10", "0"]),
        json!(["0", "10", "0", "0"]),
        json!(["10", "0", "0", "0"]),
        json!(["1", "2", "3", "4"]),
    ];
    let answer = d
        .run(
            json!({"type": "Prio3SumVec", "bits": "64", "length": "4", "chunk_length": "18"}),
            &vectors,
        )
        .await;
    assert_eq!(answer["result"], json!(["11", "12", "13", "14"]));

    let buckets = strings(&["0", "1", "2", "3", "4", "5", "5", "2"]);
    let answer = d
        .run(
            json!({"type": "Prio3Histogram", "length": "6", "chunk_length": "2"}),
            &buckets,
        )
        .await;
    assert_eq!(answer["result"], json!(["1", "1", "2", "1", "1", "2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duet_leader_with_peer_helper() {
    let Some(peer) = peer_aggregator("duet_leader_with_peer_helper") else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let d = Deployment::start_with(Aggregators::DuetLeaderPeerHelper(peer)).await;
        every_vdaf(&d).await;
    })
    .await
    .expect("the mixed run timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_leader_with_duet_helper() {
    let Some(peer) = peer_aggregator("peer_leader_with_duet_helper") else {
        return;
    };
    tokio::time::timeout(TEST_TIMEOUT, async {
        let d = Deployment::start_with(Aggregators::PeerLeaderDuetHelper(peer)).await;
        every_vdaf(&d).await;
    })
    .await
    .expect("the mixed run timed out");
}
