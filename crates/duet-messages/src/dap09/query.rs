//! Query types and the batch selectors built on them (§4.1, §4.5.1.1, §4.6).
//!
//! Every selector starts with a `QueryType` byte and then carries what that query type needs.
//! Reserved (0) and unassigned query types are rejected when decoding.

use super::{BatchId, Interval};
use crate::codec::{CodecError, Decode, Encode, Reader};

/// `QueryType`: how a task groups reports into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum QueryType {
    /// `time_interval(1)`: batches are time intervals chosen by the Collector.
    TimeInterval = 1,
    /// `fixed_size(2)`: batches of about `min_batch_size` reports, named by the Leader.
    FixedSize = 2,
}

impl QueryType {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The query type with wire value `value`, if assigned.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::TimeInterval),
            2 => Some(Self::FixedSize),
            _ => None,
        }
    }
}

impl Encode for QueryType {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.as_u8());
    }
}

impl Decode for QueryType {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let value = r.read_u8()?;
        Self::from_u8(value).ok_or(CodecError::UnknownValue {
            what: "QueryType",
            value: value.into(),
        })
    }
}

/// `PartialBatchSelector`: the batch a message belongs to, as far as the sender can say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PartialBatchSelector {
    /// time_interval: empty; the batch follows from report timestamps.
    TimeInterval,
    /// fixed_size: the batch the Leader assigned.
    FixedSize(BatchId),
}

impl PartialBatchSelector {
    /// The query type this selector is for.
    pub fn query_type(&self) -> QueryType {
        match self {
            Self::TimeInterval => QueryType::TimeInterval,
            Self::FixedSize(_) => QueryType::FixedSize,
        }
    }
}

impl Encode for PartialBatchSelector {
    fn encode(&self, out: &mut Vec<u8>) {
        self.query_type().encode(out);
        match self {
            Self::TimeInterval => {}
            Self::FixedSize(batch_id) => batch_id.encode(out),
        }
    }
}

impl Decode for PartialBatchSelector {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(match QueryType::decode(r)? {
            QueryType::TimeInterval => Self::TimeInterval,
            QueryType::FixedSize => Self::FixedSize(BatchId::decode(r)?),
        })
    }
}

/// `BatchSelector`: names one batch exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BatchSelector {
    /// time_interval: the batch interval.
    TimeInterval {
        /// The queried interval.
        batch_interval: Interval,
    },
    /// fixed_size: the batch ID.
    FixedSize {
        /// The batch.
        batch_id: BatchId,
    },
}

impl BatchSelector {
    /// The query type this selector is for.
    pub fn query_type(&self) -> QueryType {
        match self {
            Self::TimeInterval { .. } => QueryType::TimeInterval,
            Self::FixedSize { .. } => QueryType::FixedSize,
        }
    }
}

impl Encode for BatchSelector {
    fn encode(&self, out: &mut Vec<u8>) {
        self.query_type().encode(out);
        match self {
            Self::TimeInterval { batch_interval } => batch_interval.encode(out),
            Self::FixedSize { batch_id } => batch_id.encode(out),
        }
    }
}

impl Decode for BatchSelector {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(match QueryType::decode(r)? {
            QueryType::TimeInterval => Self::TimeInterval {
                batch_interval: Interval::decode(r)?,
            },
            QueryType::FixedSize => Self::FixedSize {
                batch_id: BatchId::decode(r)?,
            },
        })
    }
}

/// `FixedSizeQuery`: which fixed_size batch the Collector wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FixedSizeQuery {
    /// `by_batch_id(0)`: a batch the Leader already named.
    ByBatchId {
        /// The batch.
        batch_id: BatchId,
    },
    /// `current_batch(1)`: the Leader picks the next batch not yet collected.
    CurrentBatch,
}

impl Encode for FixedSizeQuery {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::ByBatchId { batch_id } => {
                out.push(0);
                batch_id.encode(out);
            }
            Self::CurrentBatch => out.push(1),
        }
    }
}

