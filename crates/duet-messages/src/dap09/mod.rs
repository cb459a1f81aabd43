//! DAP-09 (draft-ietf-ppm-dap-09) messages, byte-for-byte compatible with Janus 0.7.
//!
//! Common types live in [`ids`], [`time`], [`hpke`] and [`query`]; the messages of each protocol
//! phase in [`upload`], [`aggregate`] and [`collect`]. Everything is re-exported here.

pub mod aggregate;
pub mod collect;
pub mod hpke;
pub mod ids;
pub mod media_type;
pub mod query;
pub mod time;
pub mod upload;

pub use aggregate::{
    AggregationJobContinueReq, AggregationJobInitReq, AggregationJobResp, AggregationJobStep,
    PrepareContinue, PrepareError, PrepareInit, PrepareResp, PrepareStepResult, ReportShare,
};
pub use collect::{
    AggregateShare, AggregateShareAad, AggregateShareReq, Collection, CollectionReq,
    ReportIdChecksum,
};
pub use hpke::{
    HpkeAeadId, HpkeCiphertext, HpkeCiphertextRef, HpkeConfig, HpkeConfigId, HpkeConfigList,
    HpkeKdfId, HpkeKemId, HpkePublicKey,
};
pub use ids::{AggregationJobId, BatchId, CollectionJobId, ParseIdError, ReportId, TaskId};
pub use query::{BatchSelector, FixedSizeQuery, PartialBatchSelector, Query, QueryType};
pub use time::{Duration, Interval, Time, TimeOverflow};
pub use upload::{
    Extension, ExtensionType, InputShareAad, PlaintextInputShare, PlaintextInputShareRef, Report,
    ReportMetadata, ReportRef,
};

use crate::codec::{CodecError, Decode, Encode, Reader};

/// `Role`: a protocol participant; its byte appears in HPKE `info` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Role {
    /// `collector(0)`.
    Collector = 0,
    /// `client(1)`.
    Client = 1,
    /// `leader(2)`.
    Leader = 2,
    /// `helper(3)`.
    Helper = 3,
}

impl Role {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The role with wire value `value`, if defined.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Collector),
            1 => Some(Self::Client),
            2 => Some(Self::Leader),
            3 => Some(Self::Helper),
            _ => None,
        }
    }

    /// True for the Leader and the Helper.
    pub fn is_aggregator(self) -> bool {
        matches!(self, Self::Leader | Self::Helper)
    }

    /// Lower-case name, as used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Collector => "collector",
            Self::Client => "client",
            Self::Leader => "leader",
            Self::Helper => "helper",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Encode for Role {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.as_u8());
    }
}

impl Decode for Role {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let value = r.read_u8()?;
        Self::from_u8(value).ok_or(CodecError::UnknownValue {
            what: "Role",
            value: value.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_codec() {
        for role in [Role::Collector, Role::Client, Role::Leader, Role::Helper] {
            assert_eq!(Role::get_decoded(&role.get_encoded()), Ok(role));
        }
        assert_eq!(Role::Helper.get_encoded(), [3]);
        assert_eq!(
            Role::get_decoded(&[4]),
            Err(CodecError::UnknownValue {
                what: "Role",
                value: 4
            })
        );
    }
}
