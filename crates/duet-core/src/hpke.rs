//! HPKE (RFC 9180) as DAP-09 uses it, behind a small API so that the backend can be swapped.
//!
//! Only the mandatory suite is supported: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM.

use ::hpke::aead::AesGcm128;
use ::hpke::kdf::HkdfSha256;
use ::hpke::kem::X25519HkdfSha256;
use ::hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use duet_messages::dap09::{
    HpkeAeadId, HpkeCiphertext, HpkeConfig, HpkeConfigId, HpkeKdfId, HpkeKemId, HpkePublicKey, Role,
};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// The `info` string of an HPKE operation, which binds a ciphertext to its purpose and recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HpkeApplicationInfo {
    /// A report's input share, sealed by a client to `server` (Leader or Helper).
    InputShare {
        /// The aggregator the share is for.
        server: Role,
    },
    /// An aggregate share, sealed by `server` to the collector.
    AggregateShare {
        /// The aggregator that sealed it.
        server: Role,
    },
}

impl HpkeApplicationInfo {
    /// The info bytes, as DAP-09 §4.4.2 and §4.6.4 define them.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Self::InputShare { server } => {
                let mut v = b"dap-09 input share".to_vec();
                v.push(Role::Client.as_u8());
                v.push(server.as_u8());
                v
            }
            Self::AggregateShare { server } => {
                let mut v = b"dap-09 aggregate share".to_vec();
                v.push(server.as_u8());
                v.push(Role::Collector.as_u8());
                v
            }
        }
    }
}

/// An HPKE private key, as raw bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct HpkePrivateKey(pub Vec<u8>);

impl std::fmt::Debug for HpkePrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HpkePrivateKey(<redacted>)")
    }
}

/// An HPKE configuration and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HpkeKeypair {
    /// The public configuration, as published at `/hpke_config`.
    pub config: HpkeConfig,
    /// The private key.
    pub private_key: HpkePrivateKey,
}

impl HpkeKeypair {
    /// Generates a keypair of the mandatory suite with the given config ID.
    pub fn generate(id: HpkeConfigId) -> Self {
        let (sk, pk) = X25519HkdfSha256::gen_keypair(&mut rand::thread_rng());
        Self {
            config: HpkeConfig {
                id,
                kem_id: HpkeKemId::X25519_HKDF_SHA256,
                kdf_id: HpkeKdfId::HKDF_SHA256,
                aead_id: HpkeAeadId::AES_128_GCM,
                public_key: HpkePublicKey(pk.to_bytes().to_vec()),
            },
            private_key: HpkePrivateKey(sk.to_bytes().to_vec()),
        }
    }

    /// Serializable form (base64url of the encoded config and of the private key).
    pub fn to_serde(&self) -> HpkeKeypairSerde {
        use duet_messages::Encode;
        HpkeKeypairSerde {
            config: b64(&self.config.get_encoded()),
            private_key: b64(&self.private_key.0),
        }
    }

    /// Parses the serializable form.
    pub fn from_serde(s: &HpkeKeypairSerde) -> Result<Self, CoreError> {
        use duet_messages::Decode;
        let config = HpkeConfig::get_decoded(&unb64(&s.config)?)?;
        let private_key = HpkePrivateKey(unb64(&s.private_key)?);
        check_suite(&config)?;
        Ok(Self {
            config,
            private_key,
        })
    }
}

/// An [`HpkeKeypair`] as stored in files and databases.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HpkeKeypairSerde {
    /// Unpadded base64url of the encoded `HpkeConfig`.
    pub config: String,
    /// Unpadded base64url of the private key.
    pub private_key: String,
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn unb64(s: &str) -> Result<Vec<u8>, CoreError> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| CoreError::InvalidParameter(format!("bad base64url: {e}")))
}

