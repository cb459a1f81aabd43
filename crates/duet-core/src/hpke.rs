//! HPKE (RFC 9180) as DAP-09 uses it, behind a small API so that the backend can be swapped.
//!
//! Only the mandatory suite is supported: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM,
//! in base mode with single-shot seal and open. The primitives come from `aws-lc-rs` (X25519 is
//! about twice as fast there as in x25519-dalek); the composition follows RFC 9180 §4–§5 and is
//! checked against the `hpke` crate in both directions and against RFC 9180's test vector.

use std::sync::{Arc, OnceLock};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use aws_lc_rs::agreement::{self, UnparsedPublicKey, X25519};
use aws_lc_rs::hmac;
use duet_messages::dap09::{
    HpkeAeadId, HpkeCiphertext, HpkeCiphertextRef, HpkeConfig, HpkeConfigId, HpkeKdfId, HpkeKemId,
    HpkePublicKey, Role,
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
#[derive(Clone, Debug)]
pub struct HpkeKeypair {
    /// The public configuration, as published at `/hpke_config`.
    pub config: HpkeConfig,
    /// The private key.
    pub private_key: HpkePrivateKey,
    /// The parsed private key: parsing an X25519 key costs a scalar multiplication, so it is
    /// done once per keypair rather than once per report.
    parsed: OnceLock<Arc<agreement::PrivateKey>>,
}

impl PartialEq for HpkeKeypair {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.private_key == other.private_key
    }
}

impl Eq for HpkeKeypair {}

impl HpkeKeypair {
    /// A keypair from its parts.
    pub fn new(config: HpkeConfig, private_key: HpkePrivateKey) -> Self {
        Self {
            config,
            private_key,
            parsed: OnceLock::new(),
        }
    }

    /// Generates a keypair of the mandatory suite with the given config ID.
    pub fn generate(id: HpkeConfigId) -> Self {
        // Any 32 bytes are an X25519 private key (RFC 7748 clamps them when used).
        let sk: [u8; 32] = rand::random();
        let public_key = x25519_public_key(&sk).unwrap_or_default();
        Self::new(
            HpkeConfig {
                id,
                kem_id: HpkeKemId::X25519_HKDF_SHA256,
                kdf_id: HpkeKdfId::HKDF_SHA256,
                aead_id: HpkeAeadId::AES_128_GCM,
                public_key: HpkePublicKey(public_key),
            },
            HpkePrivateKey(sk.to_vec()),
        )
    }

    fn parsed_private_key(&self) -> Result<Arc<agreement::PrivateKey>, CoreError> {
        if let Some(k) = self.parsed.get() {
            return Ok(Arc::clone(k));
        }
        let k = Arc::new(
            agreement::PrivateKey::from_private_key(&X25519, &self.private_key.0)
                .map_err(|_| CoreError::Hpke("bad private key".into()))?,
        );
        Ok(Arc::clone(self.parsed.get_or_init(|| k)))
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
        Ok(Self::new(config, private_key))
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

fn x25519_public_key(sk: &[u8]) -> Option<Vec<u8>> {
    let k = agreement::PrivateKey::from_private_key(&X25519, sk).ok()?;
    Some(k.compute_public_key().ok()?.as_ref().to_vec())
}

/// `I2OSP(kem_id, 2)` etc.: the suite IDs of RFC 9180 §4.1 and §5.1.
const KEM_SUITE_ID: &[u8] = b"KEM\x00\x20";
const HPKE_SUITE_ID: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x01";
const N_SECRET: usize = 32;
const N_K: usize = 16;
const N_N: usize = 12;

fn hkdf_extract(salt: &[u8], ikm_parts: &[&[u8]]) -> [u8; 32] {
    // RFC 5869: an empty salt is a string of HashLen zeros.
    let zeros = [0u8; 32];
    let key = hmac::Key::new(
        hmac::HMAC_SHA256,
        if salt.is_empty() { &zeros } else { salt },
    );
    let mut ctx = hmac::Context::with_key(&key);
    for p in ikm_parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// HKDF-Expand for outputs of at most one hash block, which is all HPKE needs here.
fn hkdf_expand_one_block(prk: &[u8; 32], info_parts: &[&[u8]], out: &mut [u8]) {
    debug_assert!(out.len() <= 32);
    let key = hmac::Key::new(hmac::HMAC_SHA256, prk);
    let mut ctx = hmac::Context::with_key(&key);
    for p in info_parts {
        ctx.update(p);
    }
    ctx.update(&[1]);
    let t = ctx.sign();
    out.copy_from_slice(&t.as_ref()[..out.len()]);
}

fn labeled_extract(suite_id: &[u8], salt: &[u8], label: &[u8], ikm: &[u8]) -> [u8; 32] {
    hkdf_extract(salt, &[b"HPKE-v1", suite_id, label, ikm])
}

fn labeled_expand(suite_id: &[u8], prk: &[u8; 32], label: &[u8], info: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    hkdf_expand_one_block(prk, &[&len, b"HPKE-v1", suite_id, label, info], out);
}

/// DHKEM's ExtractAndExpand (RFC 9180 §4.1).
fn kem_shared_secret(dh: &[u8], enc: &[u8], pk_r: &[u8]) -> Result<[u8; N_SECRET], CoreError> {
    if dh.iter().all(|&b| b == 0) {
        // RFC 9180 §7.1.4: a low-order public key gives an all-zero X25519 output.
        return Err(CoreError::Hpke(
            "invalid public key (all-zero shared secret)".into(),
        ));
    }
    let eae_prk = labeled_extract(KEM_SUITE_ID, b"", b"eae_prk", dh);
    let mut kem_context = Vec::with_capacity(enc.len() + pk_r.len());
    kem_context.extend_from_slice(enc);
    kem_context.extend_from_slice(pk_r);
    let mut secret = [0u8; N_SECRET];
    labeled_expand(
        KEM_SUITE_ID,
        &eae_prk,
        b"shared_secret",
        &kem_context,
        &mut secret,
    );
    Ok(secret)
}

/// The base-mode key schedule (RFC 9180 §5.1): AEAD key and base nonce.
fn key_schedule(shared_secret: &[u8; N_SECRET], info: &[u8]) -> ([u8; N_K], [u8; N_N]) {
    let psk_id_hash = labeled_extract(HPKE_SUITE_ID, b"", b"psk_id_hash", b"");
    let info_hash = labeled_extract(HPKE_SUITE_ID, b"", b"info_hash", info);
    let mut context = Vec::with_capacity(65);
    context.push(0u8); // mode_base
    context.extend_from_slice(&psk_id_hash);
    context.extend_from_slice(&info_hash);
    let secret = labeled_extract(HPKE_SUITE_ID, shared_secret, b"secret", b"");
    let mut key = [0u8; N_K];
    let mut nonce = [0u8; N_N];
    labeled_expand(HPKE_SUITE_ID, &secret, b"key", &context, &mut key);
    labeled_expand(HPKE_SUITE_ID, &secret, b"base_nonce", &context, &mut nonce);
    (key, nonce)
}

fn aead_key(key: &[u8; N_K]) -> Result<LessSafeKey, CoreError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, key).map_err(|_| CoreError::Hpke("bad AEAD key".into()))?,
    ))
}

