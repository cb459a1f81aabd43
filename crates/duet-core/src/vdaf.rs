//! The VDAFs Duet supports, and one dispatch point over the `prio` crate.
//!
//! Everything above this module handles VDAF values as opaque bytes or opaque boxed states; the
//! generic `prio` types never leak out. All supported VDAFs are Prio3 with two aggregators, a
//! 16-byte verify key and the report ID as the 16-byte nonce (DAP-09 with VDAF-08).

use std::any::Any;
use std::fmt;

use duet_messages::dap09::ReportId;
use prio::codec::{Decode as _, Encode as _, ParameterizedDecode};
use prio::topology::ping_pong::{
    PingPongContinuedValue, PingPongMessage, PingPongState, PingPongTopology,
};
use prio::vdaf::prio3::{Prio3Count, Prio3Histogram, Prio3Sum, Prio3SumVec};
use prio::vdaf::{Aggregatable, Aggregator, Client, Collector};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;

mod measurement;
pub use measurement::{AggregateResult, Measurement};

/// Length of a VDAF-08 Prio3 verify key, in bytes.
pub const VERIFY_KEY_LENGTH: usize = 16;

/// A VDAF and its parameters, as configured on a task.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum VdafInstance {
    /// Counts measurements that are 0 or 1.
    Prio3Count,
    /// Sums integers in `[0, 2^bits)`.
    Prio3Sum {
        /// Bit width of each measurement.
        bits: usize,
    },
    /// Sums vectors of integers in `[0, 2^bits)`, element-wise.
    Prio3SumVec {
        /// Bit width of each element.
        bits: usize,
        /// Number of elements.
        length: usize,
        /// Chunk length of the parallel-sum gadget.
        chunk_length: usize,
    },
    /// Counts measurements into `length` buckets.
    Prio3Histogram {
        /// Number of buckets.
        length: usize,
        /// Chunk length of the parallel-sum gadget.
        chunk_length: usize,
    },
}

impl fmt::Display for VdafInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prio3Count => write!(f, "Prio3Count"),
            Self::Prio3Sum { bits } => write!(f, "Prio3Sum(bits={bits})"),
            Self::Prio3SumVec {
                bits,
                length,
                chunk_length,
            } => {
                write!(
                    f,
                    "Prio3SumVec(bits={bits}, length={length}, chunk_length={chunk_length})"
                )
            }
            Self::Prio3Histogram {
                length,
                chunk_length,
            } => {
                write!(
                    f,
                    "Prio3Histogram(length={length}, chunk_length={chunk_length})"
                )
            }
        }
    }
}

/// The longest encoded measurement (field elements) a VDAF may have: the Leader's share carries
/// one 16-byte element per entry, so a longer one would make every report over 16 MiB, each one
/// upload that a Leader holds in memory.
pub const MAX_MEASUREMENT_LEN: usize = 1 << 20;

/// A chunk length near the square root of the measurement's encoded length, which keeps the
/// proof small; the usual choice when none is given.
pub fn default_chunk_length(measurement_len: usize) -> usize {
    let c = measurement_len.isqrt();
    let c = if c.saturating_mul(c) < measurement_len {
        c + 1
    } else {
        c
    };
    c.max(1)
}

/// Refuses a chunk longer than the measurement it cuts (`measurement_len` field elements): its
/// proof would be as long as the chunk, whatever the measurement, so a task could make every
/// process that instantiates it build a proof of any size (and `prio` adds to the length
/// unchecked).
fn check_chunk_length(
    instance: &VdafInstance,
    chunk_length: usize,
    measurement_len: usize,
) -> Result<(), CoreError> {
    if chunk_length > measurement_len {
        return Err(CoreError::InvalidParameter(format!(
            "{instance}: chunk_length may be at most the measurement's length, \
             {measurement_len}"
        )));
    }
    Ok(())
}

