//! The DAP-09 collector: creates and polls collection jobs at the Leader, then decrypts and
//! unshards the two aggregate shares.
//!
//! The HTTP side lives in [`Collector`]; the cryptographic end of collection is the pure
//! [`decrypt_collection`], usable (and tested) without a server.
#![forbid(unsafe_code)]

mod decrypt;
mod error;

use std::sync::{Mutex, PoisonError};

use duet_core::hpke::{check_suite, HpkeKeypair};
use duet_core::http::read_at_most;
use duet_core::vdaf::Vdaf;
use duet_core::{AggregateResult, AuthenticationToken, VdafInstance};
use duet_messages::dap09::{
    media_type, BatchId, Collection, CollectionJobId, CollectionReq, Interval, Query, TaskId,
};
use duet_messages::{Decode, Encode};

pub use decrypt::{batch_selector, decrypt_collection};
pub use error::CollectorError;

/// First wait between polls of a collection job.
const INITIAL_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between polls, unless the Leader asks for more with `Retry-After`.
const MAX_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// What a collector must know about a task.
#[derive(Clone, Debug)]
pub struct CollectorParameters {
    /// The task to collect.
    pub task_id: TaskId,
    /// The Leader's DAP endpoint; a missing trailing `/` is added.
    pub leader_endpoint: url::Url,
    /// Presented to the Leader on every request.
    pub auth_token: AuthenticationToken,
    /// The keypair the aggregators seal aggregate shares to.
    pub hpke_keypair: HpkeKeypair,
}

/// The outcome of a finished collection job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionResult {
    /// Number of reports in the batch.
    pub report_count: u64,
    /// Smallest time_precision-aligned interval covering the reports' timestamps.
    pub interval: Interval,
    /// The batch the Leader chose, for fixed_size queries.
    pub batch_id: Option<BatchId>,
    /// The aggregate.
    pub aggregate: AggregateResult,
}

/// The state of a collection job after one poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// Not finished yet; poll again later.
    Pending {
        /// How long the Leader asked the collector to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// Finished, decrypted and unsharded.
    Ready(CollectionResult),
}

/// A DAP collector for one task.
#[derive(Clone, Debug)]
pub struct Collector {
    params: CollectorParameters,
    vdaf: Vdaf,
    http: reqwest::Client,
    /// The longest Collection the task's VDAF allows: two sealed aggregate shares and a little
    /// more. A longer answer is not read.
    collection_limit: usize,
}

/// The value a poll loop left in `last_error`.
fn taken(last_error: Mutex<Option<String>>) -> Option<String> {
    last_error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
}

impl Collector {
    /// Checks the parameters (VDAF, HPKE suite) and builds a collector.
    ///
    /// Every request to the Leader carries the collector's token, and reqwest keeps
    /// `DAP-Auth-Token` headers on redirects to other hosts: give it an `http` client built
    /// with `.redirect(reqwest::redirect::Policy::none())`, as `duet collect` does, unless the
    /// Leader's redirects are trusted.
    pub fn new(
        mut params: CollectorParameters,
        vdaf: VdafInstance,
        http: reqwest::Client,
    ) -> Result<Self, CollectorError> {
        let vdaf = vdaf
            .instantiate()
            .map_err(|e| CollectorError::Vdaf(e.to_string()))?;
        check_suite(&params.hpke_keypair.config)
            .map_err(|e| CollectorError::Hpke(e.to_string()))?;
        let share_len = vdaf
            .empty_aggregate()
            .and_then(|a| vdaf.encode_aggregate(&a))
            .map_err(|e| CollectorError::Vdaf(e.to_string()))?
            .len();
        let collection_limit = 2 * (share_len + 1024) + 1024;
        let url = &mut params.leader_endpoint;
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(Self {
            params,
            vdaf,
            http,
            collection_limit,
        })
    }

    /// The task parameters (endpoint normalized to end in `/`).
    pub fn parameters(&self) -> &CollectorParameters {
        &self.params
    }

    /// Creates a collection job with a fresh random ID (`PUT …/collection_jobs/{id}`); any 2xx is success.
    pub async fn start_collection(&self, query: Query) -> Result<CollectionJobId, CollectorError> {
        let job = CollectionJobId::random();
        self.start_collection_as(job, query).await?;
        Ok(job)
    }

