//! Fixed-length identifiers (§4, §4.3): task, batch, report, aggregation job, collection job.
//!
//! On the wire each is its raw bytes with no prefix; in URLs and logs it is unpadded base64url.

use crate::codec::{CodecError, Decode, Encode, Reader};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid base64url identifier.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParseIdError {
    /// Not canonical unpadded base64url.
    #[error("{what} is not unpadded base64url")]
    Base64 {
        /// The identifier type.
        what: &'static str,
    },
    /// Decoded to the wrong number of bytes.
    #[error("{what} must be {expected} bytes, got {actual}")]
    Length {
        /// The identifier type.
        what: &'static str,
        /// Required length in bytes.
        expected: usize,
        /// Decoded length in bytes.
        actual: usize,
    },
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the identifier in bytes.
            pub const LEN: usize = $len;

            /// A fresh identifier from the thread-local CSPRNG.
            pub fn random() -> Self {
                Self(rand::random())
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl From<[u8; $len]> for $name {
            fn from(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = ParseIdError;

            fn try_from(bytes: &[u8]) -> Result<Self, ParseIdError> {
                <[u8; $len]>::try_from(bytes).map(Self).map_err(|_| ParseIdError::Length {
                    what: stringify!($name),
                    expected: $len,
                    actual: bytes.len(),
                })
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, ParseIdError> {
                let bytes = URL_SAFE_NO_PAD
                    .decode(s)
                    .map_err(|_| ParseIdError::Base64 { what: stringify!($name) })?;
                Self::try_from(bytes.as_slice())
            }
        }

        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.0);
            }
        }

        impl Decode for $name {
            fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                r.read_array().map(Self)
            }
        }
    };
}

define_id!(
    /// `TaskID`: 32 bytes naming a DAP task.
    TaskId,
    32
);
define_id!(
    /// `BatchID`: 32 bytes naming a fixed_size batch.
    BatchId,
    32
);
define_id!(
    /// `ReportID`: 16 bytes chosen by the Client; also the VDAF nonce.
    ReportId,
    16
);
define_id!(
    /// `AggregationJobID`: 16 bytes chosen by the Leader.
    AggregationJobId,
    16
);
define_id!(
    /// `CollectionJobID`: 16 bytes chosen by the Collector.
    CollectionJobId,
    16
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_unpadded_base64url() {
        let id = ReportId([0xfb; 16]);
        assert_eq!(id.to_string(), "-_v7-_v7-_v7-_v7-_v7-w");
        assert_eq!(format!("{id:?}"), "ReportId(-_v7-_v7-_v7-_v7-_v7-w)");
        assert_eq!("-_v7-_v7-_v7-_v7-_v7-w".parse(), Ok(id));
    }

    #[test]
    fn from_str_is_strict() {
        // Padding, the standard alphabet and wrong lengths are all rejected.
        assert!("-_v7-_v7-_v7-_v7-_v7-w==".parse::<ReportId>().is_err());
        assert!("+/v7+/v7+/v7+/v7+/v7+w".parse::<ReportId>().is_err());
        assert_eq!(
            "AAAA".parse::<TaskId>(),
            Err(ParseIdError::Length {
                what: "TaskId",
                expected: 32,
                actual: 3
            })
        );
        // Non-canonical trailing bits.
        assert!("-_v7-_v7-_v7-_v7-_v7-x".parse::<ReportId>().is_err());
    }

    #[test]
    fn random_ids_differ_and_round_trip() {
        let (a, b) = (TaskId::random(), TaskId::random());
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse(), Ok(a));
        assert_eq!(TaskId::get_decoded(&a.get_encoded()), Ok(a));
    }

    #[test]
    fn decode_needs_all_bytes() {
        assert_eq!(
            BatchId::get_decoded(&[0; 31]),
            Err(CodecError::UnexpectedEnd)
        );
        assert_eq!(
            AggregationJobId::get_decoded(&[0; 17]),
            Err(CodecError::TrailingBytes(1))
        );
    }
}
