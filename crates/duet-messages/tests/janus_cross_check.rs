//! Byte-for-byte agreement with janus_messages 0.7.145 (DAP-09), in both directions.
//!
//! For each message a Duet value and a Janus value are built independently from the same data.
//! Duet's bytes must decode in Janus to that Janus value and re-encode identically, and Janus's
//! bytes must decode in Duet to that Duet value and re-encode identically. A proptest section
//! then pushes arbitrary Duet values through Janus.

mod common;

use duet_messages::dap09 as d;
use duet_messages::{Decode as DDecode, Encode as DEncode};
use janus_messages as j;
use janus_messages::query_type::{FixedSize, TimeInterval};
use prio::codec::{Decode as JDecode, Encode as JEncode};
use prio::topology::ping_pong::PingPongMessage;
use proptest::prelude::*;
use std::fmt::Debug;

/// Duet encodes; Janus decodes, re-encodes the same bytes; Duet decodes those back to `value`.
fn via_janus<J, D>(value: &D) -> J
where
    J: JEncode + JDecode + Debug,
    D: DEncode + DDecode + PartialEq + Debug,
{
    let bytes = DEncode::get_encoded(value);
    let janus = <J as JDecode>::get_decoded(&bytes)
        .unwrap_or_else(|e| panic!("Janus rejected Duet's {value:?}: {e}"));
    let janus_bytes = JEncode::get_encoded(&janus).expect("Janus encodes");
    assert_eq!(bytes, janus_bytes, "Janus re-encoded {value:?} differently");
    assert_eq!(
        &<D as DDecode>::get_decoded(&janus_bytes).expect("Duet decodes"),
        value
    );
    janus
}

/// Janus encodes; Duet decodes, re-encodes the same bytes; Janus decodes those back to `value`.
fn via_duet<D, J>(value: &J) -> D
where
    D: DEncode + DDecode + Debug,
    J: JEncode + JDecode + PartialEq + Debug,
{
    let bytes = JEncode::get_encoded(value).expect("Janus encodes");
    let duet = <D as DDecode>::get_decoded(&bytes)
        .unwrap_or_else(|e| panic!("Duet rejected Janus's {value:?}: {e}"));
    assert_eq!(
        DEncode::get_encoded(&duet),
        bytes,
        "Duet re-encoded {value:?} differently"
    );
    assert_eq!(
        &<J as JDecode>::get_decoded(&bytes).expect("Janus decodes"),
        value
    );
    duet
}

/// Both directions on a pair built independently from the same data.
fn agree<D, J>(duet: D, janus: J)
where
    D: DEncode + DDecode + PartialEq + Debug,
    J: JEncode + JDecode + PartialEq + Debug,
{
    assert_eq!(via_janus::<J, D>(&duet), janus);
    assert_eq!(via_duet::<D, J>(&janus), duet);
}

// ---- Shared sample data, built once in each library. ----

const TASK: [u8; 32] = [0x11; 32];
const BATCH: [u8; 32] = [0x22; 32];
const REPORT: [u8; 16] = [0x33; 16];
const REPORT2: [u8; 16] = [0x34; 16];
const T: u64 = 1_700_000_000;

fn d_ct(id: u8) -> d::HpkeCiphertext {
    d::HpkeCiphertext {
        config_id: d::HpkeConfigId(id),
        encapsulated_key: vec![id; 32],
        payload: vec![id ^ 0xff; 48],
    }
}

fn j_ct(id: u8) -> j::HpkeCiphertext {
    j::HpkeCiphertext::new(j::HpkeConfigId::from(id), vec![id; 32], vec![id ^ 0xff; 48])
}

fn d_interval() -> d::Interval {
    d::Interval::new(d::Time(T), d::Duration(3600)).expect("no overflow")
}

fn j_interval() -> j::Interval {
    j::Interval::new(
        j::Time::from_seconds_since_epoch(T),
        j::Duration::from_seconds(3600),
    )
    .expect("no overflow")
}

fn d_metadata(id: [u8; 16]) -> d::ReportMetadata {
    d::ReportMetadata {
        id: d::ReportId(id),
        time: d::Time(T),
    }
}

fn j_metadata(id: [u8; 16]) -> j::ReportMetadata {
    j::ReportMetadata::new(j::ReportId::from(id), j::Time::from_seconds_since_epoch(T))
}

