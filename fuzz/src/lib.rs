//! Shared checks for Duet's fuzz targets.

use duet_messages::{Decode, Encode};

/// Decodes `data` as `M`; if it decodes, re-encoding must give back exactly `data`.
///
/// Duet's codec is canonical (strict lengths, no trailing bytes, no alternative encodings), so
/// any accepted input is the one and only encoding of its value. A difference means the decoder
/// accepted something it should have refused, or the encoder lost information.
pub fn round_trip<M>(data: &[u8])
where
    M: Decode + Encode + PartialEq + std::fmt::Debug,
{
    if let Ok(message) = M::get_decoded(data) {
        let encoded = message.get_encoded();
        assert_eq!(
            encoded, data,
            "decode then encode changed the bytes of {message:?}"
        );
        let again = M::get_decoded(&encoded).expect("an encoding that just decoded decodes");
        assert_eq!(
            again, message,
            "decoding the re-encoding gave another value"
        );
    }
}

/// Declares a fuzz target that runs [`round_trip`] for one DAP-09 message type.
#[macro_export]
macro_rules! round_trip_target {
    ($message:ty) => {
        libfuzzer_sys::fuzz_target!(|data: &[u8]| {
            duet_fuzz::round_trip::<$message>(data);
        });
    };
}
