//! Aggregation messages (§4.5): Leader-to-Helper job initialisation and continuation.
//!
//! The `message` fields are opaque here. In DAP-09 they carry an encoded VDAF ping-pong `Message`
//! (`initialize`, `continue` or `finish`), which Janus decodes eagerly; Duet leaves that to the
//! VDAF layer.

use super::{HpkeCiphertext, PartialBatchSelector, ReportId, ReportMetadata};
use crate::codec::{
    decode_items, decode_items_at_most, decode_opaque, encode_items, encode_opaque, CodecError,
    Decode, Encode, PrefixWidth, Reader, VecBounds,
};

const PUBLIC_SHARE: VecBounds = VecBounds::new("ReportShare.public_share", PrefixWidth::U32, 0);
const PREP_PAYLOAD: VecBounds = VecBounds::new("payload", PrefixWidth::U32, 0);
const AGG_PARAM: VecBounds = VecBounds::new("agg_param", PrefixWidth::U32, 0);
const PREPARE_INITS: VecBounds =
    VecBounds::new("AggregationJobInitReq.prepare_inits", PrefixWidth::U32, 1);
const PREPARE_RESPS: VecBounds =
    VecBounds::new("AggregationJobResp.prepare_resps", PrefixWidth::U32, 1);
const PREPARE_CONTINUES: VecBounds = VecBounds::new(
    "AggregationJobContinueReq.prepare_continues",
    PrefixWidth::U32,
    1,
);

/// `ReportShare`: one Aggregator's part of a report, as the Leader forwards it to the Helper.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReportShare {
    /// Report ID and timestamp.
    pub metadata: ReportMetadata,
    /// The VDAF public share, `opaque<0..2^32-1>`.
    pub public_share: Vec<u8>,
    /// The Helper's sealed `PlaintextInputShare`.
    pub encrypted_input_share: HpkeCiphertext,
}

impl Encode for ReportShare {
    fn encode(&self, out: &mut Vec<u8>) {
        self.metadata.encode(out);
        encode_opaque(out, PUBLIC_SHARE, &self.public_share);
        self.encrypted_input_share.encode(out);
    }
}

impl Decode for ReportShare {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            metadata: ReportMetadata::decode(r)?,
            public_share: decode_opaque(r, PUBLIC_SHARE)?,
            encrypted_input_share: HpkeCiphertext::decode(r)?,
        })
    }
}

/// `PrepareInit`: a report share plus the Leader's first ping-pong message for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrepareInit {
    /// The report share.
    pub report_share: ReportShare,
    /// Encoded ping-pong message (`payload<0..2^32-1>`).
    pub message: Vec<u8>,
}

impl Encode for PrepareInit {
    fn encode(&self, out: &mut Vec<u8>) {
        self.report_share.encode(out);
        encode_opaque(out, PREP_PAYLOAD, &self.message);
    }
}

impl Decode for PrepareInit {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            report_share: ReportShare::decode(r)?,
            message: decode_opaque(r, PREP_PAYLOAD)?,
        })
    }
}

/// `AggregationJobInitReq`: the body of `PUT .../aggregation_jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregationJobInitReq {
    /// VDAF aggregation parameter, `opaque<0..2^32-1>` (empty for Prio3).
    pub aggregation_parameter: Vec<u8>,
    /// The batch the reports belong to.
    pub partial_batch_selector: PartialBatchSelector,
    /// One entry per report, `PrepareInit<1..2^32-1>`; must not be empty.
    pub prepare_inits: Vec<PrepareInit>,
}

impl Encode for AggregationJobInitReq {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_opaque(out, AGG_PARAM, &self.aggregation_parameter);
        self.partial_batch_selector.encode(out);
        encode_items(out, PREPARE_INITS, &self.prepare_inits);
    }
}

impl Decode for AggregationJobInitReq {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            aggregation_parameter: decode_opaque(r, AGG_PARAM)?,
            partial_batch_selector: PartialBatchSelector::decode(r)?,
            prepare_inits: decode_items(r, PREPARE_INITS)?,
        })
    }
}