fn dh(sk: &agreement::PrivateKey, pk: &[u8]) -> Result<Vec<u8>, CoreError> {
    agreement::agree(
        sk,
        UnparsedPublicKey::new(&X25519, pk),
        CoreError::Hpke("bad public key".into()),
        |s| Ok(s.to_vec()),
    )
}

/// Encrypts `plaintext` to `config` (HPKE base mode, single shot).
pub fn seal(
    config: &HpkeConfig,
    info: &HpkeApplicationInfo,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<HpkeCiphertext, CoreError> {
    check_suite(config)?;
    let pk_r = &config.public_key.0;
    let sk_e = agreement::PrivateKey::generate(&X25519)
        .map_err(|_| CoreError::Hpke("key generation failed".into()))?;
    let enc = sk_e
        .compute_public_key()
        .map_err(|_| CoreError::Hpke("key generation failed".into()))?
        .as_ref()
        .to_vec();
    let shared = kem_shared_secret(&dh(&sk_e, pk_r)?, &enc, pk_r)?;
    let (key, nonce) = key_schedule(&shared, &info.bytes());
    let mut payload = plaintext.to_vec();
    aead_key(&key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut payload,
        )
        .map_err(|_| CoreError::Hpke("encryption failed".into()))?;
    Ok(HpkeCiphertext {
        config_id: config.id,
        encapsulated_key: enc,
        payload,
    })
}

/// Decrypts a ciphertext sealed to `keypair`: an owned [`HpkeCiphertext`] or one decoded in
/// place ([`HpkeCiphertextRef`]). The payload is copied once, into the plaintext's buffer.
pub fn open<'a>(
    keypair: &HpkeKeypair,
    info: &HpkeApplicationInfo,
    ciphertext: impl Into<HpkeCiphertextRef<'a>>,
    aad: &[u8],
) -> Result<Vec<u8>, CoreError> {
    open_with_info(keypair, &info.bytes(), ciphertext.into(), aad)
}

