//! Collection messages (§4.6): Collector-to-Leader requests and Leader-to-Helper share requests.

use super::{
    BatchSelector, HpkeCiphertext, Interval, PartialBatchSelector, Query, ReportId, TaskId,
};
use crate::codec::{
    decode_opaque, encode_opaque, CodecError, Decode, Encode, PrefixWidth, Reader, VecBounds,
};
use sha2::{Digest, Sha256};

const AGG_PARAM: VecBounds = VecBounds::new("agg_param", PrefixWidth::U32, 0);

/// `CollectionReq`: the body of `PUT .../collection_jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CollectionReq {
    /// Which batch to collect.
    pub query: Query,
    /// VDAF aggregation parameter, `opaque<0..2^32-1>`.
    pub aggregation_parameter: Vec<u8>,
}

impl Encode for CollectionReq {
    fn encode(&self, out: &mut Vec<u8>) {
        self.query.encode(out);
        encode_opaque(out, AGG_PARAM, &self.aggregation_parameter);
    }
}

impl Decode for CollectionReq {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            query: Query::decode(r)?,
            aggregation_parameter: decode_opaque(r, AGG_PARAM)?,
        })
    }
}

/// `Collection`: the finished result of a collection job.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Collection {
    /// The batch collected (its ID for fixed_size).
    pub partial_batch_selector: PartialBatchSelector,
    /// Number of reports aggregated.
    pub report_count: u64,
    /// Smallest time_precision-aligned interval covering the reports' timestamps.
    pub interval: Interval,
    /// The Leader's aggregate share, sealed to the Collector.
    pub leader_encrypted_agg_share: HpkeCiphertext,
    /// The Helper's aggregate share, sealed to the Collector.
    pub helper_encrypted_agg_share: HpkeCiphertext,
}

impl Encode for Collection {
    fn encode(&self, out: &mut Vec<u8>) {
        self.partial_batch_selector.encode(out);
        self.report_count.encode(out);
        self.interval.encode(out);
        self.leader_encrypted_agg_share.encode(out);
        self.helper_encrypted_agg_share.encode(out);
    }
}

impl Decode for Collection {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            partial_batch_selector: PartialBatchSelector::decode(r)?,
            report_count: u64::decode(r)?,
            interval: Interval::decode(r)?,
            leader_encrypted_agg_share: HpkeCiphertext::decode(r)?,
            helper_encrypted_agg_share: HpkeCiphertext::decode(r)?,
        })
    }
}

/// The batch checksum: XOR over the batch of SHA-256(report ID) (§4.6.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReportIdChecksum(pub [u8; 32]);

impl ReportIdChecksum {
    /// The checksum of a batch holding only `report_id`.
    pub fn for_report_id(report_id: &ReportId) -> Self {
        Self(Sha256::digest(report_id.as_bytes()).into())
    }

    /// This checksum with `report_id` added to the batch.
    pub fn updated_with(&self, report_id: &ReportId) -> Self {
        self.combined_with(&Self::for_report_id(report_id))
    }

    /// The checksum of the union of two disjoint batches.
    pub fn combined_with(&self, other: &Self) -> Self {
        let mut out = self.0;
        for (o, b) in out.iter_mut().zip(other.0) {
            *o ^= b;
        }
        Self(out)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Encode for ReportIdChecksum {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
}

impl Decode for ReportIdChecksum {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.read_array().map(Self)
    }
}

/// `AggregateShareReq`: the body of `POST .../aggregate_shares`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregateShareReq {
    /// The batch.
    pub batch_selector: BatchSelector,
    /// VDAF aggregation parameter, `opaque<0..2^32-1>`.
    pub aggregation_parameter: Vec<u8>,
    /// Number of reports the Leader aggregated in the batch.
    pub report_count: u64,
    /// The Leader's checksum over those reports.
    pub checksum: ReportIdChecksum,
}

impl Encode for AggregateShareReq {
    fn encode(&self, out: &mut Vec<u8>) {
        self.batch_selector.encode(out);
        encode_opaque(out, AGG_PARAM, &self.aggregation_parameter);
        self.report_count.encode(out);
        self.checksum.encode(out);
    }
}

impl Decode for AggregateShareReq {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            batch_selector: BatchSelector::decode(r)?,
            aggregation_parameter: decode_opaque(r, AGG_PARAM)?,
            report_count: u64::decode(r)?,
            checksum: ReportIdChecksum::decode(r)?,
        })
    }
}

/// `AggregateShare`: the Helper's answer, its aggregate share sealed to the Collector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregateShare {
    /// The sealed aggregate share.
    pub encrypted_aggregate_share: HpkeCiphertext,
}

impl Encode for AggregateShare {
    fn encode(&self, out: &mut Vec<u8>) {
        self.encrypted_aggregate_share.encode(out);
    }
}

impl Decode for AggregateShare {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            encrypted_aggregate_share: HpkeCiphertext::decode(r)?,
        })
    }
}

