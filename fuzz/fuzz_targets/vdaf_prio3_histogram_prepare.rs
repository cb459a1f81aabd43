#![no_main]
//! Prio3Histogram{length: 4, chunk_length: 2} preparation on shares and messages from strangers:
//! every step must return an error or a value, never panic.
//!
//! Input layout (short inputs are padded with zeros, missing fields are empty):
//! `verify_key[16] || report_id[16] || flags[1] || public_share<2> || leader_share<2> ||
//! helper_share<2> || inbound<2>`, each `<2>` a 2-byte big-endian length then the bytes.
//! If the Leader's init succeeds, its message goes to the Helper (or `inbound` when flag bit 0 is
//! set), and the Helper's answer back to the Leader (or `inbound` when bit 1 is set), so the
//! fuzzer reaches the later steps without having to forge a valid ping-pong message itself.

use std::sync::OnceLock;

use duet_core::vdaf::Vdaf;
use duet_core::VdafInstance;
use duet_messages::dap09::ReportId;
use libfuzzer_sys::fuzz_target;

fn vdaf() -> &'static Vdaf {
    static VDAF: OnceLock<Vdaf> = OnceLock::new();
    VDAF.get_or_init(|| {
        VdafInstance::Prio3Histogram {
            length: 4,
            chunk_length: 2,
        }
        .instantiate()
        .expect("Prio3Histogram{4, 2} is a valid instance")
    })
}

/// Splits fuzzer bytes into fields without ever failing.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = self.0.len().min(N);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(u16::from_be_bytes(self.array::<2>()));
        let n = self.0.len().min(len);
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
}

fuzz_target!(|data: &[u8]| {
    let vdaf = vdaf();
    let mut c = Cursor(data);
    let verify_key = c.array::<16>();
    let report_id = ReportId(c.array::<16>());
    let [flags] = c.array::<1>();
    let public_share = c.chunk();
    let leader_share = c.chunk();
    let helper_share = c.chunk();
    let inbound = c.chunk();

    // The Helper on a message straight from the fuzzer.
    let _ = vdaf.helper_init(&verify_key, &report_id, public_share, helper_share, inbound);

    let Ok((leader_state, to_helper)) =
        vdaf.leader_init(&verify_key, &report_id, public_share, leader_share)
    else {
        return;
    };
    let to_helper = if flags & 1 == 0 {
        &to_helper[..]
    } else {
        inbound
    };
    let helper = vdaf.helper_init(
        &verify_key,
        &report_id,
        public_share,
        helper_share,
        to_helper,
    );
    let to_leader = match (&helper, flags & 2 == 0) {
        (Ok((_, message)), true) => &message[..],
        _ => inbound,
    };
    let _ = vdaf.leader_continued(leader_state, to_leader);
});
