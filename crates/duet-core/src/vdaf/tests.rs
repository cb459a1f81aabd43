//! Tests of the VDAF wrapper: round trips, lengths, parameter checks.

use super::*;

fn run(instance: VdafInstance, measurements: &[&str]) {
    let vdaf = instance.instantiate().expect("instantiate");
    let vk = [7u8; 16];
    let mut leader_agg = vdaf.empty_aggregate().expect("empty");
    let mut helper_agg = vdaf.empty_aggregate().expect("empty");
    let ms: Vec<Measurement> = measurements
        .iter()
        .map(|m| instance.parse_measurement(m).expect("parse"))
        .collect();
    let lengths = vdaf.share_lengths().expect("share lengths");
    for m in &ms {
        let id = ReportId(rand::random());
        let (public, l, h) = vdaf.shard(m, &id).expect("shard");
        // Every measurement's shares have the lengths the upload check expects.
        let sharded = ShareLengths {
            public: public.len(),
            leader: l.len(),
            helper: h.len(),
        };
        assert_eq!(sharded, lengths, "{instance}: {m:?}");
        let (state, msg) = vdaf
            .leader_init(&vk, &id, &public, &l)
            .expect("leader init");
        let (hout, reply) = vdaf
            .helper_init(&vk, &id, &public, &h, &msg)
            .expect("helper init");
        let lout = vdaf
            .leader_continued(state, &reply)
            .expect("leader continued");
        vdaf.accumulate(&mut leader_agg, &lout).expect("acc");
        vdaf.accumulate(&mut helper_agg, &hout).expect("acc");
    }
    let l = vdaf.encode_aggregate(&leader_agg).expect("enc");
    let h = vdaf.encode_aggregate(&helper_agg).expect("enc");
    // A sum of reports takes as many bytes as an empty aggregate.
    let aggregate_len = vdaf.aggregate_len().expect("aggregate length");
    assert_eq!(
        (l.len(), h.len()),
        (aggregate_len, aggregate_len),
        "{instance}"
    );
    let got = vdaf.unshard(&l, &h, ms.len() as u64).expect("unshard");
    assert_eq!(got, instance.plaintext_aggregate(&ms).expect("plain"));
}

#[test]
fn every_vdaf_round_trips() {
    run(VdafInstance::Prio3Count, &["1", "0", "1"]);
    run(VdafInstance::Prio3Sum { bits: 8 }, &["1", "200", "255"]);
    run(
        VdafInstance::Prio3SumVec {
            bits: 4,
            length: 3,
            chunk_length: 2,
        },
        &["1,2,3", "15,0,1"],
    );
    run(
        VdafInstance::Prio3Histogram {
            length: 4,
            chunk_length: 2,
        },
        &["0", "3", "3"],
    );
}

/// One field element per entry of the output: 8 bytes for Prio3Count's, 16 for the others'.
#[test]
fn aggregates_take_a_field_element_per_output_entry() {
    let len = |instance: VdafInstance| {
        instance
            .instantiate()
            .expect("instantiate")
            .aggregate_len()
            .expect("aggregate length")
    };
    assert_eq!(len(VdafInstance::Prio3Count), 8);
    assert_eq!(len(VdafInstance::Prio3Sum { bits: 8 }), 16);
    let sum_vec = VdafInstance::Prio3SumVec {
        bits: 1,
        length: 1000,
        chunk_length: 31,
    };
    assert_eq!(len(sum_vec), 16_000);
    let histogram = VdafInstance::Prio3Histogram {
        length: 100,
        chunk_length: 10,
    };
    assert_eq!(len(histogram), 1_600);
}

#[test]
fn bad_measurements_are_refused_with_a_reason() {
    let e = VdafInstance::Prio3Sum { bits: 4 }
        .parse_measurement("16")
        .unwrap_err();
    assert!(e.to_string().contains("4 bits"), "{e}");
    assert!(VdafInstance::Prio3Count.parse_measurement("2").is_err());
    let h = VdafInstance::Prio3Histogram {
        length: 3,
        chunk_length: 1,
    };
    assert!(h.parse_measurement("3").is_err());
    let sv = VdafInstance::Prio3SumVec {
        bits: 2,
        length: 2,
        chunk_length: 1,
    };
    assert!(sv.parse_measurement("1").is_err());
    assert!(sv.parse_measurement("1,x").is_err());
}

#[test]
fn corrupt_shares_are_rejected_not_panicking() {
    let instance = VdafInstance::Prio3Count;
    let vdaf = instance.instantiate().expect("instantiate");
    let id = ReportId([1; 16]);
    let (public, l, _) = vdaf.shard(&Measurement::Count(true), &id).expect("shard");
    assert!(matches!(
        vdaf.leader_init(&[0; 16], &id, &public, &l[1..]),
        Err(PrepFailure::Decode(_))
    ));
}

#[test]
fn vdaf_json_shape() {
    let v: VdafInstance =
        serde_json::from_str(r#"{"type":"Prio3Histogram","length":10,"chunk_length":3}"#)
            .expect("json");
    assert_eq!(
        v,
        VdafInstance::Prio3Histogram {
            length: 10,
            chunk_length: 3
        }
    );
}

/// VDAFs whose reports could never fit an upload are refused with a message, not built (a
/// SumVec of 10^11 64-bit entries would exhaust memory, a length's product overflow).
#[test]
fn vdafs_too_large_to_upload_are_refused() {
    for too_large in [
        VdafInstance::Prio3SumVec {
            bits: 64,
            length: 100_000_000_000,
            chunk_length: 1,
        },
        VdafInstance::Prio3SumVec {
            bits: 16,
            length: usize::MAX / 8,
            chunk_length: 1,
        },
        VdafInstance::Prio3Histogram {
            length: MAX_MEASUREMENT_LEN + 1,
            chunk_length: 1024,
        },
    ] {
        let Err(e) = too_large.instantiate() else {
            panic!("{too_large} was built");
        };
        assert!(e.to_string().contains("at most"), "{e}");
    }
    // A chunk longer than the measurement would make any proof that long.
    for chunk_too_long in [
        VdafInstance::Prio3Histogram {
            length: 2,
            chunk_length: 1 << 62,
        },
        VdafInstance::Prio3Histogram {
            length: 2,
            chunk_length: 3,
        },
        VdafInstance::Prio3SumVec {
            bits: 2,
            length: 3,
            chunk_length: 7,
        },
        VdafInstance::Prio3SumVec {
            bits: 1,
            length: 1,
            chunk_length: usize::MAX,
        },
    ] {
        let Err(e) = chunk_too_long.instantiate() else {
            panic!("{chunk_too_long} was built");
        };
        assert!(e.to_string().contains("chunk_length may be at most"), "{e}");
    }
    for longest_chunk in [
        VdafInstance::Prio3Histogram {
            length: 2,
            chunk_length: 2,
        },
        VdafInstance::Prio3SumVec {
            bits: 2,
            length: 3,
            chunk_length: 6,
        },
    ] {
        longest_chunk
            .instantiate()
            .expect("a chunk as long as the measurement");
    }
    assert_eq!(default_chunk_length(usize::MAX), 1 << 32);
    assert_eq!(default_chunk_length(10), 4);
    assert_eq!(default_chunk_length(16), 4);
    assert_eq!(default_chunk_length(0), 1);
}