impl VdafInstance {
    /// Checks parameters and builds the `prio` object.
    pub fn instantiate(&self) -> Result<Vdaf, CoreError> {
        let err = |e: prio::vdaf::VdafError| CoreError::InvalidParameter(format!("{self}: {e}"));
        let inner = match *self {
            Self::Prio3Count => Inner::Count(Prio3Count::new_count(2).map_err(err)?),
            Self::Prio3Sum { bits } => {
                if !(1..=64).contains(&bits) {
                    return Err(CoreError::InvalidParameter(format!(
                        "Prio3Sum bits must be between 1 and 64, got {bits}"
                    )));
                }
                Inner::Sum(Prio3Sum::new_sum(2, bits).map_err(err)?)
            }
            Self::Prio3SumVec {
                bits,
                length,
                chunk_length,
            } => {
                if !(1..=64).contains(&bits) || length == 0 || chunk_length == 0 {
                    return Err(CoreError::InvalidParameter(format!(
                        "Prio3SumVec needs 1 ≤ bits ≤ 64, length ≥ 1 and chunk_length ≥ 1, got {self}"
                    )));
                }
                let Some(measurement_len) = bits
                    .checked_mul(length)
                    .filter(|n| *n <= MAX_MEASUREMENT_LEN)
                else {
                    return Err(CoreError::InvalidParameter(format!(
                        "Prio3SumVec's bits × length may be at most {MAX_MEASUREMENT_LEN} (its \
                         reports must fit an upload), got {self}"
                    )));
                };
                check_chunk_length(self, chunk_length, measurement_len)?;
                Inner::SumVec(Prio3SumVec::new_sum_vec(2, bits, length, chunk_length).map_err(err)?)
            }
            Self::Prio3Histogram {
                length,
                chunk_length,
            } => {
                if length == 0 || chunk_length == 0 {
                    return Err(CoreError::InvalidParameter(format!(
                        "Prio3Histogram needs length ≥ 1 and chunk_length ≥ 1, got {self}"
                    )));
                }
                if length > MAX_MEASUREMENT_LEN {
                    return Err(CoreError::InvalidParameter(format!(
                        "Prio3Histogram's length may be at most {MAX_MEASUREMENT_LEN} (its \
                         reports must fit an upload), got {self}"
                    )));
                }
                check_chunk_length(self, chunk_length, length)?;
                Inner::Histogram(
                    Prio3Histogram::new_histogram(2, length, chunk_length).map_err(err)?,
                )
            }
        };
        Ok(Vdaf {
            inner,
            instance: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
enum Inner {
    Count(Prio3Count),
    Sum(Prio3Sum),
    SumVec(Prio3SumVec),
    Histogram(Prio3Histogram),
}

/// A ready-to-use VDAF: the single dispatch point over `prio`'s generic types.
#[derive(Clone, Debug)]
pub struct Vdaf {
    inner: Inner,
    instance: VdafInstance,
}

/// A sharded measurement: the encoded public share, Leader input share and Helper input share.
pub type Shards = (Vec<u8>, Vec<u8>, Vec<u8>);

/// The encoded lengths of a VDAF's shares, in bytes. Prio3's shares have one length for every
/// measurement, so any report whose shares have other lengths is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareLengths {
    /// The public share.
    pub public: usize,
    /// The Leader's input share.
    pub leader: usize,
    /// The Helper's input share.
    pub helper: usize,
}

/// Why preparing a report share failed; maps to a DAP `PrepareError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepFailure {
    /// A share or message did not decode (`invalid_message`).
    #[error("could not decode: {0}")]
    Decode(String),
    /// The VDAF rejected the report (`vdaf_prep_error`).
    #[error("VDAF preparation failed: {0}")]
    Prepare(String),
}

/// The Leader's state for one report between its init and the Helper's answer.
pub struct LeaderPrepState(Box<dyn Any + Send + Sync>);

/// One report's output share, ready to be accumulated.
pub struct OutputShare(Box<dyn Any + Send + Sync>);

/// A running sum of output shares (an aggregate share).
pub struct AggregateShare(Box<dyn Any + Send + Sync>);

impl fmt::Debug for LeaderPrepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaderPrepState")
    }
}
impl fmt::Debug for OutputShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutputShare")
    }
}
impl fmt::Debug for AggregateShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AggregateShare")
    }
}

