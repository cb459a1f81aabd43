//! The DAP-09 client: turns a measurement into a report (shard, encrypt) and uploads it to the
//! Leader.
//!
//! A [`Client`] fetches both aggregators' HPKE configurations when it is built, and keeps them
//! for as long as the aggregators' `Cache-Control: max-age` allows (for good, without one), then
//! fetches them again before its next upload; when the Leader answers an upload with
//! `outdatedConfig` it fetches them again and retries that upload once, and an upload that fails
//! transiently (lost, or the Leader busy or failing) is sent again a few times. A client is
//! `Send + Sync`, so one instance behind an `Arc` can upload concurrently.
#![forbid(unsafe_code)]

mod error;

use duet_core::http::read_at_most;
use std::sync::{PoisonError, RwLock};

use duet_core::hpke::{check_suite, seal, HpkeApplicationInfo};
use duet_core::vdaf::Vdaf;
use duet_core::{Clock, Measurement, RealClock, VdafInstance};
use duet_messages::dap09::{
    media_type, Duration, HpkeConfig, HpkeConfigList, InputShareAad, PlaintextInputShare, Report,
    ReportId, ReportMetadata, Role, TaskId, Time,
};
use duet_messages::problem::DapProblemType;
use duet_messages::{Decode, Encode};

pub use error::ClientError;

/// Attempts at uploading one report when they fail transiently.
pub const UPLOAD_ATTEMPTS: u32 = 6;
/// The longest HPKE configuration list read from an aggregator: the most its 16-bit length
/// prefix can say (about 1,500 X25519 configs; an aggregator lists one per key it holds).
const HPKE_CONFIG_LIST_LIMIT: usize = 2 + u16::MAX as usize;
/// The pause after the first failed attempt; each next one is twice as long (0.1 to 1.6 s, about
/// 3 s in all).
const FIRST_UPLOAD_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// What a client must know about a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientParameters {
    /// The task the reports are for.
    pub task_id: TaskId,
    /// The Leader's DAP endpoint; a missing trailing `/` is added.
    pub leader_endpoint: url::Url,
    /// The Helper's DAP endpoint; a missing trailing `/` is added.
    pub helper_endpoint: url::Url,
    /// Report timestamps are rounded down to a multiple of this.
    pub time_precision: Duration,
}

/// The HPKE configurations a client encrypts to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HpkeConfigs {
    leader: HpkeConfig,
    helper: HpkeConfig,
    /// When they go stale, by the aggregators' `Cache-Control: max-age` (the sooner of the
    /// two) counted from the fetch; `None` if neither set one, or they came from the caller.
    stale_at: Option<Time>,
}

/// How long the refetch of stale HPKE configs may take before an upload goes on without it.
const STALE_REFETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Seconds stale HPKE configs are kept after a failed refetch before the next try.
const STALE_REFETCH_PAUSE: u64 = 60;

/// A DAP client for one task.
#[derive(Debug)]
pub struct Client<C: Clock = RealClock> {
    params: ClientParameters,
    vdaf: Vdaf,
    http: reqwest::Client,
    clock: C,
    // Replaced when the Leader says `outdatedConfig`; readers clone out and never hold the lock
    // across an await.
    hpke_configs: RwLock<HpkeConfigs>,
    /// Held by the one upload that refetches stale configs.
    refetching: tokio::sync::Mutex<()>,
}

impl Client {
    /// Fetches both aggregators' HPKE configs and builds a client on the system clock.
    pub async fn new(
        params: ClientParameters,
        vdaf: VdafInstance,
        http: reqwest::Client,
    ) -> Result<Client, ClientError> {
        Self::with_clock(params, vdaf, http, RealClock).await
    }
}

impl<C: Clock> Client<C> {
    /// Fetches both aggregators' HPKE configs and builds a client on the given clock.
    pub async fn with_clock(
        params: ClientParameters,
        vdaf: VdafInstance,
        http: reqwest::Client,
        clock: C,
    ) -> Result<Self, ClientError> {
        let params = normalize(params);
        let vdaf = instantiate(&vdaf)?;
        let configs = fetch_hpke_configs(&http, &params, clock.now()).await?;
        Ok(Self {
            params,
            vdaf,
            http,
            clock,
            hpke_configs: RwLock::new(configs),
            refetching: tokio::sync::Mutex::new(()),
        })
    }

