//! HPKE configuration and ciphertext messages (§4, §4.4.1).

use crate::codec::{
    decode_items, decode_opaque, encode_items, encode_opaque, read_opaque, CodecError, Decode,
    Encode, PrefixWidth, Reader, VecBounds,
};
use std::fmt;

macro_rules! define_number {
    ($(#[$doc:meta])* $name:ident($t:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub $t);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                self.0.encode(out);
            }
        }

        impl Decode for $name {
            fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                <$t>::decode(r).map(Self)
            }
        }
    };
}

define_number!(
    /// `HpkeConfigId`: names one of an Aggregator's or Collector's HPKE configs.
    HpkeConfigId(u8)
);
define_number!(
    /// `HpkeKemId` (RFC 9180 §7.1); unknown values are kept as numbers.
    HpkeKemId(u16)
);
define_number!(
    /// `HpkeKdfId` (RFC 9180 §7.2); unknown values are kept as numbers.
    HpkeKdfId(u16)
);
define_number!(
    /// `HpkeAeadId` (RFC 9180 §7.3); unknown values are kept as numbers.
    HpkeAeadId(u16)
);

impl HpkeKemId {
    /// DHKEM(P-256, HKDF-SHA256).
    pub const P256_HKDF_SHA256: Self = Self(0x0010);
    /// DHKEM(X25519, HKDF-SHA256), the mandatory suite.
    pub const X25519_HKDF_SHA256: Self = Self(0x0020);
}

impl HpkeKdfId {
    /// HKDF-SHA256.
    pub const HKDF_SHA256: Self = Self(0x0001);
    /// HKDF-SHA384.
    pub const HKDF_SHA384: Self = Self(0x0002);
    /// HKDF-SHA512.
    pub const HKDF_SHA512: Self = Self(0x0003);
}

impl HpkeAeadId {
    /// AES-128-GCM.
    pub const AES_128_GCM: Self = Self(0x0001);
    /// AES-256-GCM.
    pub const AES_256_GCM: Self = Self(0x0002);
    /// ChaCha20Poly1305.
    pub const CHACHA20_POLY1305: Self = Self(0x0003);
}

const PUBLIC_KEY: VecBounds = VecBounds::new("HpkePublicKey", PrefixWidth::U16, 1);
const CONFIG_LIST: VecBounds = VecBounds::new("HpkeConfigList", PrefixWidth::U16, 1);
const ENC: VecBounds = VecBounds::new("HpkeCiphertext.enc", PrefixWidth::U16, 1);
const PAYLOAD: VecBounds = VecBounds::new("HpkeCiphertext.payload", PrefixWidth::U32, 1);

/// `HpkePublicKey`: `opaque<1..2^16-1>` holding the KEM's serialized public key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HpkePublicKey(pub Vec<u8>);

impl Encode for HpkePublicKey {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_opaque(out, PUBLIC_KEY, &self.0);
    }
}

impl Decode for HpkePublicKey {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        decode_opaque(r, PUBLIC_KEY).map(Self)
    }
}

/// `HpkeConfig`: one public key and the suite to use it with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HpkeConfig {
    /// Identifier echoed in ciphertexts sealed to this key.
    pub id: HpkeConfigId,
    /// Key encapsulation mechanism.
    pub kem_id: HpkeKemId,
    /// Key derivation function.
    pub kdf_id: HpkeKdfId,
    /// AEAD.
    pub aead_id: HpkeAeadId,
    /// The public key.
    pub public_key: HpkePublicKey,
}

impl Encode for HpkeConfig {
    fn encode(&self, out: &mut Vec<u8>) {
        self.id.encode(out);
        self.kem_id.encode(out);
        self.kdf_id.encode(out);
        self.aead_id.encode(out);
        self.public_key.encode(out);
    }
}