/// The bounds every supported VDAF meets.
trait Prio3Like:
    prio::vdaf::Vdaf<AggregationParam = (), OutputShare = Self::Out, AggregateShare = Self::Agg>
    + Client<16>
    + Aggregator<VERIFY_KEY_LENGTH, 16, PrepareState = Self::State, PrepareMessage = Self::Msg>
    + Collector
    + Send
    + Sync
    + 'static
{
    type Out: Send + Sync + 'static;
    type Agg: Aggregatable<OutputShare = Self::Out>
        + prio::codec::Encode
        + for<'a> ParameterizedDecode<(&'a Self, &'a ())>
        + Send
        + Sync
        + 'static;
    type State: Send + Sync + 'static;
    type Msg: Send + Sync + 'static;
}

macro_rules! prio3_like {
    ($($t:ty),*) => {$(
        impl Prio3Like for $t {
            type Out = <$t as prio::vdaf::Vdaf>::OutputShare;
            type Agg = <$t as prio::vdaf::Vdaf>::AggregateShare;
            type State = <$t as Aggregator<VERIFY_KEY_LENGTH, 16>>::PrepareState;
            type Msg = <$t as Aggregator<VERIFY_KEY_LENGTH, 16>>::PrepareMessage;
        }
    )*};
}
prio3_like!(Prio3Count, Prio3Sum, Prio3SumVec, Prio3Histogram);

macro_rules! dispatch {
    ($self:expr, $v:ident => $body:expr) => {
        match &$self.inner {
            Inner::Count($v) => $body,
            Inner::Sum($v) => $body,
            Inner::SumVec($v) => $body,
            Inner::Histogram($v) => $body,
        }
    };
}

fn vdaf_err(e: impl fmt::Display) -> CoreError {
    CoreError::Vdaf(e.to_string())
}

fn g_shard<V: Prio3Like>(v: &V, m: &V::Measurement, nonce: &[u8; 16]) -> Result<Shards, CoreError> {
    let (public, inputs) = v.shard(m, nonce).map_err(vdaf_err)?;
    let [leader, helper]: [V::InputShare; 2] = inputs
        .try_into()
        .map_err(|_| CoreError::Vdaf("expected two input shares".into()))?;
    Ok((
        public.get_encoded().map_err(vdaf_err)?,
        leader.get_encoded().map_err(vdaf_err)?,
        helper.get_encoded().map_err(vdaf_err)?,
    ))
}

fn decode_shares<V: Prio3Like>(
    v: &V,
    agg_id: usize,
    public_share: &[u8],
    input_share: &[u8],
) -> Result<(V::PublicShare, V::InputShare), PrepFailure> {
    let public = V::PublicShare::get_decoded_with_param(v, public_share)
        .map_err(|e| PrepFailure::Decode(format!("public share: {e}")))?;
    let input = V::InputShare::get_decoded_with_param(&(v, agg_id), input_share)
        .map_err(|e| PrepFailure::Decode(format!("input share: {e}")))?;
    Ok((public, input))
}

fn decode_ping_pong(bytes: &[u8]) -> Result<PingPongMessage, PrepFailure> {
    PingPongMessage::get_decoded(bytes).map_err(|e| PrepFailure::Decode(format!("message: {e}")))
}

fn encode_ping_pong(m: &PingPongMessage) -> Result<Vec<u8>, PrepFailure> {
    m.get_encoded()
        .map_err(|e| PrepFailure::Prepare(e.to_string()))
}

