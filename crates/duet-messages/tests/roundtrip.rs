//! Property tests: for every message type, decode∘encode is the identity, every strict prefix
//! and every one-byte extension of an encoding is rejected, and whatever decodes re-encodes to the
//! same bytes (the encoding is canonical).

mod common;

use common::*;
use duet_messages::dap09::*;
use duet_messages::{CodecError, Decode, Encode};
use proptest::prelude::*;
use std::fmt::Debug;

fn check_roundtrip<T: Encode + Decode + PartialEq + Debug>(value: &T) -> Result<(), TestCaseError> {
    let bytes = value.get_encoded();
    let decoded = T::get_decoded(&bytes);
    prop_assert_eq!(decoded.as_ref(), Ok(value));

    for cut in 0..bytes.len() {
        prop_assert!(
            T::get_decoded(&bytes[..cut]).is_err(),
            "prefix of length {} decoded",
            cut
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    prop_assert_eq!(
        T::get_decoded(&longer).err(),
        Some(CodecError::TrailingBytes(1))
    );
    Ok(())
}

/// Whatever a corrupted encoding decodes to must encode back to exactly those bytes.
fn check_canonical<T: Encode + Decode + Debug>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(value) = T::get_decoded(bytes) {
        prop_assert_eq!(value.get_encoded(), bytes, "{:?}", value);
    }
    Ok(())
}

macro_rules! roundtrip_tests {
    ($($name:ident: $ty:ty = $strategy:expr;)*) => {
        $(
            mod $name {
                use super::*;

                proptest! {
                    #![proptest_config(ProptestConfig::with_cases(128))]

                    #[test]
                    fn roundtrip(value in $strategy) {
                        check_roundtrip::<$ty>(&value)?;
                    }

                    #[test]
                    fn corrupted_encoding_is_canonical_or_rejected(
                        value in $strategy,
                        at in any::<prop::sample::Index>(),
                        byte in any::<u8>(),
                    ) {
                        let mut bytes = value.get_encoded();
                        let i = at.index(bytes.len());
                        bytes[i] = byte;
                        check_canonical::<$ty>(&bytes)?;
                    }

                    #[test]
                    fn random_bytes_are_canonical_or_rejected(
                        bytes in proptest::collection::vec(any::<u8>(), 0..64),
                    ) {
                        check_canonical::<$ty>(&bytes)?;
                    }
                }
            }
        )*
    };
}

roundtrip_tests! {
    task_id: TaskId = task_id();
    batch_id: BatchId = batch_id();
    report_id: ReportId = report_id();
    aggregation_job_id: AggregationJobId = aggregation_job_id();
    collection_job_id: CollectionJobId = collection_job_id();
    time: Time = time();
    duration: Duration = duration();
    interval: Interval = interval();
    role: Role = role();
    hpke_config: HpkeConfig = hpke_config();
    hpke_config_list: HpkeConfigList = hpke_config_list();
    hpke_ciphertext: HpkeCiphertext = hpke_ciphertext();
    report_metadata: ReportMetadata = report_metadata();
    report: Report = report();
    extension: Extension = extension();
    plaintext_input_share: PlaintextInputShare = plaintext_input_share();
    input_share_aad: InputShareAad = input_share_aad();
    report_share: ReportShare = report_share();
    prepare_init: PrepareInit = prepare_init();
    partial_batch_selector: PartialBatchSelector = partial_batch_selector();
    aggregation_job_init_req: AggregationJobInitReq = aggregation_job_init_req();
    prepare_error: PrepareError = prepare_error();
    prepare_step_result: PrepareStepResult = prepare_step_result();
    prepare_resp: PrepareResp = prepare_resp();
    aggregation_job_resp: AggregationJobResp = aggregation_job_resp();
    aggregation_job_step: AggregationJobStep = aggregation_job_step();
    prepare_continue: PrepareContinue = prepare_continue();
    aggregation_job_continue_req: AggregationJobContinueReq = aggregation_job_continue_req();
    fixed_size_query: FixedSizeQuery = fixed_size_query();
    query: Query = query();
    collection_req: CollectionReq = collection_req();
    collection: Collection = collection();
    batch_selector: BatchSelector = batch_selector();
    report_id_checksum: ReportIdChecksum = report_id_checksum();
    aggregate_share_req: AggregateShareReq = aggregate_share_req();
    aggregate_share: AggregateShare = aggregate_share();
    aggregate_share_aad: AggregateShareAad = aggregate_share_aad();
}

proptest! {
    /// Duet keeps unknown extension types and arbitrary prepare payloads opaque.
    #[test]
    fn opaque_fields_take_any_value(
        extension_type in any::<u16>(),
        data in bytes(16),
        message in bytes(16),
        report_id in report_id(),
    ) {
        check_roundtrip(&Extension { extension_type: ExtensionType(extension_type), extension_data: data })?;
        check_roundtrip(&PrepareContinue { report_id, message })?;
    }

    /// IDs print as unpadded base64url and parse back.
    #[test]
    fn ids_display_round_trip(task in task_id(), job in aggregation_job_id(), coll in collection_job_id()) {
        prop_assert_eq!(task.to_string().parse::<TaskId>(), Ok(task));
        prop_assert_eq!(job.to_string().parse::<AggregationJobId>(), Ok(job));
        prop_assert_eq!(coll.to_string().parse::<CollectionJobId>(), Ok(coll));
        prop_assert!(!task.to_string().contains('='));
    }

    /// Interval arithmetic agrees with a naive model.
    #[test]
    fn interval_model(a in interval(), b in interval(), t in time()) {
        let (a_end, b_end) = (u128::from(a.start.0) + u128::from(a.duration.0), u128::from(b.start.0) + u128::from(b.duration.0));
        prop_assert_eq!(a.contains(t), u128::from(a.start.0) <= u128::from(t.0) && u128::from(t.0) < a_end);
        let model_overlap = a.duration.0 > 0 && b.duration.0 > 0
            && u128::from(a.start.0) < b_end && u128::from(b.start.0) < a_end;
        prop_assert_eq!(a.overlaps(&b), model_overlap);
        prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
    }

    /// Rounding down lands on a multiple not after the input and less than one precision before it.
    #[test]
    fn round_down_model(t in time(), p in 1u64..100_000) {
        let r = t.round_down(Duration(p));
        prop_assert!(r <= t && r.0 % p == 0 && t.0 - r.0 < p);
    }

    /// The checksum is order-independent.
    #[test]
    fn checksum_commutes(ids in proptest::collection::vec(report_id(), 0..6)) {
        let forward = ids.iter().fold(ReportIdChecksum::default(), |c, id| c.updated_with(id));
        let backward = ids.iter().rev().fold(ReportIdChecksum::default(), |c, id| c.updated_with(id));
        prop_assert_eq!(forward, backward);
    }
}