impl AggregationJobInitReq {
    /// Decodes a whole message of at most `max_reports` reports: a longer list is refused
    /// ([`CodecError::TooManyItems`]) at the report after the last one taken, before the rest
    /// are decoded.
    pub fn get_decoded_at_most(bytes: &[u8], max_reports: usize) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let value = Self {
            aggregation_parameter: decode_opaque(&mut r, AGG_PARAM)?,
            partial_batch_selector: PartialBatchSelector::decode(&mut r)?,
            prepare_inits: decode_items_at_most(&mut r, PREPARE_INITS, max_reports)?,
        };
        r.expect_empty()?;
        Ok(value)
    }
}

/// `PrepareError`: why an Aggregator rejected a report during preparation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum PrepareError {
    /// `batch_collected(0)`: the report's batch was already collected.
    BatchCollected = 0,
    /// `report_replayed(1)`: the report was already aggregated.
    ReportReplayed = 1,
    /// `report_dropped(2)`: the state needed to check the report is gone.
    ReportDropped = 2,
    /// `hpke_unknown_config_id(3)`: the share was sealed to an unknown config.
    HpkeUnknownConfigId = 3,
    /// `hpke_decrypt_error(4)`: the share did not decrypt.
    HpkeDecryptError = 4,
    /// `vdaf_prep_error(5)`: VDAF preparation failed.
    VdafPrepError = 5,
    /// `batch_saturated(6)`: the fixed_size batch is full.
    BatchSaturated = 6,
    /// `task_expired(7)`: the report is after the task's expiration.
    TaskExpired = 7,
    /// `invalid_message(8)`: the share or an extension is malformed.
    InvalidMessage = 8,
    /// `report_too_early(9)`: the timestamp is too far in the future.
    ReportTooEarly = 9,
}

impl PrepareError {
    /// Every value, in wire order.
    pub const ALL: [PrepareError; 10] = [
        Self::BatchCollected,
        Self::ReportReplayed,
        Self::ReportDropped,
        Self::HpkeUnknownConfigId,
        Self::HpkeDecryptError,
        Self::VdafPrepError,
        Self::BatchSaturated,
        Self::TaskExpired,
        Self::InvalidMessage,
        Self::ReportTooEarly,
    ];

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The error with wire value `value`, if defined.
    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }
}

impl Encode for PrepareError {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.as_u8());
    }
}

impl Decode for PrepareError {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let value = r.read_u8()?;
        Self::from_u8(value).ok_or(CodecError::UnknownValue {
            what: "PrepareError",
            value: value.into(),
        })
    }
}

/// The `PrepareRespState` and the body it selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PrepareStepResult {
    /// `continue(0)`: the next encoded ping-pong message, `payload<0..2^32-1>`.
    Continue {
        /// Encoded ping-pong message.
        message: Vec<u8>,
    },
    /// `finished(1)`: preparation is done; nothing follows.
    Finished,
    /// `reject(2)`: the report is rejected for this reason.
    Reject(PrepareError),
}

impl Encode for PrepareStepResult {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Continue { message } => {
                out.push(0);
                encode_opaque(out, PREP_PAYLOAD, message);
            }
            Self::Finished => out.push(1),
            Self::Reject(error) => {
                out.push(2);
                error.encode(out);
            }
        }
    }
}

impl Decode for PrepareStepResult {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        match r.read_u8()? {
            0 => Ok(Self::Continue {
                message: decode_opaque(r, PREP_PAYLOAD)?,
            }),
            1 => Ok(Self::Finished),
            2 => Ok(Self::Reject(PrepareError::decode(r)?)),
            value => Err(CodecError::UnknownValue {
                what: "PrepareRespState",
                value: value.into(),
            }),
        }
    }
}

/// `PrepareResp`: the Helper's answer for one report.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrepareResp {
    /// The report this answers.
    pub report_id: ReportId,
    /// Continue, finished or rejected.
    pub result: PrepareStepResult,
}

impl Encode for PrepareResp {
    fn encode(&self, out: &mut Vec<u8>) {
        self.report_id.encode(out);
        self.result.encode(out);
    }
}