fn g_leader_init<V: Prio3Like>(
    v: &V,
    vk: &[u8; 16],
    nonce: &[u8; 16],
    public_share: &[u8],
    input_share: &[u8],
) -> Result<(LeaderPrepState, Vec<u8>), PrepFailure> {
    let (public, input) = decode_shares(v, 0, public_share, input_share)?;
    let (state, msg) = v
        .leader_initialized(vk, &(), nonce, &public, &input)
        .map_err(|e| PrepFailure::Prepare(e.to_string()))?;
    Ok((LeaderPrepState(Box::new(state)), encode_ping_pong(&msg)?))
}

fn g_helper_init<V: Prio3Like>(
    v: &V,
    vk: &[u8; 16],
    nonce: &[u8; 16],
    public_share: &[u8],
    input_share: &[u8],
    inbound: &[u8],
) -> Result<(OutputShare, Vec<u8>), PrepFailure> {
    let (public, input) = decode_shares(v, 1, public_share, input_share)?;
    let inbound = decode_ping_pong(inbound)?;
    let transition = v
        .helper_initialized(vk, &(), nonce, &public, &input, &inbound)
        .map_err(|e| PrepFailure::Prepare(e.to_string()))?;
    let (state, outbound) = transition
        .evaluate(v)
        .map_err(|e| PrepFailure::Prepare(e.to_string()))?;
    match state {
        PingPongState::Finished(out) => {
            Ok((OutputShare(Box::new(out)), encode_ping_pong(&outbound)?))
        }
        PingPongState::Continued(_) => Err(PrepFailure::Prepare(
            "multi-round preparation is not supported".into(),
        )),
    }
}

fn g_leader_continued<V: Prio3Like>(
    v: &V,
    state: LeaderPrepState,
    inbound: &[u8],
) -> Result<OutputShare, PrepFailure> {
    let state = state
        .0
        .downcast::<PingPongState<16, 16, V>>()
        .map_err(|_| PrepFailure::Prepare("state belongs to another VDAF".into()))?;
    let inbound = decode_ping_pong(inbound)?;
    match v
        .leader_continued(*state, &(), &inbound)
        .map_err(|e| PrepFailure::Prepare(e.to_string()))?
    {
        PingPongContinuedValue::FinishedNoMessage { output_share } => {
            Ok(OutputShare(Box::new(output_share)))
        }
        PingPongContinuedValue::WithMessage { .. } => Err(PrepFailure::Prepare(
            "multi-round preparation is not supported".into(),
        )),
    }
}

fn g_empty<V: Prio3Like>(v: &V) -> Result<AggregateShare, CoreError> {
    let share = v.aggregate(&(), std::iter::empty()).map_err(vdaf_err)?;
    Ok(AggregateShare(Box::new(share)))
}

fn g_accumulate<V: Prio3Like>(
    agg: &mut AggregateShare,
    out: &OutputShare,
) -> Result<(), CoreError> {
    let agg = agg
        .0
        .downcast_mut::<V::AggregateShare>()
        .ok_or_else(|| CoreError::Vdaf("aggregate share belongs to another VDAF".into()))?;
    let out = out
        .0
        .downcast_ref::<V::OutputShare>()
        .ok_or_else(|| CoreError::Vdaf("output share belongs to another VDAF".into()))?;
    agg.accumulate(out).map_err(vdaf_err)
}

fn g_merge<V: Prio3Like>(a: &mut AggregateShare, b: &AggregateShare) -> Result<(), CoreError> {
    let b =
        b.0.downcast_ref::<V::AggregateShare>()
            .ok_or_else(|| CoreError::Vdaf("aggregate share belongs to another VDAF".into()))?;
    let a =
        a.0.downcast_mut::<V::AggregateShare>()
            .ok_or_else(|| CoreError::Vdaf("aggregate share belongs to another VDAF".into()))?;
    a.merge(b).map_err(vdaf_err)
}

