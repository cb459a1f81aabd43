//! The task model: everything an aggregator needs to know about one DAP task.
//!
//! A task is provisioned out of band on the Leader, the Helper and the collector. [`TaskParameters`]
//! is its portable, serializable form (what `duet task create` writes and `duet task import`
//! reads); [`Task`] is the validated form the protocol code works with.

use duet_messages::dap09::{Duration, HpkeConfig, TaskId, Time};
use duet_messages::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::auth::AuthenticationToken;
use crate::error::CoreError;
use crate::hpke::{b64, check_suite, unb64};
use crate::vdaf::{VdafInstance, VERIFY_KEY_LENGTH};

/// Which aggregator this process is for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregatorRole {
    /// Receives uploads, drives aggregation and collection.
    Leader,
    /// Answers the Leader.
    Helper,
}

impl AggregatorRole {
    /// The DAP wire role.
    pub fn as_role(self) -> duet_messages::dap09::Role {
        match self {
            Self::Leader => duet_messages::dap09::Role::Leader,
            Self::Helper => duet_messages::dap09::Role::Helper,
        }
    }
}

/// How reports are grouped into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum QueryTypeConfig {
    /// Batches are time intervals chosen by the collector.
    TimeInterval,
    /// Batches are chosen by the Leader (not yet served by Duet's aggregators).
    FixedSize {
        /// Upper bound on a batch's size.
        max_batch_size: Option<u64>,
    },
}

/// A validated task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The task ID.
    pub id: TaskId,
    /// The Leader's DAP endpoint (ends in `/`).
    pub leader_endpoint: url::Url,
    /// The Helper's DAP endpoint (ends in `/`).
    pub helper_endpoint: url::Url,
    /// The query type.
    pub query_type: QueryTypeConfig,
    /// The VDAF.
    pub vdaf: VdafInstance,
    /// The shared VDAF verify key.
    pub vdaf_verify_key: [u8; VERIFY_KEY_LENGTH],
    /// How many times a batch may be queried.
    pub max_batch_query_count: u64,
    /// Reports after this time are rejected.
    pub task_expiration: Option<Time>,
    /// Reports older than this (relative to now) are rejected.
    pub report_expiry_age: Option<Duration>,
    /// The smallest batch that may be collected.
    pub min_batch_size: u64,
    /// Batch boundaries and report timestamps are multiples of this.
    pub time_precision: Duration,
    /// How far ahead of our clock a report's timestamp may be.
    pub tolerable_clock_skew: Duration,
    /// Aggregate shares are sealed to this.
    pub collector_hpke_config: HpkeConfig,
    /// The token the Leader presents to the Helper.
    pub aggregator_auth_token: AuthenticationToken,
    /// The token the collector presents to the Leader (Leader only).
    pub collector_auth_token: Option<AuthenticationToken>,
}

/// The portable form of a task, with byte strings as unpadded base64url.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskParameters {
    /// Task ID (base64url, 32 bytes).
    pub task_id: String,
    /// Leader endpoint URL.
    pub leader_endpoint: String,
    /// Helper endpoint URL.
    pub helper_endpoint: String,
    /// Query type.
    pub query_type: QueryTypeConfig,
    /// VDAF.
    pub vdaf: VdafInstance,
    /// Verify key (base64url, 16 bytes).
    pub vdaf_verify_key: String,
    /// Maximum batch query count.
    pub max_batch_query_count: u64,
    /// Task expiration, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_expiration: Option<u64>,
    /// Report expiry age, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_expiry_age: Option<u64>,
    /// Minimum batch size.
    pub min_batch_size: u64,
    /// Time precision, seconds.
    pub time_precision: u64,
    /// Tolerable clock skew, seconds.
    pub tolerable_clock_skew: u64,
    /// Collector HPKE config (base64url of the encoded `HpkeConfig`).
    pub collector_hpke_config: String,
    /// Leader → Helper token.
    pub aggregator_auth_token: AuthenticationToken,
    /// Collector → Leader token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector_auth_token: Option<AuthenticationToken>,
}

fn with_slash(u: url::Url) -> url::Url {
    if u.path().ends_with('/') {
        u
    } else {
        let mut u = u;
        let p = format!("{}/", u.path());
        u.set_path(&p);
        u
    }
}

/// Parses an endpoint URL, adding a trailing `/` so relative paths join under it.
pub fn parse_endpoint(s: &str) -> Result<url::Url, CoreError> {
    let u = url::Url::parse(s)
        .map_err(|e| CoreError::InvalidParameter(format!("bad URL '{s}': {e}")))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(CoreError::InvalidParameter(format!(
            "URL '{s}' must be http or https"
        )));
    }
    Ok(with_slash(u))
}

