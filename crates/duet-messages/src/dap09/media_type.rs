//! HTTP media types of the DAP-09 messages (§4.4–§4.6), spelled as Janus 0.7 sends them.

/// [`HpkeConfigList`](super::HpkeConfigList).
pub const HPKE_CONFIG_LIST: &str = "application/dap-hpke-config-list";
/// [`Report`](super::Report).
pub const REPORT: &str = "application/dap-report";
/// [`AggregationJobInitReq`](super::AggregationJobInitReq).
pub const AGGREGATION_JOB_INIT_REQ: &str = "application/dap-aggregation-job-init-req";
/// [`AggregationJobResp`](super::AggregationJobResp).
pub const AGGREGATION_JOB_RESP: &str = "application/dap-aggregation-job-resp";
/// [`AggregationJobContinueReq`](super::AggregationJobContinueReq).
pub const AGGREGATION_JOB_CONTINUE_REQ: &str = "application/dap-aggregation-job-continue-req";
/// [`CollectionReq`](super::CollectionReq); note "collect", not "collection".
pub const COLLECTION_REQ: &str = "application/dap-collect-req";
/// [`Collection`](super::Collection).
pub const COLLECTION: &str = "application/dap-collection";
/// [`AggregateShareReq`](super::AggregateShareReq).
pub const AGGREGATE_SHARE_REQ: &str = "application/dap-aggregate-share-req";
/// [`AggregateShare`](super::AggregateShare).
pub const AGGREGATE_SHARE: &str = "application/dap-aggregate-share";