fn d_report_share() -> d::ReportShare {
    d::ReportShare {
        metadata: d_metadata(REPORT),
        public_share: b"public".to_vec(),
        encrypted_input_share: d_ct(3),
    }
}

fn j_report_share() -> j::ReportShare {
    j::ReportShare::new(j_metadata(REPORT), b"public".to_vec(), j_ct(3))
}

fn pp_init() -> PingPongMessage {
    PingPongMessage::Initialize {
        prep_share: b"leader prep share".to_vec(),
    }
}

fn pp_continue() -> PingPongMessage {
    PingPongMessage::Continue {
        prep_msg: b"msg".to_vec(),
        prep_share: b"share".to_vec(),
    }
}

fn pp_finish() -> PingPongMessage {
    PingPongMessage::Finish {
        prep_msg: b"prep msg".to_vec(),
    }
}

fn pp_bytes(m: &PingPongMessage) -> Vec<u8> {
    JEncode::get_encoded(m).expect("ping-pong encodes")
}

fn d_checksum() -> d::ReportIdChecksum {
    d::ReportIdChecksum::for_report_id(&d::ReportId(REPORT)).updated_with(&d::ReportId(REPORT2))
}

fn j_checksum() -> j::ReportIdChecksum {
    // The spec's definition computed directly, not through Duet's helpers.
    use sha2::Digest;
    let a: [u8; 32] = sha2::Sha256::digest(REPORT).into();
    let b: [u8; 32] = sha2::Sha256::digest(REPORT2).into();
    j::ReportIdChecksum::from(std::array::from_fn(|i| a[i] ^ b[i]))
}

// ---- Fixed examples, one test per message family. ----

#[test]
fn ids_time_and_role() {
    agree(d::TaskId(TASK), j::TaskId::from(TASK));
    agree(d::BatchId(BATCH), j::BatchId::from(BATCH));
    agree(d::ReportId(REPORT), j::ReportId::from(REPORT));
    agree(d::Time(T), j::Time::from_seconds_since_epoch(T));
    agree(d::Duration(3600), j::Duration::from_seconds(3600));
    agree(d_interval(), j_interval());
    agree(d_checksum(), j_checksum());
    for (dr, jr) in [
        (d::Role::Collector, j::Role::Collector),
        (d::Role::Client, j::Role::Client),
        (d::Role::Leader, j::Role::Leader),
        (d::Role::Helper, j::Role::Helper),
    ] {
        agree(dr, jr);
    }
    agree(d::AggregationJobStep(7), j::AggregationJobStep::from(7u16));

    // Janus has no wire codec for job IDs (they only appear in URLs): compare the URL form.
    let agg = d::AggregationJobId([0xfe; 16]);
    let j_agg = j::AggregationJobId::from([0xfe; 16]);
    assert_eq!(agg.to_string(), j_agg.to_string());
    assert_eq!(j_agg.to_string().parse::<d::AggregationJobId>(), Ok(agg));
    let coll = d::CollectionJobId([0xfd; 16]);
    let j_coll = j::CollectionJobId::try_from(&[0xfd; 16][..]).expect("16 bytes");
    assert_eq!(coll.to_string(), j_coll.to_string());
    assert_eq!(j_coll.to_string().parse::<d::CollectionJobId>(), Ok(coll));
    assert_eq!(
        d::TaskId(TASK).to_string(),
        j::TaskId::from(TASK).to_string()
    );
}