impl Decode for PrepareResp {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            report_id: ReportId::decode(r)?,
            result: PrepareStepResult::decode(r)?,
        })
    }
}

/// `AggregationJobResp`: the Helper's answer to an init or continue request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregationJobResp {
    /// One per report of the request, same order, `PrepareResp<1..2^32-1>`.
    pub prepare_resps: Vec<PrepareResp>,
}

impl Encode for AggregationJobResp {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_items(out, PREPARE_RESPS, &self.prepare_resps);
    }
}

impl Decode for AggregationJobResp {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            prepare_resps: decode_items(r, PREPARE_RESPS)?,
        })
    }
}

/// `step` of an `AggregationJobContinueReq`: 0 at init, then 1, 2, ...
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregationJobStep(pub u16);

impl AggregationJobStep {
    /// The step after this one, or `None` at `u16::MAX`.
    pub fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl std::fmt::Display for AggregationJobStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Encode for AggregationJobStep {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
    }
}

impl Decode for AggregationJobStep {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        u16::decode(r).map(Self)
    }
}

/// `PrepareContinue`: the Leader's next ping-pong message for one report.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrepareContinue {
    /// The report.
    pub report_id: ReportId,
    /// Encoded ping-pong message (`payload<0..2^32-1>`).
    pub message: Vec<u8>,
}

impl Encode for PrepareContinue {
    fn encode(&self, out: &mut Vec<u8>) {
        self.report_id.encode(out);
        encode_opaque(out, PREP_PAYLOAD, &self.message);
    }
}

impl Decode for PrepareContinue {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            report_id: ReportId::decode(r)?,
            message: decode_opaque(r, PREP_PAYLOAD)?,
        })
    }
}

/// `AggregationJobContinueReq`: the body of `POST .../aggregation_jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AggregationJobContinueReq {
    /// The step being requested (never 0).
    pub step: AggregationJobStep,
    /// One per report still in preparation, `PrepareContinue<1..2^32-1>`.
    pub prepare_continues: Vec<PrepareContinue>,
}

impl Encode for AggregationJobContinueReq {
    fn encode(&self, out: &mut Vec<u8>) {
        self.step.encode(out);
        encode_items(out, PREPARE_CONTINUES, &self.prepare_continues);
    }
}

impl Decode for AggregationJobContinueReq {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            step: AggregationJobStep::decode(r)?,
            prepare_continues: decode_items(r, PREPARE_CONTINUES)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dap09::{BatchId, HpkeConfigId, Time};
    use crate::test_util::hex;

    fn prepare_init() -> PrepareInit {
        PrepareInit {
            report_share: ReportShare {
                metadata: ReportMetadata {
                    id: ReportId([0x44; 16]),
                    time: Time(3600),
                },
                public_share: vec![],
                encrypted_input_share: HpkeCiphertext {
                    config_id: HpkeConfigId(9),
                    encapsulated_key: vec![0xe0],
                    payload: vec![0xf0],
                },
            },
            // ping-pong initialize(0) with a 1-byte prep_share
            message: hex("00 00000001 aa"),
        }
    }

    #[test]
    fn aggregation_job_init_req_vector() {
        let req = AggregationJobInitReq {
            aggregation_parameter: vec![],
            partial_batch_selector: PartialBatchSelector::FixedSize(BatchId([0x55; 32])),
            prepare_inits: vec![prepare_init()],
        };
        let bytes = hex(concat!(
            "00000000", // agg_param length (empty)
            "02",       // part_batch_selector.query_type: fixed_size
            "5555555555555555555555555555555555555555555555555555555555555555", // batch_id
            "0000002f", // prepare_inits length: 47 bytes
            "44444444444444444444444444444444", // report_share.metadata.id
            "0000000000000e10", // report_share.metadata.time = 3600
            "00000000", // report_share.public_share length
            "09",       // encrypted_input_share.config_id
            "0001",     // enc length
            "e0",       // enc
            "00000001", // payload length
            "f0",       // payload
            "00000006", // ping-pong message length
            "00",       //   MessageType: initialize
            "00000001", //   prep_share length
            "aa",       //   prep_share
        ));
        assert_eq!(req.get_encoded(), bytes);
        assert_eq!(AggregationJobInitReq::get_decoded(&bytes), Ok(req));
    }