    /// Builds a client that encrypts to configs the caller already has, without any request.
    ///
    /// Each config must use a supported suite. `upload` still refetches both on `outdatedConfig`.
    pub fn with_hpke_configs(
        params: ClientParameters,
        vdaf: VdafInstance,
        http: reqwest::Client,
        clock: C,
        leader_hpke_config: HpkeConfig,
        helper_hpke_config: HpkeConfig,
    ) -> Result<Self, ClientError> {
        let params = normalize(params);
        let vdaf = instantiate(&vdaf)?;
        for (who, config) in [
            (
                describe(Role::Leader, &params.leader_endpoint),
                &leader_hpke_config,
            ),
            (
                describe(Role::Helper, &params.helper_endpoint),
                &helper_hpke_config,
            ),
        ] {
            check_suite(config).map_err(|_| ClientError::NoSupportedHpkeConfig {
                aggregator: who,
                offered: describe_suites(std::slice::from_ref(config)),
            })?;
        }
        let configs = HpkeConfigs {
            leader: leader_hpke_config,
            helper: helper_hpke_config,
            stale_at: None,
        };
        Ok(Self {
            params,
            vdaf,
            http,
            clock,
            hpke_configs: RwLock::new(configs),
            refetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The task parameters (endpoints normalized to end in `/`).
    pub fn parameters(&self) -> &ClientParameters {
        &self.params
    }

    /// The HPKE configs currently in use, Leader's first.
    pub fn hpke_configs(&self) -> (HpkeConfig, HpkeConfig) {
        let configs = self
            .hpke_configs
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        (configs.leader.clone(), configs.helper.clone())
    }

    /// Fetches both aggregators' HPKE configs again and uses them from now on.
    pub async fn refresh_hpke_configs(&self) -> Result<(), ClientError> {
        let fresh = fetch_hpke_configs(&self.http, &self.params, self.clock.now()).await?;
        // The lock only guards a plain value, so a writer that panicked left nothing half-done.
        *self
            .hpke_configs
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// Fetches the HPKE configs again if the aggregators' cache lifetime for them has passed
    /// (DAP-09 §4.3: clients follow HTTP caching, and an aggregator keeps a retired key for
    /// twice that lifetime, so a client that never refetches would seal to a key since
    /// withdrawn). If the fetch fails, the stale configs serve, and an `outdatedConfig` answer
    /// still brings a refetch.
    ///
    /// One upload refetches while the others go on with the stale configs; the refetch may
    /// take [`STALE_REFETCH_TIMEOUT`], and after a failed one the configs are kept another
    /// [`STALE_REFETCH_PAUSE`] seconds, so that an aggregator that cannot be reached holds up
    /// no upload for long.
    async fn refresh_stale_hpke_configs(&self) {
        let stale_at = self
            .hpke_configs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stale_at;
        let now = self.clock.now();
        if stale_at.is_none_or(|at| now < at) {
            return;
        }
        let Ok(_refetching) = self.refetching.try_lock() else {
            return;
        };
        let fetched = tokio::time::timeout(
            STALE_REFETCH_TIMEOUT,
            fetch_hpke_configs(&self.http, &self.params, now),
        )
        .await;
        let mut configs = self
            .hpke_configs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match fetched {
            Ok(Ok(fresh)) => *configs = fresh,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {STALE_REFETCH_TIMEOUT:?}"),
                };
                tracing::debug!(error = %why, "refetching stale HPKE configs failed; using them");
                configs.stale_at = Some(Time(now.0.saturating_add(STALE_REFETCH_PAUSE)));
            }
        }
    }

    /// Shards and encrypts; time = clock.now() rounded down to time_precision; fresh random ReportId.
    pub fn prepare_report(&self, measurement: &Measurement) -> Result<Report, ClientError> {
        self.prepare_report_at(measurement, self.clock.now())
    }

    /// Shards and encrypts with the given time (rounded down to time_precision); fresh random ReportId.
    pub fn prepare_report_at(
        &self,
        measurement: &Measurement,
        time: Time,
    ) -> Result<Report, ClientError> {
        let configs = self.hpke_configs();
        prepare_report(
            &self.vdaf,
            &self.params.task_id,
            &configs.0,
            &configs.1,
            measurement,
            ReportMetadata {
                id: ReportId::random(),
                time: time.round_down(self.params.time_precision),
            },
        )
    }

    /// Prepares and uploads one report; on `outdatedConfig`, refetches the HPKE configs and
    /// retries once. A transient failure (the request or its answer lost, the Leader busy or
    /// failing) sends the same report again, up to [`UPLOAD_ATTEMPTS`] times in all with a
    /// growing pause: the same report, so that one the Leader stored before its answer was lost
    /// is counted once (the Leader keeps the first upload of a report ID).
    pub async fn upload(&self, measurement: &Measurement) -> Result<(), ClientError> {
        self.upload_at(measurement, None).await
    }

    /// [`Client::upload`] of a report with the given time (rounded down to the task's time
    /// precision) instead of the clock's, if there is one.
    pub async fn upload_at(
        &self,
        measurement: &Measurement,
        time: Option<Time>,
    ) -> Result<(), ClientError> {
        let prepare =
            || self.prepare_report_at(measurement, time.unwrap_or_else(|| self.clock.now()));
        self.refresh_stale_hpke_configs().await;
        let report = prepare()?;
        match self.upload_with_retries(&report).await {
            // Not after an attempt that may have been stored: a new report would count twice.
            Err(e)
                if e.problem_type() == Some(DapProblemType::OutdatedConfig)
                    && !matches!(e, ClientError::OutcomeUnknown(_)) =>
            {
                tracing::debug!(error = %e, "HPKE config outdated; refetching and retrying once");
                self.refresh_hpke_configs().await?;
                let report = prepare()?;
                self.upload_with_retries(&report).await
            }
            other => other,
        }
    }

    /// [`Client::upload_report`], retried after transient failures. If it fails in the end
    /// after an attempt that may have been stored, the error is [`ClientError::OutcomeUnknown`].
    async fn upload_with_retries(&self, report: &Report) -> Result<(), ClientError> {
        let mut pause = FIRST_UPLOAD_PAUSE;
        let mut attempt = 1;
        let mut maybe_stored = false;
        loop {
            match self.try_upload(report).await {
                Err((e, sent)) if e.is_transient() && attempt < UPLOAD_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "upload failed; sending it again");
                    maybe_stored |= sent;
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Ok(()) => return Ok(()),
                Err((e, sent)) if maybe_stored || sent => {
                    return Err(ClientError::OutcomeUnknown(Box::new(e)))
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Uploads a prepared report (`PUT {leader}tasks/{task_id}/reports`); any 2xx is success.
    pub async fn upload_report(&self, report: &Report) -> Result<(), ClientError> {
        self.try_upload(report).await.map_err(|(e, _)| e)
    }

    /// [`Client::upload_report`], saying with a failure whether the report may have been
    /// stored all the same: its request may have gone out and no answer came back (a timeout,
    /// a connection lost midway), or the answer was a server error (a proxy's 502 or 504, say).
    /// A connection never made, or a refusal (4xx), stored nothing. (A request timeout counts
    /// as "may have been sent" even if it ran out while connecting: give the HTTP client a
    /// `connect_timeout` shorter than its `timeout`, as `duet upload` does, to tell them apart.)
    async fn try_upload(&self, report: &Report) -> Result<(), (ClientError, bool)> {
        let leader = describe(Role::Leader, &self.params.leader_endpoint);
        let url = join(
            &self.params.leader_endpoint,
            &format!("tasks/{}/reports", self.params.task_id),
        )
        .map_err(|e| (e, false))?;
        let response = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, media_type::REPORT)
            .body(report.get_encoded())
            .send()
            .await
            .map_err(|e| {
                let sent = !e.is_connect() && !e.is_builder();
                let e = ClientError::Http {
                    action: format!("upload the report to {leader}"),
                    message: error_chain(&e),
                };
                (e, sent)
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let e = error::error_from_response(response, format!("{leader} rejected the report")).await;
        Err((e, status.is_server_error()))
    }
}

/// Shards a measurement and seals each input share to its aggregator, with the given metadata.
fn prepare_report(
    vdaf: &Vdaf,
    task_id: &TaskId,
    leader_config: &HpkeConfig,
    helper_config: &HpkeConfig,
    measurement: &Measurement,
    metadata: ReportMetadata,
) -> Result<Report, ClientError> {
    let (public_share, leader_share, helper_share) = vdaf
        .shard(measurement, &metadata.id)
        .map_err(|e| ClientError::Vdaf(e.to_string()))?;
    let aad = InputShareAad {
        task_id: *task_id,
        metadata,
        public_share: public_share.clone(),
    }
    .get_encoded();
    let seal_to = |config: &HpkeConfig, server: Role, payload: Vec<u8>| {
        let plaintext = PlaintextInputShare {
            extensions: vec![],
            payload,
        }
        .get_encoded();
        seal(
            config,
            &HpkeApplicationInfo::InputShare { server },
            &plaintext,
            &aad,
        )
        .map_err(|e| {
            ClientError::Hpke(format!(
                "could not encrypt the {}'s input share: {e}",
                role_name(server)
            ))
        })
    };
    let leader_encrypted_input_share = seal_to(leader_config, Role::Leader, leader_share)?;
    let helper_encrypted_input_share = seal_to(helper_config, Role::Helper, helper_share)?;
    Ok(Report {
        metadata,
        public_share,
        leader_encrypted_input_share,
        helper_encrypted_input_share,
    })
}

fn instantiate(vdaf: &VdafInstance) -> Result<Vdaf, ClientError> {
    vdaf.instantiate()
        .map_err(|e| ClientError::Vdaf(e.to_string()))
}

/// Gives each endpoint a trailing `/`, so that relative paths join beneath it.
fn normalize(mut params: ClientParameters) -> ClientParameters {
    for url in [&mut params.leader_endpoint, &mut params.helper_endpoint] {
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
    }
    params
}

fn join(base: &url::Url, path: &str) -> Result<url::Url, ClientError> {
    base.join(path).map_err(|e| ClientError::Http {
        action: format!("build a request URL from {base} and {path}"),
        message: e.to_string(),
    })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "Leader",
        Role::Helper => "Helper",
        Role::Client => "Client",
        Role::Collector => "Collector",
    }
}

/// "the Leader at http://…", for error messages.
fn describe(role: Role, endpoint: &url::Url) -> String {
    format!("the {} at {endpoint}", role_name(role))
}

fn describe_suites(configs: &[HpkeConfig]) -> String {
    let suites: Vec<String> = configs
        .iter()
        .map(|c| {
            format!(
                "id {}: {:#06x}/{:#06x}/{:#06x}",
                c.id, c.kem_id.0, c.kdf_id.0, c.aead_id.0
            )
        })
        .collect();
    if suites.is_empty() {
        "none".to_owned()
    } else {
        suites.join(", ")
    }
}

/// A reqwest error with its sources, which carry the useful part ("connection refused").
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Both aggregators' HPKE configs, fetched at `now`.
async fn fetch_hpke_configs(
    http: &reqwest::Client,
    params: &ClientParameters,
    now: Time,
) -> Result<HpkeConfigs, ClientError> {
    let leader = fetch_hpke_config(http, &params.task_id, Role::Leader, &params.leader_endpoint);
    let helper = fetch_hpke_config(http, &params.task_id, Role::Helper, &params.helper_endpoint);
    let (leader, helper) = tokio::join!(leader, helper);
    let ((leader, leader_max_age), (helper, helper_max_age)) = (leader?, helper?);
    let max_age = match (leader_max_age, helper_max_age) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(HpkeConfigs {
        leader,
        helper,
        stale_at: max_age.map(|age| Time(now.0.saturating_add(age))),
    })
}

/// How long a response may be kept, in seconds, by its `Cache-Control` header: `max-age`, or 0
/// for `no-cache` and `no-store`; `None` without either.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let mut age = None;
    for value in headers.get_all(reqwest::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-cache" || lower == "no-store" {
                return Some(0);
            }
            if let Some(n) = lower.strip_prefix("max-age=") {
                if let Ok(n) = n.trim_matches('"').parse::<u64>() {
                    age = Some(age.map_or(n, |a: u64| a.min(n)));
                }
            }
        }
    }
    age
}

/// `GET {endpoint}hpke_config?task_id=…`; returns the first config with a supported suite, and
/// how long the answer may be kept (see [`max_age`]).
async fn fetch_hpke_config(
    http: &reqwest::Client,
    task_id: &TaskId,
    role: Role,
    endpoint: &url::Url,
) -> Result<(HpkeConfig, Option<u64>), ClientError> {
    let who = describe(role, endpoint);
    let mut url = join(endpoint, "hpke_config")?;
    url.query_pairs_mut()
        .append_pair("task_id", &task_id.to_string());
    let http_error = |e: reqwest::Error| ClientError::Http {
        action: format!("fetch the HPKE configuration of {who}"),
        message: error_chain(&e),
    };
    let response = http.get(url).send().await.map_err(http_error)?;
    if !response.status().is_success() {
        let context = format!("{who} refused the HPKE configuration request");
        return Err(error::error_from_response(response, context).await);
    }
    let max_age = max_age(response.headers());
    let (body, whole) = read_at_most(response, HPKE_CONFIG_LIST_LIMIT)
        .await
        .map_err(http_error)?;
    if !whole {
        return Err(ClientError::Codec(format!(
            "the HPKE configuration list from {who} is longer than {HPKE_CONFIG_LIST_LIMIT} bytes"
        )));
    }
    let list = HpkeConfigList::get_decoded(&body).map_err(|e| {
        ClientError::Codec(format!(
            "the HPKE configuration list from {who} is malformed: {e}"
        ))
    })?;
    Ok((pick_config(&who, list)?, max_age))
}

/// The first config (the server's preferred order) whose suite Duet supports.
fn pick_config(who: &str, list: HpkeConfigList) -> Result<HpkeConfig, ClientError> {
    let offered = describe_suites(&list.0);
    list.0
        .into_iter()
        .find(|c| check_suite(c).is_ok())
        .ok_or_else(|| ClientError::NoSupportedHpkeConfig {
            aggregator: who.to_owned(),
            offered,
        })
}

#[cfg(test)]
mod tests;
