//! A Bloom filter of report IDs, for replay sets that keep most of their IDs out of the hot
//! path: an ID it lacks needs no probe of the stored set.
//!
//! IDs are hashed with a key of this process's own, so clients cannot choose IDs that collide in
//! it (a collision would only cost a probe).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// Filter bits per ID it is sized for: about one false positive in a thousand.
const BITS_PER_ID: usize = 16;
/// IDs a filter is sized for at least (2 MiB of bits, mapped only as they are set).
const MIN_CAPACITY: usize = 1 << 20;
/// Odd multipliers, one per word of a block: each picks the bit an ID sets in its word.
const SALTS: [u32; 8] = [
    0x428a_2f99,
    0x7137_4491,
    0xb5c0_fbcf,
    0xe9b5_dba5,
    0x3956_c25b,
    0x59f1_11f1,
    0x923f_82a5,
    0xab1c_5ed5,
];

/// A split-block Bloom filter: an ID sets one bit in each of the eight 32-bit words of one
/// 256-bit block, so a check reads one cache line.
#[derive(Clone)]
pub(crate) struct Bloom {
    blocks: Vec<[u32; 8]>,
    hasher: RandomState,
    /// IDs added.
    len: usize,
    /// IDs it is sized for.
    capacity: usize,
}

impl std::fmt::Debug for Bloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bloom({} of {} IDs)", self.len, self.capacity)
    }
}

impl Bloom {
    /// An empty filter sized for `ids` IDs (at least [`MIN_CAPACITY`]).
    pub(crate) fn with_capacity(ids: usize) -> Bloom {
        let capacity = ids.max(MIN_CAPACITY);
        Bloom {
            blocks: vec![[0; 8]; capacity.saturating_mul(BITS_PER_ID).div_ceil(256)],
            hasher: RandomState::new(),
            len: 0,
            capacity,
        }
    }

    /// The block an ID falls in, and its bits in each word.
    fn locate(&self, id: &[u8; 16]) -> (usize, [u32; 8]) {
        let hash = self.hasher.hash_one(id);
        // The high half picks the block (multiply and shift: no division, any block count);
        // the low half, multiplied by each salt, the bit in each word.
        let block = ((hash >> 32) * self.blocks.len() as u64) >> 32;
        let low = hash as u32;
        (
            block as usize,
            SALTS.map(|salt| 1 << (low.wrapping_mul(salt) >> 27)),
        )
    }

    pub(crate) fn insert(&mut self, id: &[u8; 16]) {
        let (block, bits) = self.locate(id);
        for (word, bit) in self.blocks[block].iter_mut().zip(bits) {
            *word |= bit;
        }
        self.len += 1;
    }

    /// IDs added.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// `false` if `id` was never added; `true` if it was, or (rarely) by chance.
    pub(crate) fn may_contain(&self, id: &[u8; 16]) -> bool {
        let (block, bits) = self.locate(id);
        self.blocks[block]
            .iter()
            .zip(bits)
            .all(|(word, bit)| word & bit != 0)
    }

    /// Whether more IDs were added than it was sized for (it stays correct, with more false
    /// positives).
    pub(crate) fn overfull(&self) -> bool {
        self.len > self.capacity
    }
}

#[cfg(test)]
mod tests {
    use duet_messages::dap09::ReportId;

    use super::*;

    #[test]
    fn never_misses_an_added_id_and_rarely_claims_another() {
        let mut bloom = Bloom::with_capacity(0);
        let added: Vec<ReportId> = (0..MIN_CAPACITY).map(|_| ReportId::random()).collect();
        for id in &added {
            bloom.insert(&id.0);
        }
        assert!(added.iter().all(|id| bloom.may_contain(&id.0)));
        let trials = 200_000;
        let false_positives = (0..trials)
            .filter(|_| bloom.may_contain(&ReportId::random().0))
            .count();
        // About one in a thousand at its capacity; well under one in a hundred.
        assert!(
            false_positives < trials / 100,
            "{false_positives} of {trials}"
        );
        assert!(!bloom.overfull());
        bloom.insert(&ReportId::random().0);
        assert!(bloom.overfull());
    }
}
