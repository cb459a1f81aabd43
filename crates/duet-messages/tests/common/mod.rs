//! proptest strategies for every DAP-09 message, shared by the round-trip and Janus tests.
//!
//! Generated values are small and always within the wire bounds. They are also valid for Janus:
//! prepare messages are well-formed ping-pong messages and extension types are 0 or 0xff00,
//! because Janus decodes both eagerly.

// Each test binary uses a different subset of these strategies.
#![allow(dead_code)]

use duet_messages::dap09::*;
use proptest::collection::vec;
use proptest::prelude::*;

/// Up to `max` arbitrary bytes.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(any::<u8>(), 0..=max)
}

/// Between 1 and `max` arbitrary bytes.
pub fn nonempty_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> + Clone {
    vec(any::<u8>(), 1..=max)
}

/// Encodes a VDAF-08 ping-pong message: a type byte, then `u32`-prefixed fields.
pub fn ping_pong(message_type: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![message_type];
    for field in fields {
        let len = u32::try_from(field.len()).expect("small field");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// A well-formed ping-pong message of any of the three types.
pub fn ping_pong_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        bytes(12).prop_map(|share| ping_pong(0, &[&share])),
        (bytes(12), bytes(12)).prop_map(|(msg, share)| ping_pong(1, &[&msg, &share])),
        bytes(12).prop_map(|msg| ping_pong(2, &[&msg])),
    ]
}

pub fn task_id() -> impl Strategy<Value = TaskId> {
    any::<[u8; 32]>().prop_map(TaskId)
}

pub fn batch_id() -> impl Strategy<Value = BatchId> {
    any::<[u8; 32]>().prop_map(BatchId)
}

pub fn report_id() -> impl Strategy<Value = ReportId> {
    any::<[u8; 16]>().prop_map(ReportId)
}

pub fn aggregation_job_id() -> impl Strategy<Value = AggregationJobId> {
    any::<[u8; 16]>().prop_map(AggregationJobId)
}

pub fn collection_job_id() -> impl Strategy<Value = CollectionJobId> {
    any::<[u8; 16]>().prop_map(CollectionJobId)
}

pub fn time() -> impl Strategy<Value = Time> {
    any::<u64>().prop_map(Time)
}

pub fn duration() -> impl Strategy<Value = Duration> {
    any::<u64>().prop_map(Duration)
}

/// An interval whose end does not overflow.
pub fn interval() -> impl Strategy<Value = Interval> {
    any::<u64>().prop_flat_map(|start| {
        (0..=u64::MAX - start).prop_map(move |d| Interval {
            start: Time(start),
            duration: Duration(d),
        })
    })
}

pub fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Collector),
        Just(Role::Client),
        Just(Role::Leader),
        Just(Role::Helper)
    ]
}

pub fn hpke_config() -> impl Strategy<Value = HpkeConfig> {
    (
        any::<u8>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        nonempty_bytes(40),
    )
        .prop_map(|(id, kem, kdf, aead, pk)| HpkeConfig {
            id: HpkeConfigId(id),
            kem_id: HpkeKemId(kem),
            kdf_id: HpkeKdfId(kdf),
            aead_id: HpkeAeadId(aead),
            public_key: HpkePublicKey(pk),
        })
}

pub fn hpke_config_list() -> impl Strategy<Value = HpkeConfigList> {
    vec(hpke_config(), 1..4).prop_map(HpkeConfigList)
}

pub fn hpke_ciphertext() -> impl Strategy<Value = HpkeCiphertext> {
    (any::<u8>(), nonempty_bytes(40), nonempty_bytes(40)).prop_map(|(id, enc, payload)| {
        HpkeCiphertext {
            config_id: HpkeConfigId(id),
            encapsulated_key: enc,
            payload,
        }
    })
}

pub fn report_metadata() -> impl Strategy<Value = ReportMetadata> {
    (report_id(), time()).prop_map(|(id, time)| ReportMetadata { id, time })
}

pub fn report() -> impl Strategy<Value = Report> {
    (
        report_metadata(),
        bytes(40),
        hpke_ciphertext(),
        hpke_ciphertext(),
    )
        .prop_map(|(metadata, public_share, leader, helper)| Report {
            metadata,
            public_share,
            leader_encrypted_input_share: leader,
            helper_encrypted_input_share: helper,
        })
}

/// Extensions of the two types Janus can decode.
pub fn extension() -> impl Strategy<Value = Extension> {
    (
        prop_oneof![Just(ExtensionType::TBD), Just(ExtensionType::TASKPROV)],
        bytes(16),
    )
        .prop_map(|(extension_type, extension_data)| Extension {
            extension_type,
            extension_data,
        })
}

pub fn plaintext_input_share() -> impl Strategy<Value = PlaintextInputShare> {
    (vec(extension(), 0..3), bytes(40)).prop_map(|(extensions, payload)| PlaintextInputShare {
        extensions,
        payload,
    })
}

pub fn input_share_aad() -> impl Strategy<Value = InputShareAad> {
    (task_id(), report_metadata(), bytes(40)).prop_map(|(task_id, metadata, public_share)| {
        InputShareAad {
            task_id,
            metadata,
            public_share,
        }
    })
}