#[test]
fn hpke_messages() {
    let d_config = |id: u8, kem, kdf, aead| d::HpkeConfig {
        id: d::HpkeConfigId(id),
        kem_id: kem,
        kdf_id: kdf,
        aead_id: aead,
        public_key: d::HpkePublicKey(vec![id; 32]),
    };
    let j_config = |id: u8, kem: u16, kdf: u16, aead: u16| {
        j::HpkeConfig::new(
            j::HpkeConfigId::from(id),
            j::HpkeKemId::from(kem),
            j::HpkeKdfId::from(kdf),
            j::HpkeAeadId::from(aead),
            j::HpkePublicKey::from(vec![id; 32]),
        )
    };
    let d_list = d::HpkeConfigList(vec![
        d_config(
            1,
            d::HpkeKemId::X25519_HKDF_SHA256,
            d::HpkeKdfId::HKDF_SHA256,
            d::HpkeAeadId::AES_128_GCM,
        ),
        d_config(
            2,
            d::HpkeKemId::P256_HKDF_SHA256,
            d::HpkeKdfId::HKDF_SHA384,
            d::HpkeAeadId::AES_256_GCM,
        ),
        d_config(
            3,
            d::HpkeKemId(0x0021),
            d::HpkeKdfId::HKDF_SHA512,
            d::HpkeAeadId::CHACHA20_POLY1305,
        ),
        d_config(
            4,
            d::HpkeKemId(0xabcd),
            d::HpkeKdfId(0x1234),
            d::HpkeAeadId(0xffff),
        ),
    ]);
    let j_list = j::HpkeConfigList::new(vec![
        j_config(1, 0x0020, 1, 1),
        j_config(2, 0x0010, 2, 2),
        j_config(3, 0x0021, 3, 3),
        j_config(4, 0xabcd, 0x1234, 0xffff),
    ]);
    // Janus's named constants are the same numbers as Duet's.
    assert_eq!(
        *j_list.hpke_configs()[0].kem_id(),
        j::HpkeKemId::X25519HkdfSha256
    );
    assert_eq!(
        *j_list.hpke_configs()[1].kem_id(),
        j::HpkeKemId::P256HkdfSha256
    );
    assert_eq!(
        *j_list.hpke_configs()[2].aead_id(),
        j::HpkeAeadId::ChaCha20Poly1305
    );
    agree(d_list.0[0].clone(), j_list.hpke_configs()[0].clone());
    agree(d_list, j_list);
    agree(d_ct(9), j_ct(9));
}

#[test]
fn upload_messages() {
    agree(d_metadata(REPORT), j_metadata(REPORT));
    agree(
        d::Report {
            metadata: d_metadata(REPORT),
            public_share: b"public share".to_vec(),
            leader_encrypted_input_share: d_ct(1),
            helper_encrypted_input_share: d_ct(2),
        },
        j::Report::new(
            j_metadata(REPORT),
            b"public share".to_vec(),
            j_ct(1),
            j_ct(2),
        ),
    );
    // An empty public share is allowed (Prio3 Count has one).
    agree(
        d::Report {
            metadata: d_metadata(REPORT2),
            public_share: vec![],
            leader_encrypted_input_share: d_ct(1),
            helper_encrypted_input_share: d_ct(2),
        },
        j::Report::new(j_metadata(REPORT2), vec![], j_ct(1), j_ct(2)),
    );
    agree(
        d::Extension {
            extension_type: d::ExtensionType::TASKPROV,
            extension_data: vec![],
        },
        j::Extension::new(j::ExtensionType::Taskprov, vec![]),
    );
    agree(
        d::PlaintextInputShare {
            extensions: vec![
                d::Extension {
                    extension_type: d::ExtensionType::TBD,
                    extension_data: b"tbd".to_vec(),
                },
                d::Extension {
                    extension_type: d::ExtensionType::TASKPROV,
                    extension_data: vec![],
                },
            ],
            payload: b"input share".to_vec(),
        },
        j::PlaintextInputShare::new(
            vec![
                j::Extension::new(j::ExtensionType::Tbd, b"tbd".to_vec()),
                j::Extension::new(j::ExtensionType::Taskprov, vec![]),
            ],
            b"input share".to_vec(),
        ),
    );
    agree(
        d::PlaintextInputShare {
            extensions: vec![],
            payload: vec![],
        },
        j::PlaintextInputShare::new(vec![], vec![]),
    );
    agree(
        d::InputShareAad {
            task_id: d::TaskId(TASK),
            metadata: d_metadata(REPORT),
            public_share: b"ps".to_vec(),
        },
        j::InputShareAad::new(j::TaskId::from(TASK), j_metadata(REPORT), b"ps".to_vec()),
    );
}