    /// Creates the collection job `job` (`PUT …/collection_jobs/{id}`), or finds it there: the
    /// Leader accepts the same request again for a job it has, so a collection can be resumed
    /// by its ID. Any 2xx is success.
    pub async fn start_collection_as(
        &self,
        job: CollectionJobId,
        query: Query,
    ) -> Result<(), CollectorError> {
        let url = self.job_url(&job)?;
        let body = CollectionReq {
            query,
            aggregation_parameter: vec![],
        }
        .get_encoded();
        let (name, value) = self.params.auth_token.request_header();
        let response = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, media_type::COLLECTION_REQ)
            .header(name, value)
            .body(body)
            .send()
            .await
            .map_err(|e| self.http_error("create a collection job", &e))?;
        if !response.status().is_success() {
            let context = format!("{} refused to create collection job {job}", self.leader());
            return Err(error::error_from_response(response, context).await);
        }
        tracing::debug!(%job, "collection job created");
        Ok(())
    }

    /// Polls a collection job once (`POST`, empty body); decrypts and unshards when it is ready.
    pub async fn poll_once(
        &self,
        job: &CollectionJobId,
        query: &Query,
    ) -> Result<PollOutcome, CollectorError> {
        let url = self.job_url(job)?;
        let (name, value) = self.params.auth_token.request_header();
        let response = self
            .http
            .post(url)
            .header(name, value)
            .send()
            .await
            .map_err(|e| self.http_error(&format!("poll collection job {job}"), &e))?;
        match response.status().as_u16() {
            200 => {
                let (body, whole) = read_at_most(response, self.collection_limit)
                    .await
                    .map_err(|e| {
                        self.http_error(&format!("read the result of collection job {job}"), &e)
                    })?;
                if !whole {
                    return Err(CollectorError::Codec(format!(
                        "the Leader's result for collection job {job} is longer than the {} \
                         bytes this task's results take",
                        self.collection_limit
                    )));
                }
                let collection = Collection::get_decoded(&body).map_err(|e| {
                    CollectorError::Codec(format!(
                        "the Leader's result for collection job {job} is malformed: {e}"
                    ))
                })?;
                let result = decrypt_collection(
                    &self.params.task_id,
                    &self.params.hpke_keypair,
                    &self.vdaf,
                    query,
                    &collection,
                )?;
                Ok(PollOutcome::Ready(result))
            }
            202 => Ok(PollOutcome::Pending {
                retry_after: retry_after(response.headers()),
            }),
            204 => Err(CollectorError::JobDeleted(*job)),
            _ => {
                let context = format!(
                    "{} reports an error for collection job {job}",
                    self.leader()
                );
                Err(error::error_from_response(response, context).await)
            }
        }
    }

    /// Polls until the job is ready, backing off from 100 ms to 2 s (or as `Retry-After` asks), for at most `timeout`.
    pub async fn poll_until_ready(
        &self,
        job: &CollectionJobId,
        query: &Query,
        timeout: std::time::Duration,
    ) -> Result<CollectionResult, CollectorError> {
        let last_error = Mutex::new(None);
        tokio::time::timeout(timeout, self.poll_loop(job, query, &last_error))
            .await
            .map_err(|_| CollectorError::Timeout {
                job: Some(*job),
                timeout,
                last_error: taken(last_error),
            })?
    }

    /// Starts a collection job and polls it until ready; fails after `timeout` in all.
    pub async fn collect(
        &self,
        query: Query,
        timeout: std::time::Duration,
    ) -> Result<CollectionResult, CollectorError> {
        let mut started = None;
        let last_error = Mutex::new(None);
        let outcome = tokio::time::timeout(timeout, async {
            let job = self.start_collection(query).await?;
            started = Some(job);
            self.poll_loop(&job, &query, &last_error).await
        })
        .await;
        outcome.map_err(|_| CollectorError::Timeout {
            job: started,
            timeout,
            last_error: taken(last_error),
        })?
    }

    /// Like [`Collector::collect`], as the collection job `job`: created if the Leader has no
    /// such job, else polled (the same query), so that a collection that timed out can be
    /// resumed. A timeout names the job either way. A job deleted since is not resumed: the
    /// Leader refuses the request (`invalidMessage`, saying so).
    pub async fn collect_as(
        &self,
        job: CollectionJobId,
        query: Query,
        timeout: std::time::Duration,
    ) -> Result<CollectionResult, CollectorError> {
        let last_error = Mutex::new(None);
        tokio::time::timeout(timeout, async {
            self.start_collection_as(job, query).await?;
            self.poll_loop(&job, &query, &last_error).await
        })
        .await
        .map_err(|_| CollectorError::Timeout {
            job: Some(job),
            timeout,
            last_error: taken(last_error),
        })?
    }

    /// Abandons a collection job (`DELETE`); any 2xx is success.
    pub async fn delete(&self, job: &CollectionJobId) -> Result<(), CollectorError> {
        let url = self.job_url(job)?;
        let (name, value) = self.params.auth_token.request_header();
        let response = self
            .http
            .delete(url)
            .header(name, value)
            .send()
            .await
            .map_err(|e| self.http_error(&format!("delete collection job {job}"), &e))?;
        if !response.status().is_success() {
            let context = format!("{} refused to delete collection job {job}", self.leader());
            return Err(error::error_from_response(response, context).await);
        }
        Ok(())
    }

    /// Polls until the job is ready, noting in `last_error` whether the Leader answered the
    /// last poll with an error (and which), for the caller's timeout to report.
    async fn poll_loop(
        &self,
        job: &CollectionJobId,
        query: &Query,
        last_error: &Mutex<Option<String>>,
    ) -> Result<CollectionResult, CollectorError> {
        let mut backoff = INITIAL_POLL_INTERVAL;
        loop {
            // A poll that fails transiently (a Leader restarting, busy or unreachable for a
            // moment) is tried again, within the caller's timeout: the job is still there.
            let outcome = self.poll_once(job, query).await;
            // An error the Leader answered with, other than "busy" (429): what a failed job
            // answers. A Leader out of reach for a moment, or busy, leaves the job pending.
            *last_error.lock().unwrap_or_else(PoisonError::into_inner) = match &outcome {
                Err(
                    e @ (CollectorError::Problem { status, .. }
                    | CollectorError::UnexpectedStatus { status, .. }),
                ) if *status != 429 => Some(e.to_string()),
                _ => None,
            };
            let wait = match outcome {
                Ok(PollOutcome::Ready(result)) => return Ok(result),
                Ok(PollOutcome::Pending { retry_after }) => {
                    let wait = poll_wait(retry_after, backoff);
                    tracing::trace!(%job, ?wait, "collection job not ready");
                    wait
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(%job, error = %e, "polling failed; polling again");
                    backoff
                }
                Err(e) => return Err(e),
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_POLL_INTERVAL);
        }
    }

    fn job_url(&self, job: &CollectionJobId) -> Result<url::Url, CollectorError> {
        let path = format!("tasks/{}/collection_jobs/{job}", self.params.task_id);
        self.params
            .leader_endpoint
            .join(&path)
            .map_err(|e| CollectorError::Http {
                action: format!(
                    "build a request URL from {} and {path}",
                    self.params.leader_endpoint
                ),
                message: e.to_string(),
            })
    }

    /// "the Leader at http://…", for error messages.
    fn leader(&self) -> String {
        format!("the Leader at {}", self.params.leader_endpoint)
    }

    fn http_error(&self, action: &str, e: &reqwest::Error) -> CollectorError {
        // The sources carry the useful part ("connection refused").
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        CollectorError::Http {
            action: format!("{action} at {}", self.leader()),
            message,
        }
    }
}

/// `Retry-After` in delay-seconds form; an HTTP date is ignored (it would need the wall clock).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_secs)
}

/// How long to wait before the next poll of a pending job: as long as the Leader's
/// `Retry-After` asks, but never less than the collector's own backoff (a `Retry-After: 0`
/// would otherwise poll in a tight loop).
fn poll_wait(
    retry_after: Option<std::time::Duration>,
    backoff: std::time::Duration,
) -> std::time::Duration {
    retry_after.map_or(backoff, |asked| asked.max(backoff))
}

#[cfg(test)]
mod tests;