pub fn report_share() -> impl Strategy<Value = ReportShare> {
    (report_metadata(), bytes(40), hpke_ciphertext()).prop_map(
        |(metadata, public_share, encrypted_input_share)| ReportShare {
            metadata,
            public_share,
            encrypted_input_share,
        },
    )
}

pub fn prepare_init() -> impl Strategy<Value = PrepareInit> {
    (report_share(), ping_pong_message()).prop_map(|(report_share, message)| PrepareInit {
        report_share,
        message,
    })
}

pub fn partial_batch_selector() -> impl Strategy<Value = PartialBatchSelector> {
    prop_oneof![
        Just(PartialBatchSelector::TimeInterval),
        batch_id().prop_map(PartialBatchSelector::FixedSize),
    ]
}

pub fn aggregation_job_init_req() -> impl Strategy<Value = AggregationJobInitReq> {
    (
        bytes(8),
        partial_batch_selector(),
        vec(prepare_init(), 1..4),
    )
        .prop_map(
            |(aggregation_parameter, partial_batch_selector, prepare_inits)| {
                AggregationJobInitReq {
                    aggregation_parameter,
                    partial_batch_selector,
                    prepare_inits,
                }
            },
        )
}

pub fn prepare_error() -> impl Strategy<Value = PrepareError> {
    proptest::sample::select(PrepareError::ALL.to_vec())
}

pub fn prepare_step_result() -> impl Strategy<Value = PrepareStepResult> {
    prop_oneof![
        ping_pong_message().prop_map(|message| PrepareStepResult::Continue { message }),
        Just(PrepareStepResult::Finished),
        prepare_error().prop_map(PrepareStepResult::Reject),
    ]
}

pub fn prepare_resp() -> impl Strategy<Value = PrepareResp> {
    (report_id(), prepare_step_result())
        .prop_map(|(report_id, result)| PrepareResp { report_id, result })
}

pub fn aggregation_job_resp() -> impl Strategy<Value = AggregationJobResp> {
    vec(prepare_resp(), 1..4).prop_map(|prepare_resps| AggregationJobResp { prepare_resps })
}

pub fn aggregation_job_step() -> impl Strategy<Value = AggregationJobStep> {
    any::<u16>().prop_map(AggregationJobStep)
}

pub fn prepare_continue() -> impl Strategy<Value = PrepareContinue> {
    (report_id(), ping_pong_message())
        .prop_map(|(report_id, message)| PrepareContinue { report_id, message })
}

pub fn aggregation_job_continue_req() -> impl Strategy<Value = AggregationJobContinueReq> {
    (aggregation_job_step(), vec(prepare_continue(), 1..4)).prop_map(|(step, prepare_continues)| {
        AggregationJobContinueReq {
            step,
            prepare_continues,
        }
    })
}

pub fn fixed_size_query() -> impl Strategy<Value = FixedSizeQuery> {
    prop_oneof![
        batch_id().prop_map(|batch_id| FixedSizeQuery::ByBatchId { batch_id }),
        Just(FixedSizeQuery::CurrentBatch),
    ]
}

pub fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        interval().prop_map(|batch_interval| Query::TimeInterval { batch_interval }),
        fixed_size_query().prop_map(|fixed_size_query| Query::FixedSize { fixed_size_query }),
    ]
}

pub fn collection_req() -> impl Strategy<Value = CollectionReq> {
    (query(), bytes(8)).prop_map(|(query, aggregation_parameter)| CollectionReq {
        query,
        aggregation_parameter,
    })
}

pub fn collection() -> impl Strategy<Value = Collection> {
    (
        partial_batch_selector(),
        any::<u64>(),
        interval(),
        hpke_ciphertext(),
        hpke_ciphertext(),
    )
        .prop_map(
            |(partial_batch_selector, report_count, interval, leader, helper)| Collection {
                partial_batch_selector,
                report_count,
                interval,
                leader_encrypted_agg_share: leader,
                helper_encrypted_agg_share: helper,
            },
        )
}

pub fn batch_selector() -> impl Strategy<Value = BatchSelector> {
    prop_oneof![
        interval().prop_map(|batch_interval| BatchSelector::TimeInterval { batch_interval }),
        batch_id().prop_map(|batch_id| BatchSelector::FixedSize { batch_id }),
    ]
}

pub fn report_id_checksum() -> impl Strategy<Value = ReportIdChecksum> {
    any::<[u8; 32]>().prop_map(ReportIdChecksum)
}

pub fn aggregate_share_req() -> impl Strategy<Value = AggregateShareReq> {
    (
        batch_selector(),
        bytes(8),
        any::<u64>(),
        report_id_checksum(),
    )
        .prop_map(
            |(batch_selector, aggregation_parameter, report_count, checksum)| AggregateShareReq {
                batch_selector,
                aggregation_parameter,
                report_count,
                checksum,
            },
        )
}

pub fn aggregate_share() -> impl Strategy<Value = AggregateShare> {
    hpke_ciphertext().prop_map(|encrypted_aggregate_share| AggregateShare {
        encrypted_aggregate_share,
    })
}

pub fn aggregate_share_aad() -> impl Strategy<Value = AggregateShareAad> {
    (task_id(), bytes(8), batch_selector()).prop_map(
        |(task_id, aggregation_parameter, batch_selector)| AggregateShareAad {
            task_id,
            aggregation_parameter,
            batch_selector,
        },
    )
}