/// Checks that a config uses the one suite this build supports.
pub fn check_suite(config: &HpkeConfig) -> Result<(), CoreError> {
    if config.kem_id != HpkeKemId::X25519_HKDF_SHA256
        || config.kdf_id != HpkeKdfId::HKDF_SHA256
        || config.aead_id != HpkeAeadId::AES_128_GCM
    {
        return Err(CoreError::Hpke(format!(
            "unsupported HPKE suite (KEM {:#06x}, KDF {:#06x}, AEAD {:#06x}); Duet supports \
             X25519-HKDF-SHA256 / HKDF-SHA256 / AES-128-GCM",
            config.kem_id.0, config.kdf_id.0, config.aead_id.0
        )));
    }
    Ok(())
}

/// Encrypts `plaintext` to `config` (HPKE base mode, single shot).
pub fn seal(
    config: &HpkeConfig,
    info: &HpkeApplicationInfo,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<HpkeCiphertext, CoreError> {
    check_suite(config)?;
    let pk = <X25519HkdfSha256 as ::hpke::Kem>::PublicKey::from_bytes(&config.public_key.0)
        .map_err(|e| CoreError::Hpke(format!("bad public key: {e}")))?;
    let (enc, payload) = ::hpke::single_shot_seal::<AesGcm128, HkdfSha256, X25519HkdfSha256, _>(
        &OpModeS::Base,
        &pk,
        &info.bytes(),
        plaintext,
        aad,
        &mut rand::thread_rng(),
    )
    .map_err(|e| CoreError::Hpke(e.to_string()))?;
    Ok(HpkeCiphertext {
        config_id: config.id,
        encapsulated_key: enc.to_bytes().to_vec(),
        payload,
    })
}

/// Decrypts a ciphertext sealed to `keypair`.
pub fn open(
    keypair: &HpkeKeypair,
    info: &HpkeApplicationInfo,
    ciphertext: &HpkeCiphertext,
    aad: &[u8],
) -> Result<Vec<u8>, CoreError> {
    check_suite(&keypair.config)?;
    let sk = <X25519HkdfSha256 as ::hpke::Kem>::PrivateKey::from_bytes(&keypair.private_key.0)
        .map_err(|e| CoreError::Hpke(format!("bad private key: {e}")))?;
    let enc =
        <X25519HkdfSha256 as ::hpke::Kem>::EncappedKey::from_bytes(&ciphertext.encapsulated_key)
            .map_err(|e| CoreError::Hpke(format!("bad encapsulated key: {e}")))?;
    ::hpke::single_shot_open::<AesGcm128, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &sk,
        &enc,
        &info.bytes(),
        &ciphertext.payload,
        aad,
    )
    .map_err(|e| CoreError::Hpke(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open() {
        let kp = HpkeKeypair::generate(HpkeConfigId(7));
        let info = HpkeApplicationInfo::InputShare {
            server: Role::Leader,
        };
        let ct = seal(&kp.config, &info, b"hello", b"aad").expect("seal");
        assert_eq!(ct.config_id, HpkeConfigId(7));
        assert_eq!(open(&kp, &info, &ct, b"aad").expect("open"), b"hello");
        // Wrong AAD, wrong info, and a flipped byte all fail.
        assert!(open(&kp, &info, &ct, b"aaD").is_err());
        let other = HpkeApplicationInfo::InputShare {
            server: Role::Helper,
        };
        assert!(open(&kp, &other, &ct, b"aad").is_err());
        let mut bad = ct.clone();
        bad.payload[0] ^= 1;
        assert!(open(&kp, &info, &bad, b"aad").is_err());
    }

    #[test]
    fn info_strings_match_dap09() {
        let i = HpkeApplicationInfo::InputShare {
            server: Role::Helper,
        }
        .bytes();
        assert_eq!(i, b"dap-09 input share\x01\x03");
        let a = HpkeApplicationInfo::AggregateShare {
            server: Role::Leader,
        }
        .bytes();
        assert_eq!(a, b"dap-09 aggregate share\x02\x00");
    }

    #[test]
    fn keypair_serde_round_trip() {
        let kp = HpkeKeypair::generate(HpkeConfigId(1));
        assert_eq!(HpkeKeypair::from_serde(&kp.to_serde()).expect("parse"), kp);
    }
}