fn g_encode<V: Prio3Like>(agg: &AggregateShare) -> Result<Vec<u8>, CoreError> {
    agg.0
        .downcast_ref::<V::AggregateShare>()
        .ok_or_else(|| CoreError::Vdaf("aggregate share belongs to another VDAF".into()))?
        .get_encoded()
        .map_err(vdaf_err)
}

fn g_decode<V: Prio3Like>(v: &V, bytes: &[u8]) -> Result<AggregateShare, CoreError> {
    let share = V::AggregateShare::get_decoded_with_param(&(v, &()), bytes).map_err(vdaf_err)?;
    Ok(AggregateShare(Box::new(share)))
}

fn g_unshard<V: Prio3Like>(
    v: &V,
    leader: &[u8],
    helper: &[u8],
    count: u64,
) -> Result<V::AggregateResult, CoreError> {
    let l = V::AggregateShare::get_decoded_with_param(&(v, &()), leader).map_err(vdaf_err)?;
    let h = V::AggregateShare::get_decoded_with_param(&(v, &()), helper).map_err(vdaf_err)?;
    let count = usize::try_from(count).map_err(vdaf_err)?;
    v.unshard(&(), [l, h], count).map_err(vdaf_err)
}

impl Vdaf {
    /// The configuration this was built from.
    pub fn instance(&self) -> &VdafInstance {
        &self.instance
    }

    /// Splits a measurement: returns the encoded public share and the Leader's and Helper's
    /// encoded input shares.
    pub fn shard(
        &self,
        measurement: &Measurement,
        report_id: &ReportId,
    ) -> Result<Shards, CoreError> {
        let nonce = &report_id.0;
        let mismatch = || {
            CoreError::InvalidParameter(format!(
                "measurement {measurement:?} does not fit {}",
                self.instance
            ))
        };
        match (&self.inner, measurement) {
            (Inner::Count(v), Measurement::Count(b)) => g_shard(v, b, nonce),
            (Inner::Sum(v), Measurement::Sum(x)) => g_shard(v, x, nonce),
            (Inner::SumVec(v), Measurement::SumVec(x)) => g_shard(v, x, nonce),
            (Inner::Histogram(v), Measurement::Histogram(x)) => g_shard(v, x, nonce),
            _ => Err(mismatch()),
        }
    }

    /// The lengths of this VDAF's encoded shares, found by sharding a measurement of zeros (a
    /// fraction of a client's cost for one report).
    pub fn share_lengths(&self) -> Result<ShareLengths, CoreError> {
        let zero = match &self.instance {
            VdafInstance::Prio3Count => Measurement::Count(false),
            VdafInstance::Prio3Sum { .. } => Measurement::Sum(0),
            VdafInstance::Prio3SumVec { length, .. } => Measurement::SumVec(vec![0; *length]),
            VdafInstance::Prio3Histogram { .. } => Measurement::Histogram(0),
        };
        let (public, leader, helper) = self.shard(&zero, &ReportId([0; 16]))?;
        Ok(ShareLengths {
            public: public.len(),
            leader: leader.len(),
            helper: helper.len(),
        })
    }

    /// The Leader's first preparation step; returns its state and the message for the Helper.
    pub fn leader_init(
        &self,
        verify_key: &[u8; VERIFY_KEY_LENGTH],
        report_id: &ReportId,
        public_share: &[u8],
        input_share: &[u8],
    ) -> Result<(LeaderPrepState, Vec<u8>), PrepFailure> {
        dispatch!(self, v => g_leader_init(v, verify_key, &report_id.0, public_share, input_share))
    }

    /// The Helper's preparation, given the Leader's message; Prio3 finishes in this one round.
    /// Returns the output share and the message for the Leader.
    pub fn helper_init(
        &self,
        verify_key: &[u8; VERIFY_KEY_LENGTH],
        report_id: &ReportId,
        public_share: &[u8],
        input_share: &[u8],
        inbound: &[u8],
    ) -> Result<(OutputShare, Vec<u8>), PrepFailure> {
        dispatch!(self, v => g_helper_init(v, verify_key, &report_id.0, public_share, input_share, inbound))
    }