impl Decode for HpkeConfig {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            id: HpkeConfigId::decode(r)?,
            kem_id: HpkeKemId::decode(r)?,
            kdf_id: HpkeKdfId::decode(r)?,
            aead_id: HpkeAeadId::decode(r)?,
            public_key: HpkePublicKey::decode(r)?,
        })
    }
}

/// `HpkeConfigList`: `HpkeConfig<1..2^16-1>`, the body of `GET /hpke_config`; never empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HpkeConfigList(pub Vec<HpkeConfig>);

impl Encode for HpkeConfigList {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_items(out, CONFIG_LIST, &self.0);
    }
}

impl Decode for HpkeConfigList {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        decode_items(r, CONFIG_LIST).map(Self)
    }
}

/// `HpkeCiphertext`: a sealed message; `enc` and `payload` must both be non-empty.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HpkeCiphertext {
    /// The config the message was sealed to.
    pub config_id: HpkeConfigId,
    /// The encapsulated key, `opaque enc<1..2^16-1>`.
    pub encapsulated_key: Vec<u8>,
    /// The AEAD ciphertext, `opaque payload<1..2^32-1>`.
    pub payload: Vec<u8>,
}

impl fmt::Debug for HpkeCiphertext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_ciphertext(f, "HpkeCiphertext", self.into())
    }
}

/// Ciphertexts are long and say nothing to a human: their `Debug` prints their sizes.
fn debug_ciphertext(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    ct: HpkeCiphertextRef<'_>,
) -> fmt::Result {
    f.debug_struct(name)
        .field("config_id", &ct.config_id)
        .field("encapsulated_key_len", &ct.encapsulated_key.len())
        .field("payload_len", &ct.payload.len())
        .finish()
}

impl Encode for HpkeCiphertext {
    fn encode(&self, out: &mut Vec<u8>) {
        self.config_id.encode(out);
        encode_opaque(out, ENC, &self.encapsulated_key);
        encode_opaque(out, PAYLOAD, &self.payload);
    }
}

impl Decode for HpkeCiphertext {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        HpkeCiphertextRef::decode(r).map(HpkeCiphertextRef::into_owned)
    }
}

impl<'a> From<&'a HpkeCiphertext> for HpkeCiphertextRef<'a> {
    fn from(ct: &'a HpkeCiphertext) -> Self {
        HpkeCiphertextRef {
            config_id: ct.config_id,
            encapsulated_key: &ct.encapsulated_key,
            payload: &ct.payload,
        }
    }
}

/// An [`HpkeCiphertext`] decoded in place: its fields are slices of the input.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HpkeCiphertextRef<'a> {
    /// The config the message was sealed to.
    pub config_id: HpkeConfigId,
    /// The encapsulated key, `opaque enc<1..2^16-1>`.
    pub encapsulated_key: &'a [u8],
    /// The AEAD ciphertext, `opaque payload<1..2^32-1>`.
    pub payload: &'a [u8],
}

impl fmt::Debug for HpkeCiphertextRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_ciphertext(f, "HpkeCiphertextRef", *self)
    }
}

impl<'a> HpkeCiphertextRef<'a> {
    /// Decodes one ciphertext from the front of `r`, with the same checks as
    /// [`HpkeCiphertext`]'s decoder.
    pub fn decode(r: &mut Reader<'a>) -> Result<Self, CodecError> {
        Ok(Self {
            config_id: HpkeConfigId::decode(r)?,
            encapsulated_key: read_opaque(r, ENC)?,
            payload: read_opaque(r, PAYLOAD)?,
        })
    }