fn open_with_info(
    keypair: &HpkeKeypair,
    info: &[u8],
    ciphertext: HpkeCiphertextRef<'_>,
    aad: &[u8],
) -> Result<Vec<u8>, CoreError> {
    check_suite(&keypair.config)?;
    let sk = keypair.parsed_private_key()?;
    let enc = ciphertext.encapsulated_key;
    let shared = kem_shared_secret(&dh(&sk, enc)?, enc, &keypair.config.public_key.0)?;
    let (key, nonce) = key_schedule(&shared, info);
    let mut buf = ciphertext.payload.to_vec();
    let len = aead_key(&key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| CoreError::Hpke("decryption failed".into()))?
        .len();
    buf.truncate(len);
    Ok(buf)
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

    fn vector() -> serde_json::Value {
        serde_json::from_str(include_str!("../tests/data/rfc9180-a1-base.json")).expect("vector")
    }

    fn hex_field(v: &serde_json::Value, k: &str) -> Vec<u8> {
        hex::decode(v[k].as_str().expect("field")).expect("hex")
    }

    #[test]
    fn rfc9180_a1_key_schedule_and_open() {
        let v = vector();
        let sk_e =
            agreement::PrivateKey::from_private_key(&X25519, &hex_field(&v, "skEm")).expect("skE");
        let pk_r = hex_field(&v, "pkRm");
        let enc = hex_field(&v, "enc");
        assert_eq!(x25519_public_key(&hex_field(&v, "skEm")).expect("pk"), enc);
        assert_eq!(x25519_public_key(&hex_field(&v, "skRm")).expect("pk"), pk_r);
        let shared = kem_shared_secret(&dh(&sk_e, &pk_r).expect("dh"), &enc, &pk_r).expect("kem");
        assert_eq!(shared.to_vec(), hex_field(&v, "shared_secret"));
        let (key, nonce) = key_schedule(&shared, &hex_field(&v, "info"));
        assert_eq!(key.to_vec(), hex_field(&v, "key"));
        assert_eq!(nonce.to_vec(), hex_field(&v, "base_nonce"));

        // The first encryption uses sequence number 0, i.e. the base nonce: single-shot open.
        let e = &v["encryptions"][0];
        let kp = HpkeKeypair::new(
            HpkeConfig {
                id: HpkeConfigId(0),
                kem_id: HpkeKemId::X25519_HKDF_SHA256,
                kdf_id: HpkeKdfId::HKDF_SHA256,
                aead_id: HpkeAeadId::AES_128_GCM,
                public_key: HpkePublicKey(pk_r),
            },
            HpkePrivateKey(hex_field(&v, "skRm")),
        );
        let ct = HpkeCiphertext {
            config_id: HpkeConfigId(0),
            encapsulated_key: enc,
            payload: hex_field(e, "ct"),
        };
        let info = hex_field(&v, "info");
        let pt = open_with_info(&kp, &info, (&ct).into(), &hex_field(e, "aad")).expect("open");
        assert_eq!(pt, hex_field(e, "pt"));
    }

    #[test]
    fn interoperates_with_the_hpke_crate() {
        use ::hpke::{Deserializable, Serializable};
        type Kem = ::hpke::kem::X25519HkdfSha256;
        type Kdf = ::hpke::kdf::HkdfSha256;
        type Aead = ::hpke::aead::AesGcm128;
        let kp = HpkeKeypair::generate(HpkeConfigId(3));
        let info = HpkeApplicationInfo::InputShare {
            server: Role::Leader,
        };
        // Ours seals, theirs opens.
        let ct = seal(&kp.config, &info, b"plaintext", b"aad").expect("seal");
        let sk = <Kem as ::hpke::Kem>::PrivateKey::from_bytes(&kp.private_key.0).expect("sk");
        let enc = <Kem as ::hpke::Kem>::EncappedKey::from_bytes(&ct.encapsulated_key).expect("enc");
        let pt = ::hpke::single_shot_open::<Aead, Kdf, Kem>(
            &::hpke::OpModeR::Base,
            &sk,
            &enc,
            &info.bytes(),
            &ct.payload,
            b"aad",
        )
        .expect("their open");
        assert_eq!(pt, b"plaintext");
        // Theirs seals, ours opens.
        let pk = <Kem as ::hpke::Kem>::PublicKey::from_bytes(&kp.config.public_key.0).expect("pk");
        let (enc, payload) = ::hpke::single_shot_seal::<Aead, Kdf, Kem, _>(
            &::hpke::OpModeS::Base,
            &pk,
            &info.bytes(),
            b"other plaintext",
            b"aad2",
            &mut rand::thread_rng(),
        )
        .expect("their seal");
        let ct = HpkeCiphertext {
            config_id: HpkeConfigId(3),
            encapsulated_key: enc.to_bytes().to_vec(),
            payload,
        };
        assert_eq!(
            open(&kp, &info, &ct, b"aad2").expect("our open"),
            b"other plaintext"
        );
    }

    #[test]
    fn low_order_points_and_garbage_are_rejected() {
        let kp = HpkeKeypair::generate(HpkeConfigId(1));
        let info = HpkeApplicationInfo::InputShare {
            server: Role::Leader,
        };
        for enc in [vec![0u8; 32], vec![1u8; 31], Vec::new()] {
            let ct = HpkeCiphertext {
                config_id: HpkeConfigId(1),
                encapsulated_key: enc,
                payload: vec![0; 32],
            };
            assert!(open(&kp, &info, &ct, b"").is_err());
        }
    }

    #[test]
    fn keypair_serde_round_trip() {
        let kp = HpkeKeypair::generate(HpkeConfigId(1));
        assert_eq!(HpkeKeypair::from_serde(&kp.to_serde()).expect("parse"), kp);
    }
}