    /// The Leader's last step, given the Helper's message.
    pub fn leader_continued(
        &self,
        state: LeaderPrepState,
        inbound: &[u8],
    ) -> Result<OutputShare, PrepFailure> {
        dispatch!(self, v => g_leader_continued(v, state, inbound))
    }

    /// The length of an encoded aggregate share, in bytes: what one time bucket's aggregate
    /// takes in memory and in the store, however many reports it sums.
    pub fn aggregate_len(&self) -> Result<usize, CoreError> {
        Ok(self.encode_aggregate(&self.empty_aggregate()?)?.len())
    }

    /// An empty aggregate share.
    pub fn empty_aggregate(&self) -> Result<AggregateShare, CoreError> {
        dispatch!(self, v => g_empty(v))
    }

    /// Adds an output share into an aggregate share.
    pub fn accumulate(&self, agg: &mut AggregateShare, out: &OutputShare) -> Result<(), CoreError> {
        match &self.inner {
            Inner::Count(_) => g_accumulate::<Prio3Count>(agg, out),
            Inner::Sum(_) => g_accumulate::<Prio3Sum>(agg, out),
            Inner::SumVec(_) => g_accumulate::<Prio3SumVec>(agg, out),
            Inner::Histogram(_) => g_accumulate::<Prio3Histogram>(agg, out),
        }
    }

    /// Adds aggregate share `b` into `a`.
    pub fn merge(&self, a: &mut AggregateShare, b: &AggregateShare) -> Result<(), CoreError> {
        match &self.inner {
            Inner::Count(_) => g_merge::<Prio3Count>(a, b),
            Inner::Sum(_) => g_merge::<Prio3Sum>(a, b),
            Inner::SumVec(_) => g_merge::<Prio3SumVec>(a, b),
            Inner::Histogram(_) => g_merge::<Prio3Histogram>(a, b),
        }
    }

    /// Encodes an aggregate share.
    pub fn encode_aggregate(&self, agg: &AggregateShare) -> Result<Vec<u8>, CoreError> {
        match &self.inner {
            Inner::Count(_) => g_encode::<Prio3Count>(agg),
            Inner::Sum(_) => g_encode::<Prio3Sum>(agg),
            Inner::SumVec(_) => g_encode::<Prio3SumVec>(agg),
            Inner::Histogram(_) => g_encode::<Prio3Histogram>(agg),
        }
    }

    /// Decodes an aggregate share.
    pub fn decode_aggregate(&self, bytes: &[u8]) -> Result<AggregateShare, CoreError> {
        dispatch!(self, v => g_decode(v, bytes))
    }

    /// Adds two encoded aggregate shares, returning the encoded sum.
    pub fn merge_encoded(&self, a: &[u8], b: &[u8]) -> Result<Vec<u8>, CoreError> {
        let mut a = self.decode_aggregate(a)?;
        let b = self.decode_aggregate(b)?;
        self.merge(&mut a, &b)?;
        self.encode_aggregate(&a)
    }

    /// Combines the two aggregators' encoded aggregate shares into the result.
    pub fn unshard(
        &self,
        leader: &[u8],
        helper: &[u8],
        report_count: u64,
    ) -> Result<AggregateResult, CoreError> {
        Ok(match &self.inner {
            Inner::Count(v) => {
                AggregateResult::Number(u128::from(g_unshard(v, leader, helper, report_count)?))
            }
            Inner::Sum(v) => AggregateResult::Number(g_unshard(v, leader, helper, report_count)?),
            Inner::SumVec(v) => {
                AggregateResult::Vector(g_unshard(v, leader, helper, report_count)?)
            }
            Inner::Histogram(v) => {
                AggregateResult::Vector(g_unshard(v, leader, helper, report_count)?)
            }
        })
    }
}

#[cfg(test)]
mod tests;
