//! Duet's DAP wire messages and their strict codec.
//!
//! This crate never does I/O: it turns messages into bytes and back. [`codec`] holds the
//! [`Encode`]/[`Decode`] traits and the length-prefix helpers; [`dap09`] the DAP-09 messages;
//! [`problem`] the problem-document types used in error responses.

#![forbid(unsafe_code)]

pub mod codec;
pub mod dap09;
pub mod problem;

pub use codec::{CodecError, Decode, Encode};

#[cfg(test)]
mod test_util {
    /// Parses hex, ignoring spaces, for readable test vectors.
    pub fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        assert!(digits.len() % 2 == 0, "odd number of hex digits");
        digits
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("ascii");
                u8::from_str_radix(pair, 16).expect("hex digit")
            })
            .collect()
    }
}