#[test]
fn aggregation_init() {
    agree(d_report_share(), j_report_share());
    agree(
        d::PrepareInit {
            report_share: d_report_share(),
            message: pp_bytes(&pp_init()),
        },
        j::PrepareInit::new(j_report_share(), pp_init()),
    );
    agree(
        d::PartialBatchSelector::TimeInterval,
        j::PartialBatchSelector::new_time_interval(),
    );
    agree(
        d::PartialBatchSelector::FixedSize(d::BatchId(BATCH)),
        j::PartialBatchSelector::new_fixed_size(j::BatchId::from(BATCH)),
    );

    let d_inits = vec![
        d::PrepareInit {
            report_share: d_report_share(),
            message: pp_bytes(&pp_init()),
        },
        d::PrepareInit {
            report_share: d_report_share(),
            message: pp_bytes(&pp_continue()),
        },
    ];
    let j_inits = vec![
        j::PrepareInit::new(j_report_share(), pp_init()),
        j::PrepareInit::new(j_report_share(), pp_continue()),
    ];
    agree(
        d::AggregationJobInitReq {
            aggregation_parameter: vec![],
            partial_batch_selector: d::PartialBatchSelector::TimeInterval,
            prepare_inits: d_inits.clone(),
        },
        j::AggregationJobInitializeReq::<TimeInterval>::new(
            vec![],
            j::PartialBatchSelector::new_time_interval(),
            j_inits.clone(),
        ),
    );
    agree(
        d::AggregationJobInitReq {
            aggregation_parameter: b"agg param".to_vec(),
            partial_batch_selector: d::PartialBatchSelector::FixedSize(d::BatchId(BATCH)),
            prepare_inits: d_inits,
        },
        j::AggregationJobInitializeReq::<FixedSize>::new(
            b"agg param".to_vec(),
            j::PartialBatchSelector::new_fixed_size(j::BatchId::from(BATCH)),
            j_inits,
        ),
    );
}