/// `AggregateShareAad`: the associated data bound into each aggregate share's encryption.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregateShareAad {
    /// The task.
    pub task_id: TaskId,
    /// VDAF aggregation parameter, `opaque<0..2^32-1>`.
    pub aggregation_parameter: Vec<u8>,
    /// The batch.
    pub batch_selector: BatchSelector,
}

impl Encode for AggregateShareAad {
    fn encode(&self, out: &mut Vec<u8>) {
        self.task_id.encode(out);
        encode_opaque(out, AGG_PARAM, &self.aggregation_parameter);
        self.batch_selector.encode(out);
    }
}

impl Decode for AggregateShareAad {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            task_id: TaskId::decode(r)?,
            aggregation_parameter: decode_opaque(r, AGG_PARAM)?,
            batch_selector: BatchSelector::decode(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dap09::{BatchId, Duration, FixedSizeQuery, HpkeConfigId, Time};
    use crate::test_util::hex;

    fn ct(id: u8) -> HpkeCiphertext {
        HpkeCiphertext {
            config_id: HpkeConfigId(id),
            encapsulated_key: vec![id],
            payload: vec![id],
        }
    }

    #[test]
    fn collection_req_vector() {
        let req = CollectionReq {
            query: Query::FixedSize {
                fixed_size_query: FixedSizeQuery::ByBatchId {
                    batch_id: BatchId([0x66; 32]),
                },
            },
            aggregation_parameter: vec![0x01],
        };
        let bytes = hex(concat!(
            "02", // query.query_type: fixed_size
            "00", // fixed_size_query.query_type: by_batch_id
            "6666666666666666666666666666666666666666666666666666666666666666", // batch_id
            "00000001", // agg_param length
            "01", // agg_param
        ));
        assert_eq!(req.get_encoded(), bytes);
        assert_eq!(CollectionReq::get_decoded(&bytes), Ok(req));
    }

    #[test]
    fn collection_vector() {
        let collection = Collection {
            partial_batch_selector: PartialBatchSelector::TimeInterval,
            report_count: 10,
            interval: Interval {
                start: Time(3600),
                duration: Duration(7200),
            },
            leader_encrypted_agg_share: ct(1),
            helper_encrypted_agg_share: ct(2),
        };
        let bytes = hex(concat!(
            "01",                     // part_batch_selector.query_type: time_interval
            "000000000000000a",       // report_count = 10
            "0000000000000e10",       // interval.start = 3600
            "0000000000001c20",       // interval.duration = 7200
            "01 0001 01 00000001 01", // leader_encrypted_agg_share
            "02 0001 02 00000001 02", // helper_encrypted_agg_share
        ));
        assert_eq!(collection.get_encoded(), bytes);
        assert_eq!(Collection::get_decoded(&bytes), Ok(collection));
    }

    #[test]
    fn aggregate_share_req_vector() {
        let req = AggregateShareReq {
            batch_selector: BatchSelector::TimeInterval {
                batch_interval: Interval {
                    start: Time(0),
                    duration: Duration(60),
                },
            },
            aggregation_parameter: vec![],
            report_count: 2,
            checksum: ReportIdChecksum([0x77; 32]),
        };
        let bytes = hex(concat!(
            "01",               // batch_selector.query_type: time_interval
            "0000000000000000", // batch_interval.start
            "000000000000003c", // batch_interval.duration = 60
            "00000000",         // agg_param length
            "0000000000000002", // report_count
            "7777777777777777777777777777777777777777777777777777777777777777", // checksum
        ));
        assert_eq!(req.get_encoded(), bytes);
        assert_eq!(AggregateShareReq::get_decoded(&bytes), Ok(req));
        // The checksum is fixed-length: one byte short is truncated input.
        assert_eq!(
            AggregateShareReq::get_decoded(&bytes[..bytes.len() - 1]),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    fn aggregate_share_aad_vector() {
        let aad = AggregateShareAad {
            task_id: TaskId([0x88; 32]),
            aggregation_parameter: vec![],
            batch_selector: BatchSelector::FixedSize {
                batch_id: BatchId([0x99; 32]),
            },
        };
        let bytes = hex(concat!(
            "8888888888888888888888888888888888888888888888888888888888888888", // task_id
            "00000000",                                                         // agg_param length
            "02", // batch_selector.query_type: fixed_size
            "9999999999999999999999999999999999999999999999999999999999999999", // batch_id
        ));
        assert_eq!(aad.get_encoded(), bytes);
        assert_eq!(AggregateShareAad::get_decoded(&bytes), Ok(aad));
    }

    #[test]
    fn checksum_is_xor_of_sha256() {
        let (a, b) = (ReportId([0; 16]), ReportId([1; 16]));
        // SHA-256 of sixteen zero bytes.
        let expected = hex("374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb");
        assert_eq!(ReportIdChecksum::for_report_id(&a).0.as_slice(), expected);
        let ab = ReportIdChecksum::default()
            .updated_with(&a)
            .updated_with(&b);
        let ba =
            ReportIdChecksum::for_report_id(&b).combined_with(&ReportIdChecksum::for_report_id(&a));
        assert_eq!(ab, ba);
        assert_eq!(ab.updated_with(&a), ReportIdChecksum::for_report_id(&b));
    }
}