impl Task {
    /// Validates portable parameters.
    pub fn from_parameters(p: &TaskParameters) -> Result<Self, CoreError> {
        let bad = |m: String| CoreError::InvalidParameter(m);
        let id: TaskId = p
            .task_id
            .parse()
            .map_err(|_| bad(format!("bad task_id '{}'", p.task_id)))?;
        let vk = unb64(&p.vdaf_verify_key)?;
        let vdaf_verify_key: [u8; VERIFY_KEY_LENGTH] = vk.try_into().map_err(|v: Vec<u8>| {
            bad(format!(
                "vdaf_verify_key must be {VERIFY_KEY_LENGTH} bytes, got {}",
                v.len()
            ))
        })?;
        let collector_hpke_config = HpkeConfig::get_decoded(&unb64(&p.collector_hpke_config)?)?;
        check_suite(&collector_hpke_config)?;
        if p.time_precision == 0 {
            return Err(bad("time_precision must be at least 1 second".into()));
        }
        if p.min_batch_size == 0 {
            return Err(bad("min_batch_size must be at least 1".into()));
        }
        if p.max_batch_query_count == 0 {
            return Err(bad("max_batch_query_count must be at least 1".into()));
        }
        p.vdaf.instantiate()?;
        Ok(Self {
            id,
            leader_endpoint: parse_endpoint(&p.leader_endpoint)?,
            helper_endpoint: parse_endpoint(&p.helper_endpoint)?,
            query_type: p.query_type,
            vdaf: p.vdaf.clone(),
            vdaf_verify_key,
            max_batch_query_count: p.max_batch_query_count,
            task_expiration: p.task_expiration.map(Time),
            report_expiry_age: p.report_expiry_age.map(Duration),
            min_batch_size: p.min_batch_size,
            time_precision: Duration(p.time_precision),
            tolerable_clock_skew: Duration(p.tolerable_clock_skew),
            collector_hpke_config,
            aggregator_auth_token: p.aggregator_auth_token.clone(),
            collector_auth_token: p.collector_auth_token.clone(),
        })
    }

    /// Checks what a new task needs beyond what a stored one is read with: tokens that are not
    /// empty (an empty token authenticates nobody, so such a task could never be used).
    pub fn check_new(&self) -> Result<(), CoreError> {
        let bad = |m: &str| Err(CoreError::InvalidParameter(m.into()));
        if self.aggregator_auth_token.token().is_empty() {
            return bad("aggregator_auth_token must not be empty");
        }
        if self
            .collector_auth_token
            .as_ref()
            .is_some_and(|t| t.token().is_empty())
        {
            return bad("collector_auth_token must not be empty");
        }
        Ok(())
    }

    /// The portable form.
    pub fn to_parameters(&self) -> TaskParameters {
        TaskParameters {
            task_id: self.id.to_string(),
            leader_endpoint: self.leader_endpoint.to_string(),
            helper_endpoint: self.helper_endpoint.to_string(),
            query_type: self.query_type,
            vdaf: self.vdaf.clone(),
            vdaf_verify_key: b64(&self.vdaf_verify_key),
            max_batch_query_count: self.max_batch_query_count,
            task_expiration: self.task_expiration.map(|t| t.0),
            report_expiry_age: self.report_expiry_age.map(|d| d.0),
            min_batch_size: self.min_batch_size,
            time_precision: self.time_precision.0,
            tolerable_clock_skew: self.tolerable_clock_skew.0,
            collector_hpke_config: b64(&self.collector_hpke_config.get_encoded()),
            aggregator_auth_token: self.aggregator_auth_token.clone(),
            collector_auth_token: self.collector_auth_token.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpke::HpkeKeypair;
    use duet_messages::dap09::HpkeConfigId;

    #[test]
    fn parameters_round_trip_and_validate() {
        let task = Task {
            id: TaskId([3; 32]),
            leader_endpoint: parse_endpoint("http://127.0.0.1:1/leader").expect("url"),
            helper_endpoint: parse_endpoint("http://127.0.0.1:2/").expect("url"),
            query_type: QueryTypeConfig::TimeInterval,
            vdaf: VdafInstance::Prio3Count,
            vdaf_verify_key: [9; 16],
            max_batch_query_count: 1,
            task_expiration: None,
            report_expiry_age: None,
            min_batch_size: 10,
            time_precision: Duration(3600),
            tolerable_clock_skew: Duration(60),
            collector_hpke_config: HpkeKeypair::generate(HpkeConfigId(1)).config,
            aggregator_auth_token: AuthenticationToken::random(),
            collector_auth_token: None,
        };
        assert_eq!(task.leader_endpoint.as_str(), "http://127.0.0.1:1/leader/");
        let p = task.to_parameters();
        let json = serde_json::to_string(&p).expect("json");
        let back: TaskParameters = serde_json::from_str(&json).expect("json");
        assert_eq!(Task::from_parameters(&back).expect("valid"), task);
        let mut bad = p.clone();
        bad.vdaf_verify_key = b64(&[1; 15]);
        assert!(Task::from_parameters(&bad)
            .unwrap_err()
            .to_string()
            .contains("16 bytes"));
        // Empty tokens: a stored task is still read (requests for it fail authentication), a
        // new one is refused.
        assert!(task.check_new().is_ok());
        let mut empty = p.clone();
        empty.aggregator_auth_token = AuthenticationToken::DapAuth(String::new());
        let empty = Task::from_parameters(&empty).expect("read");
        assert!(empty
            .check_new()
            .unwrap_err()
            .to_string()
            .contains("aggregator_auth_token"));
        let mut empty = p;
        empty.collector_auth_token = Some(AuthenticationToken::Bearer(String::new()));
        let empty = Task::from_parameters(&empty).expect("read");
        assert!(empty
            .check_new()
            .unwrap_err()
            .to_string()
            .contains("collector_auth_token"));
    }
}