impl Decode for FixedSizeQuery {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.read_u8()? {
            0 => Ok(Self::ByBatchId {
                batch_id: BatchId::decode(r)?,
            }),
            1 => Ok(Self::CurrentBatch),
            value => Err(CodecError::UnknownValue {
                what: "FixedSizeQueryType",
                value: value.into(),
            }),
        }
    }
}

/// `Query`: what the Collector asks to aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Query {
    /// time_interval: every report in the interval.
    TimeInterval {
        /// The queried interval.
        batch_interval: Interval,
    },
    /// fixed_size: one batch.
    FixedSize {
        /// Which batch.
        fixed_size_query: FixedSizeQuery,
    },
}

impl Query {
    /// The query type this query is for.
    pub fn query_type(&self) -> QueryType {
        match self {
            Self::TimeInterval { .. } => QueryType::TimeInterval,
            Self::FixedSize { .. } => QueryType::FixedSize,
        }
    }
}

impl Encode for Query {
    fn encode(&self, out: &mut Vec<u8>) {
        self.query_type().encode(out);
        match self {
            Self::TimeInterval { batch_interval } => batch_interval.encode(out),
            Self::FixedSize { fixed_size_query } => fixed_size_query.encode(out),
        }
    }
}

impl Decode for Query {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(match QueryType::decode(r)? {
            QueryType::TimeInterval => Self::TimeInterval {
                batch_interval: Interval::decode(r)?,
            },
            QueryType::FixedSize => Self::FixedSize {
                fixed_size_query: FixedSizeQuery::decode(r)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dap09::{Duration, Time};
    use crate::test_util::hex;

    #[test]
    fn partial_batch_selector_vectors() {
        assert_eq!(PartialBatchSelector::TimeInterval.get_encoded(), hex("01"));
        let fixed = PartialBatchSelector::FixedSize(BatchId([0x11; 32]));
        let bytes = hex(concat!(
            "02",                                                               // query_type: fixed_size
            "1111111111111111111111111111111111111111111111111111111111111111", // batch_id
        ));
        assert_eq!(fixed.get_encoded(), bytes);
        assert_eq!(PartialBatchSelector::get_decoded(&bytes), Ok(fixed));
    }

    #[test]
    fn query_vectors() {
        let ti = Query::TimeInterval {
            batch_interval: Interval {
                start: Time(0x1000),
                duration: Duration(0x10),
            },
        };
        let bytes = hex(concat!(
            "01",               // query_type: time_interval
            "0000000000001000", // batch_interval.start
            "0000000000000010", // batch_interval.duration
        ));
        assert_eq!(ti.get_encoded(), bytes);
        assert_eq!(Query::get_decoded(&bytes), Ok(ti));

        let current = Query::FixedSize {
            fixed_size_query: FixedSizeQuery::CurrentBatch,
        };
        // query_type: fixed_size, FixedSizeQuery.query_type: current_batch
        assert_eq!(current.get_encoded(), hex("02 01"));
        assert_eq!(Query::get_decoded(&hex("02 01")), Ok(current));
    }

    #[test]
    fn reserved_and_unknown_query_types_are_rejected() {
        for bad in ["00", "03", "ff"] {
            assert!(matches!(
                PartialBatchSelector::get_decoded(&hex(bad)),
                Err(CodecError::UnknownValue {
                    what: "QueryType",
                    ..
                })
            ));
        }
        assert_eq!(
            Query::get_decoded(&hex("02 02")),
            Err(CodecError::UnknownValue {
                what: "FixedSizeQueryType",
                value: 2
            })
        );
    }

    #[test]
    fn time_interval_selector_has_no_body() {
        // A batch ID after a time_interval selector is trailing garbage.
        let mut bytes = hex("01");
        bytes.extend_from_slice(&[0; 32]);
        assert_eq!(
            PartialBatchSelector::get_decoded(&bytes),
            Err(CodecError::TrailingBytes(32))
        );
    }
}