    /// An owned copy.
    pub fn into_owned(self) -> HpkeCiphertext {
        HpkeCiphertext {
            config_id: self.config_id,
            encapsulated_key: self.encapsulated_key.to_vec(),
            payload: self.payload.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::hex;

    fn config() -> HpkeConfig {
        HpkeConfig {
            id: HpkeConfigId(7),
            kem_id: HpkeKemId::X25519_HKDF_SHA256,
            kdf_id: HpkeKdfId::HKDF_SHA256,
            aead_id: HpkeAeadId::AES_128_GCM,
            public_key: HpkePublicKey(vec![0xaa, 0xbb, 0xcc]),
        }
    }

    #[test]
    fn hpke_config_list_vector() {
        let bytes = hex(concat!(
            "000c",   // HpkeConfigList length: 12 bytes of configs
            "07",     // id
            "0020",   // kem_id: X25519-HKDF-SHA256
            "0001",   // kdf_id: HKDF-SHA256
            "0001",   // aead_id: AES-128-GCM
            "0003",   // public_key length
            "aabbcc", // public_key
        ));
        let list = HpkeConfigList(vec![config()]);
        assert_eq!(list.get_encoded(), bytes);
        assert_eq!(HpkeConfigList::get_decoded(&bytes), Ok(list));
    }

    #[test]
    fn empty_config_list_and_empty_key_are_rejected() {
        assert!(matches!(
            HpkeConfigList::get_decoded(&hex("0000")),
            Err(CodecError::LengthOutOfRange {
                what: "HpkeConfigList",
                len: 0,
                ..
            })
        ));
        assert!(matches!(
            HpkeConfig::get_decoded(&hex("07 0020 0001 0001 0000")),
            Err(CodecError::LengthOutOfRange {
                what: "HpkePublicKey",
                len: 0,
                ..
            })
        ));
    }

    #[test]
    fn config_list_length_must_cover_whole_configs() {
        // The list claims 11 bytes but the config inside needs 12.
        let bytes = hex("000b 07 0020 0001 0001 0003 aabbcc cc");
        assert_eq!(
            HpkeConfigList::get_decoded(&bytes),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    fn unknown_algorithm_ids_decode() {
        let bytes = hex("01 ffff fffe fffd 0001 00");
        let c = HpkeConfig::get_decoded(&bytes).expect("decodes");
        assert_eq!(
            (c.kem_id.0, c.kdf_id.0, c.aead_id.0),
            (0xffff, 0xfffe, 0xfffd)
        );
    }

    #[test]
    fn hpke_ciphertext_vector() {
        let bytes = hex(concat!(
            "2a",       // config_id = 42
            "0002",     // enc length
            "0102",     // enc
            "00000003", // payload length
            "030405",   // payload
        ));
        let ct = HpkeCiphertext {
            config_id: HpkeConfigId(42),
            encapsulated_key: vec![1, 2],
            payload: vec![3, 4, 5],
        };
        assert_eq!(ct.get_encoded(), bytes);
        assert_eq!(HpkeCiphertext::get_decoded(&bytes), Ok(ct));
    }

    #[test]
    fn ciphertext_bounds() {
        // Empty enc.
        assert!(matches!(
            HpkeCiphertext::get_decoded(&hex("2a 0000 00000001 ff")),
            Err(CodecError::LengthOutOfRange {
                what: "HpkeCiphertext.enc",
                ..
            })
        ));
        // Empty payload.
        assert!(matches!(
            HpkeCiphertext::get_decoded(&hex("2a 0001 ff 00000000")),
            Err(CodecError::LengthOutOfRange {
                what: "HpkeCiphertext.payload",
                ..
            })
        ));
        // Payload length prefix larger than the input.
        assert_eq!(
            HpkeCiphertext::get_decoded(&hex("2a 0001 ff ffffffff 01")),
            Err(CodecError::UnexpectedEnd)
        );
        // Truncated inside the enc prefix.
        assert_eq!(
            HpkeCiphertext::get_decoded(&hex("2a 00")),
            Err(CodecError::UnexpectedEnd)
        );
        // A trailing byte.
        assert_eq!(
            HpkeCiphertext::get_decoded(&hex("2a 0001 ff 00000001 ff 00")),
            Err(CodecError::TrailingBytes(1))
        );
    }
}