    #[test]
    fn empty_prepare_inits_are_rejected() {
        // agg_param empty, time_interval selector, prepare_inits length 0.
        assert_eq!(
            AggregationJobInitReq::get_decoded(&hex("00000000 01 00000000")),
            Err(CodecError::LengthOutOfRange {
                what: "AggregationJobInitReq.prepare_inits",
                len: 0,
                min: 1,
                max: u32::MAX.into(),
            })
        );
        assert!(matches!(
            AggregationJobResp::get_decoded(&hex("00000000")),
            Err(CodecError::LengthOutOfRange { len: 0, .. })
        ));
        assert!(matches!(
            AggregationJobContinueReq::get_decoded(&hex("0001 00000000")),
            Err(CodecError::LengthOutOfRange { len: 0, .. })
        ));
    }

    #[test]
    fn oversize_length_prefix_is_rejected() {
        // prepare_inits claims 0xffffffff bytes but only 3 follow.
        assert_eq!(
            AggregationJobInitReq::get_decoded(&hex("00000000 01 ffffffff 010203")),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    fn aggregation_job_resp_vector() {
        let resp = AggregationJobResp {
            prepare_resps: vec![
                PrepareResp {
                    report_id: ReportId([1; 16]),
                    result: PrepareStepResult::Continue {
                        message: hex("02 00000001 bb"),
                    },
                },
                PrepareResp {
                    report_id: ReportId([2; 16]),
                    result: PrepareStepResult::Finished,
                },
                PrepareResp {
                    report_id: ReportId([3; 16]),
                    result: PrepareStepResult::Reject(PrepareError::ReportTooEarly),
                },
            ],
        };
        let bytes = hex(concat!(
            "0000003e",                         // prepare_resps length: 62 bytes
            "01010101010101010101010101010101", // report_id
            "00",                               // state: continue
            "00000006",                         // payload length
            "02",                               //   MessageType: finish
            "00000001",                         //   prep_msg length
            "bb",                               //   prep_msg
            "02020202020202020202020202020202", // report_id
            "01",                               // state: finished
            "03030303030303030303030303030303", // report_id
            "02",                               // state: reject
            "09",                               // prepare_error: report_too_early
        ));
        assert_eq!(resp.get_encoded(), bytes);
        assert_eq!(AggregationJobResp::get_decoded(&bytes), Ok(resp));
    }

    #[test]
    fn unknown_state_and_error_are_rejected() {
        let mut bytes = vec![0u8; 16];
        bytes.push(3);
        assert_eq!(
            PrepareResp::get_decoded(&bytes),
            Err(CodecError::UnknownValue {
                what: "PrepareRespState",
                value: 3
            })
        );
        bytes.truncate(16);
        bytes.extend_from_slice(&[2, 10]);
        assert_eq!(
            PrepareResp::get_decoded(&bytes),
            Err(CodecError::UnknownValue {
                what: "PrepareError",
                value: 10
            })
        );
    }

    #[test]
    fn prepare_error_values() {
        for (i, e) in PrepareError::ALL.iter().enumerate() {
            assert_eq!(usize::from(e.as_u8()), i);
            assert_eq!(PrepareError::get_decoded(&[e.as_u8()]), Ok(*e));
        }
    }

    #[test]
    fn aggregation_job_continue_req_vector() {
        let req = AggregationJobContinueReq {
            step: AggregationJobStep(1),
            prepare_continues: vec![PrepareContinue {
                report_id: ReportId([7; 16]),
                message: vec![],
            }],
        };
        let bytes = hex(concat!(
            "0001",                             // step
            "00000014",                         // prepare_continues length: 20 bytes
            "07070707070707070707070707070707", // report_id
            "00000000",                         // payload length (empty)
        ));
        assert_eq!(req.get_encoded(), bytes);
        assert_eq!(AggregationJobContinueReq::get_decoded(&bytes), Ok(req));
        assert_eq!(AggregationJobStep(u16::MAX).next(), None);
    }
}