#[test]
fn aggregation_responses_and_continuation() {
    use d::PrepareError as DE;
    use j::PrepareError as JE;
    let errors = [
        (DE::BatchCollected, JE::BatchCollected),
        (DE::ReportReplayed, JE::ReportReplayed),
        (DE::ReportDropped, JE::ReportDropped),
        (DE::HpkeUnknownConfigId, JE::HpkeUnknownConfigId),
        (DE::HpkeDecryptError, JE::HpkeDecryptError),
        (DE::VdafPrepError, JE::VdafPrepError),
        (DE::BatchSaturated, JE::BatchSaturated),
        (DE::TaskExpired, JE::TaskExpired),
        (DE::InvalidMessage, JE::InvalidMessage),
        (DE::ReportTooEarly, JE::ReportTooEarly),
    ];
    assert_eq!(errors.len(), DE::ALL.len());
    for (de, je) in errors {
        agree(de, je);
        agree(
            d::PrepareStepResult::Reject(de),
            j::PrepareStepResult::Reject(je),
        );
    }

    let mut d_resps = vec![];
    let mut j_resps = vec![];
    for (i, (dr, jr)) in [
        (
            d::PrepareStepResult::Continue {
                message: pp_bytes(&pp_finish()),
            },
            j::PrepareStepResult::Continue {
                message: pp_finish(),
            },
        ),
        (
            d::PrepareStepResult::Continue {
                message: pp_bytes(&pp_continue()),
            },
            j::PrepareStepResult::Continue {
                message: pp_continue(),
            },
        ),
        (
            d::PrepareStepResult::Finished,
            j::PrepareStepResult::Finished,
        ),
        (
            d::PrepareStepResult::Reject(DE::VdafPrepError),
            j::PrepareStepResult::Reject(JE::VdafPrepError),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = [i as u8; 16];
        agree(dr.clone(), jr.clone());
        let d_resp = d::PrepareResp {
            report_id: d::ReportId(id),
            result: dr,
        };
        let j_resp = j::PrepareResp::new(j::ReportId::from(id), jr);
        agree(d_resp.clone(), j_resp.clone());
        d_resps.push(d_resp);
        j_resps.push(j_resp);
    }
    agree(
        d::AggregationJobResp {
            prepare_resps: d_resps,
        },
        j::AggregationJobResp::new(j_resps),
    );

    let d_cont = d::PrepareContinue {
        report_id: d::ReportId(REPORT),
        message: pp_bytes(&pp_continue()),
    };
    let j_cont = j::PrepareContinue::new(j::ReportId::from(REPORT), pp_continue());
    agree(d_cont.clone(), j_cont.clone());
    let d_cont2 = d::PrepareContinue {
        report_id: d::ReportId(REPORT2),
        message: pp_bytes(&pp_finish()),
    };
    let j_cont2 = j::PrepareContinue::new(j::ReportId::from(REPORT2), pp_finish());
    agree(
        d::AggregationJobContinueReq {
            step: d::AggregationJobStep(1),
            prepare_continues: vec![d_cont, d_cont2],
        },
        j::AggregationJobContinueReq::new(j::AggregationJobStep::from(1u16), vec![j_cont, j_cont2]),
    );
}

#[test]
fn collection_messages() {
    let d_ti_query = d::Query::TimeInterval {
        batch_interval: d_interval(),
    };
    let j_ti_query = j::Query::<TimeInterval>::new_time_interval(j_interval());
    let d_by_id = d::Query::FixedSize {
        fixed_size_query: d::FixedSizeQuery::ByBatchId {
            batch_id: d::BatchId(BATCH),
        },
    };
    let j_by_id = j::Query::<FixedSize>::new_fixed_size(j::FixedSizeQuery::ByBatchId {
        batch_id: j::BatchId::from(BATCH),
    });
    let d_current = d::Query::FixedSize {
        fixed_size_query: d::FixedSizeQuery::CurrentBatch,
    };
    let j_current = j::Query::<FixedSize>::new_fixed_size(j::FixedSizeQuery::CurrentBatch);

    agree(
        d::FixedSizeQuery::ByBatchId {
            batch_id: d::BatchId(BATCH),
        },
        j::FixedSizeQuery::ByBatchId {
            batch_id: j::BatchId::from(BATCH),
        },
    );
    agree(
        d::FixedSizeQuery::CurrentBatch,
        j::FixedSizeQuery::CurrentBatch,
    );
    agree(d_ti_query, j_ti_query.clone());
    agree(d_by_id, j_by_id.clone());
    agree(d_current, j_current.clone());

    agree(
        d::CollectionReq {
            query: d_ti_query,
            aggregation_parameter: vec![],
        },
        j::CollectionReq::new(j_ti_query, vec![]),
    );
    agree(
        d::CollectionReq {
            query: d_by_id,
            aggregation_parameter: b"p".to_vec(),
        },
        j::CollectionReq::new(j_by_id, b"p".to_vec()),
    );
    agree(
        d::CollectionReq {
            query: d_current,
            aggregation_parameter: vec![],
        },
        j::CollectionReq::new(j_current, vec![]),
    );

    agree(
        d::Collection {
            partial_batch_selector: d::PartialBatchSelector::TimeInterval,
            report_count: 100,
            interval: d_interval(),
            leader_encrypted_agg_share: d_ct(1),
            helper_encrypted_agg_share: d_ct(2),
        },
        j::Collection::<TimeInterval>::new(
            j::PartialBatchSelector::new_time_interval(),
            100,
            j_interval(),
            j_ct(1),
            j_ct(2),
        ),
    );
    agree(
        d::Collection {
            partial_batch_selector: d::PartialBatchSelector::FixedSize(d::BatchId(BATCH)),
            report_count: u64::MAX,
            interval: d_interval(),
            leader_encrypted_agg_share: d_ct(1),
            helper_encrypted_agg_share: d_ct(2),
        },
        j::Collection::<FixedSize>::new(
            j::PartialBatchSelector::new_fixed_size(j::BatchId::from(BATCH)),
            u64::MAX,
            j_interval(),
            j_ct(1),
            j_ct(2),
        ),
    );
}

#[test]
fn aggregate_share_messages() {
    let d_ti = d::BatchSelector::TimeInterval {
        batch_interval: d_interval(),
    };
    let j_ti = j::BatchSelector::<TimeInterval>::new_time_interval(j_interval());
    let d_fs = d::BatchSelector::FixedSize {
        batch_id: d::BatchId(BATCH),
    };
    let j_fs = j::BatchSelector::<FixedSize>::new_fixed_size(j::BatchId::from(BATCH));
    agree(d_ti, j_ti.clone());
    agree(d_fs, j_fs.clone());

    agree(
        d::AggregateShareReq {
            batch_selector: d_ti,
            aggregation_parameter: vec![],
            report_count: 2,
            checksum: d_checksum(),
        },
        j::AggregateShareReq::new(j_ti.clone(), vec![], 2, j_checksum()),
    );
    agree(
        d::AggregateShareReq {
            batch_selector: d_fs,
            aggregation_parameter: b"param".to_vec(),
            report_count: 0,
            checksum: d::ReportIdChecksum::default(),
        },
        j::AggregateShareReq::new(
            j_fs.clone(),
            b"param".to_vec(),
            0,
            j::ReportIdChecksum::default(),
        ),
    );
    agree(
        d::AggregateShare {
            encrypted_aggregate_share: d_ct(5),
        },
        j::AggregateShare::new(j_ct(5)),
    );
    agree(
        d::AggregateShareAad {
            task_id: d::TaskId(TASK),
            aggregation_parameter: vec![],
            batch_selector: d_ti,
        },
        j::AggregateShareAad::new(j::TaskId::from(TASK), vec![], j_ti),
    );
    agree(
        d::AggregateShareAad {
            task_id: d::TaskId(TASK),
            aggregation_parameter: b"x".to_vec(),
            batch_selector: d_fs,
        },
        j::AggregateShareAad::new(j::TaskId::from(TASK), b"x".to_vec(), j_fs),
    );
}

#[test]
fn media_types_match_janus() {
    use d::media_type as m;
    assert_eq!(m::HPKE_CONFIG_LIST, j::HpkeConfigList::MEDIA_TYPE);
    assert_eq!(m::REPORT, j::Report::MEDIA_TYPE);
    assert_eq!(
        m::AGGREGATION_JOB_INIT_REQ,
        j::AggregationJobInitializeReq::<TimeInterval>::MEDIA_TYPE
    );
    assert_eq!(m::AGGREGATION_JOB_RESP, j::AggregationJobResp::MEDIA_TYPE);
    assert_eq!(
        m::AGGREGATION_JOB_CONTINUE_REQ,
        j::AggregationJobContinueReq::MEDIA_TYPE
    );
    assert_eq!(
        m::COLLECTION_REQ,
        j::CollectionReq::<TimeInterval>::MEDIA_TYPE
    );
    assert_eq!(m::COLLECTION, j::Collection::<TimeInterval>::MEDIA_TYPE);
    assert_eq!(
        m::AGGREGATE_SHARE_REQ,
        j::AggregateShareReq::<TimeInterval>::MEDIA_TYPE
    );
    assert_eq!(m::AGGREGATE_SHARE, j::AggregateShare::MEDIA_TYPE);
}

#[test]
fn problem_types_match_janus() {
    use duet_messages::problem::DapProblemType;
    use j::problem_type::DapProblemType as J;
    for p in DapProblemType::ALL {
        let janus: J = p
            .type_uri()
            .parse()
            .expect("Janus knows every Duet problem type");
        assert_eq!(janus.type_uri(), p.type_uri());
        assert_eq!(DapProblemType::from_type_uri(janus.type_uri()), Some(p));
    }
}

// ---- Arbitrary values through Janus. ----

/// Checks one arbitrary value both ways through Janus, picking the Janus query type from the value.
macro_rules! through_janus {
    ($($name:ident: $strategy:expr => |$v:ident| $body:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            $(
                #[test]
                fn $name($v in $strategy) {
                    $body;
                }
            )*
        }
    };
}

fn qt_pbs(p: &d::PartialBatchSelector) -> d::QueryType {
    p.query_type()
}

through_janus! {
    prop_task_id: common::task_id() => |v| via_janus::<j::TaskId, _>(&v);
    prop_batch_id: common::batch_id() => |v| via_janus::<j::BatchId, _>(&v);
    prop_report_id: common::report_id() => |v| via_janus::<j::ReportId, _>(&v);
    prop_interval: common::interval() => |v| via_janus::<j::Interval, _>(&v);
    prop_role: common::role() => |v| via_janus::<j::Role, _>(&v);
    prop_hpke_config: common::hpke_config() => |v| via_janus::<j::HpkeConfig, _>(&v);
    prop_hpke_config_list: common::hpke_config_list() => |v| via_janus::<j::HpkeConfigList, _>(&v);
    prop_hpke_ciphertext: common::hpke_ciphertext() => |v| via_janus::<j::HpkeCiphertext, _>(&v);
    prop_report_metadata: common::report_metadata() => |v| via_janus::<j::ReportMetadata, _>(&v);
    prop_report: common::report() => |v| via_janus::<j::Report, _>(&v);
    prop_extension: common::extension() => |v| via_janus::<j::Extension, _>(&v);
    prop_plaintext_input_share: common::plaintext_input_share() => |v| via_janus::<j::PlaintextInputShare, _>(&v);
    prop_input_share_aad: common::input_share_aad() => |v| via_janus::<j::InputShareAad, _>(&v);
    prop_report_share: common::report_share() => |v| via_janus::<j::ReportShare, _>(&v);
    prop_prepare_init: common::prepare_init() => |v| via_janus::<j::PrepareInit, _>(&v);
    prop_partial_batch_selector: common::partial_batch_selector() => |v| match qt_pbs(&v) {
        d::QueryType::TimeInterval => { via_janus::<j::PartialBatchSelector<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::PartialBatchSelector<FixedSize>, _>(&v); }
    };
    prop_aggregation_job_init_req: common::aggregation_job_init_req() => |v| match qt_pbs(&v.partial_batch_selector) {
        d::QueryType::TimeInterval => { via_janus::<j::AggregationJobInitializeReq<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::AggregationJobInitializeReq<FixedSize>, _>(&v); }
    };
    prop_prepare_resp: common::prepare_resp() => |v| via_janus::<j::PrepareResp, _>(&v);
    prop_aggregation_job_resp: common::aggregation_job_resp() => |v| via_janus::<j::AggregationJobResp, _>(&v);
    prop_prepare_continue: common::prepare_continue() => |v| via_janus::<j::PrepareContinue, _>(&v);
    prop_aggregation_job_continue_req: common::aggregation_job_continue_req() => |v| via_janus::<j::AggregationJobContinueReq, _>(&v);
    prop_fixed_size_query: common::fixed_size_query() => |v| via_janus::<j::FixedSizeQuery, _>(&v);
    prop_collection_req: common::collection_req() => |v| match v.query.query_type() {
        d::QueryType::TimeInterval => { via_janus::<j::CollectionReq<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::CollectionReq<FixedSize>, _>(&v); }
    };
    prop_collection: common::collection() => |v| match qt_pbs(&v.partial_batch_selector) {
        d::QueryType::TimeInterval => { via_janus::<j::Collection<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::Collection<FixedSize>, _>(&v); }
    };
    prop_aggregate_share_req: common::aggregate_share_req() => |v| match v.batch_selector.query_type() {
        d::QueryType::TimeInterval => { via_janus::<j::AggregateShareReq<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::AggregateShareReq<FixedSize>, _>(&v); }
    };
    prop_aggregate_share: common::aggregate_share() => |v| via_janus::<j::AggregateShare, _>(&v);
    prop_aggregate_share_aad: common::aggregate_share_aad() => |v| match v.batch_selector.query_type() {
        d::QueryType::TimeInterval => { via_janus::<j::AggregateShareAad<TimeInterval>, _>(&v); }
        d::QueryType::FixedSize => { via_janus::<j::AggregateShareAad<FixedSize>, _>(&v); }
    };
}

// ---- Where the two decoders deliberately differ. ----

#[test]
fn duet_is_stricter_than_janus_on_lower_bounds() {
    // An HpkeCiphertext with an empty enc: DAP-09 says enc<1..2^16-1>.
    let bytes = [0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff];
    assert!(<j::HpkeCiphertext as JDecode>::get_decoded(&bytes).is_ok());
    assert!(<d::HpkeCiphertext as DDecode>::get_decoded(&bytes).is_err());

    // An AggregationJobResp with no prepare_resps: DAP-09 says <1..2^32-1>.
    let bytes = [0, 0, 0, 0];
    assert!(<j::AggregationJobResp as JDecode>::get_decoded(&bytes).is_ok());
    assert!(<d::AggregationJobResp as DDecode>::get_decoded(&bytes).is_err());

    // An empty HpkeConfigList: DAP-09 says <1..2^16-1>.
    assert!(<j::HpkeConfigList as JDecode>::get_decoded(&[0, 0]).is_ok());
    assert!(<d::HpkeConfigList as DDecode>::get_decoded(&[0, 0]).is_err());
}

#[test]
fn janus_is_stricter_than_duet_on_opaque_contents() {
    // Janus parses prepare payloads as ping-pong messages and only knows two extension types;
    // Duet keeps both opaque and leaves the judgement to the Aggregator.
    let d_cont = d::PrepareContinue {
        report_id: d::ReportId(REPORT),
        message: vec![7],
    };
    let bytes = DEncode::get_encoded(&d_cont);
    assert!(<j::PrepareContinue as JDecode>::get_decoded(&bytes).is_err());
    let ext = d::Extension {
        extension_type: d::ExtensionType(0x1234),
        extension_data: vec![],
    };
    assert!(<j::Extension as JDecode>::get_decoded(&DEncode::get_encoded(&ext)).is_err());
}
