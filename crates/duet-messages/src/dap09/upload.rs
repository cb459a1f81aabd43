//! Upload messages (§4.4): what a Client sends and what the Aggregators decrypt.

use super::{HpkeCiphertext, HpkeCiphertextRef, ReportId, TaskId, Time};
use crate::codec::{
    decode_items, decode_opaque, encode_items, encode_opaque, read_opaque, CodecError, Decode,
    Encode, PrefixWidth, Reader, VecBounds,
};

const PUBLIC_SHARE: VecBounds = VecBounds::new("public_share", PrefixWidth::U32, 0);
const EXTENSION_DATA: VecBounds = VecBounds::new("Extension.extension_data", PrefixWidth::U16, 0);
const EXTENSIONS: VecBounds = VecBounds::new("PlaintextInputShare.extensions", PrefixWidth::U16, 0);
const INPUT_SHARE: VecBounds = VecBounds::new("PlaintextInputShare.payload", PrefixWidth::U32, 0);

/// `ReportMetadata`: a report's ID and (rounded) timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReportMetadata {
    /// `report_id`.
    pub id: ReportId,
    /// `time`, which the Client should round down to the task's time_precision.
    pub time: Time,
}

impl Encode for ReportMetadata {
    fn encode(&self, out: &mut Vec<u8>) {
        self.id.encode(out);
        self.time.encode(out);
    }
}

impl Decode for ReportMetadata {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            id: ReportId::decode(r)?,
            time: Time::decode(r)?,
        })
    }
}

/// `Report`: the body of an upload, one input share sealed to each Aggregator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Report {
    /// Report ID and timestamp.
    pub metadata: ReportMetadata,
    /// The VDAF public share, `opaque<0..2^32-1>`.
    pub public_share: Vec<u8>,
    /// `PlaintextInputShare` sealed to the Leader.
    pub leader_encrypted_input_share: HpkeCiphertext,
    /// `PlaintextInputShare` sealed to the Helper.
    pub helper_encrypted_input_share: HpkeCiphertext,
}

impl Encode for Report {
    fn encode(&self, out: &mut Vec<u8>) {
        self.metadata.encode(out);
        encode_opaque(out, PUBLIC_SHARE, &self.public_share);
        self.leader_encrypted_input_share.encode(out);
        self.helper_encrypted_input_share.encode(out);
    }
}

impl Decode for Report {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        ReportRef::decode(r).map(ReportRef::into_owned)
    }
}

/// A [`Report`] decoded in place: its variable-length fields are slices of the input, so that
/// checking or reading a report copies none of its shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportRef<'a> {
    /// Report ID and timestamp.
    pub metadata: ReportMetadata,
    /// The VDAF public share.
    pub public_share: &'a [u8],
    /// `PlaintextInputShare` sealed to the Leader.
    pub leader_encrypted_input_share: HpkeCiphertextRef<'a>,
    /// `PlaintextInputShare` sealed to the Helper.
    pub helper_encrypted_input_share: HpkeCiphertextRef<'a>,
}

impl<'a> ReportRef<'a> {
    /// Decodes one report from the front of `r`, with the same checks as [`Report`]'s decoder.
    pub fn decode(r: &mut Reader<'a>) -> Result<Self, CodecError> {
        Ok(Self {
            metadata: ReportMetadata::decode(r)?,
            public_share: read_opaque(r, PUBLIC_SHARE)?,
            leader_encrypted_input_share: HpkeCiphertextRef::decode(r)?,
            helper_encrypted_input_share: HpkeCiphertextRef::decode(r)?,
        })
    }

    /// Strict: decodes the whole slice, trailing bytes are an error.
    pub fn get_decoded(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let report = Self::decode(&mut r)?;
        r.expect_empty()?;
        Ok(report)
    }

    /// An owned copy.
    pub fn into_owned(self) -> Report {
        Report {
            metadata: self.metadata,
            public_share: self.public_share.to_vec(),
            leader_encrypted_input_share: self.leader_encrypted_input_share.into_owned(),
            helper_encrypted_input_share: self.helper_encrypted_input_share.into_owned(),
        }
    }
}

/// `ExtensionType`: a report extension's code point; any value decodes.
///
/// Janus 0.7 refuses to decode types other than 0 and 0xff00; Duet leaves that judgement to the
/// Aggregator, which answers an unknown extension with `invalid_message` (§4.5.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtensionType(pub u16);

impl ExtensionType {
    /// `TBD(0)`, the placeholder DAP-09 defines.
    pub const TBD: Self = Self(0x0000);
    /// `taskprov(0xff00)` (draft-wang-ppm-dap-taskprov).
    pub const TASKPROV: Self = Self(0xff00);
}

impl Encode for ExtensionType {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
    }
}

impl Decode for ExtensionType {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        u16::decode(r).map(Self)
    }
}

/// `Extension`: a typed blob carried inside a plaintext input share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Extension {
    /// What the extension is.
    pub extension_type: ExtensionType,
    /// Its contents, `opaque<0..2^16-1>`.
    pub extension_data: Vec<u8>,
}

impl Encode for Extension {
    fn encode(&self, out: &mut Vec<u8>) {
        self.extension_type.encode(out);
        encode_opaque(out, EXTENSION_DATA, &self.extension_data);
    }
}

impl Decode for Extension {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            extension_type: ExtensionType::decode(r)?,
            extension_data: decode_opaque(r, EXTENSION_DATA)?,
        })
    }
}

/// `PlaintextInputShare`: what each `HpkeCiphertext` of a `Report` decrypts to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PlaintextInputShare {
    /// Report extensions, `Extension<0..2^16-1>`.
    pub extensions: Vec<Extension>,
    /// The VDAF input share, `opaque<0..2^32-1>`.
    pub payload: Vec<u8>,
}

impl Encode for PlaintextInputShare {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_items(out, EXTENSIONS, &self.extensions);
        encode_opaque(out, INPUT_SHARE, &self.payload);
    }
}

impl Decode for PlaintextInputShare {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let share = PlaintextInputShareRef::decode(r)?;
        Ok(Self {
            extensions: share.extensions,
            payload: share.payload.to_vec(),
        })
    }
}

/// A [`PlaintextInputShare`] whose payload is a slice of the decrypted bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextInputShareRef<'a> {
    /// Report extensions.
    pub extensions: Vec<Extension>,
    /// The VDAF input share.
    pub payload: &'a [u8],
}

impl<'a> PlaintextInputShareRef<'a> {
    /// Decodes one share from the front of `r`, with the same checks as
    /// [`PlaintextInputShare`]'s decoder.
    pub fn decode(r: &mut Reader<'a>) -> Result<Self, CodecError> {
        Ok(Self {
            extensions: decode_items(r, EXTENSIONS)?,
            payload: read_opaque(r, INPUT_SHARE)?,
        })
    }

    /// Strict: decodes the whole slice, trailing bytes are an error.
    pub fn get_decoded(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let share = Self::decode(&mut r)?;
        r.expect_empty()?;
        Ok(share)
    }
}

/// `InputShareAad`: the associated data bound into each input share's encryption.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InputShareAad {
    /// The task the report is for.
    pub task_id: TaskId,
    /// The report's metadata.
    pub metadata: ReportMetadata,
    /// The report's public share, `opaque<0..2^32-1>`.
    pub public_share: Vec<u8>,
}

impl Encode for InputShareAad {
    fn encode(&self, out: &mut Vec<u8>) {
        Self::write_parts(out, &self.task_id, &self.metadata, &self.public_share);
    }
}

impl InputShareAad {
    /// The encoding of the `InputShareAad` these parts make, without copying the public share
    /// into a value first.
    pub fn encode_parts(
        task_id: &TaskId,
        metadata: &ReportMetadata,
        public_share: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 24 + 4 + public_share.len());
        Self::write_parts(&mut out, task_id, metadata, public_share);
        out
    }

    fn write_parts(
        out: &mut Vec<u8>,
        task_id: &TaskId,
        metadata: &ReportMetadata,
        public_share: &[u8],
    ) {
        task_id.encode(out);
        metadata.encode(out);
        encode_opaque(out, PUBLIC_SHARE, public_share);
    }
}

impl Decode for InputShareAad {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            task_id: TaskId::decode(r)?,
            metadata: ReportMetadata::decode(r)?,
            public_share: decode_opaque(r, PUBLIC_SHARE)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dap09::HpkeConfigId;
    use crate::test_util::hex;

    fn ct(config_id: u8, enc: &[u8], payload: &[u8]) -> HpkeCiphertext {
        HpkeCiphertext {
            config_id: HpkeConfigId(config_id),
            encapsulated_key: enc.to_vec(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn report_vector() {
        let bytes = hex(concat!(
            "0102030405060708090a0b0c0d0e0f10", // metadata.id
            "00000000655f2e00",                 // metadata.time = 1_700_736_512
            "00000002",                         // public_share length
            "abcd",                             // public_share
            "01",                               // leader share: config_id
            "0001",                             //   enc length
            "e1",                               //   enc
            "00000002",                         //   payload length
            "f1f2",                             //   payload
            "02",                               // helper share: config_id
            "0002",                             //   enc length
            "e2e3",                             //   enc
            "00000001",                         //   payload length
            "f3",                               //   payload
        ));
        let report = Report {
            metadata: ReportMetadata {
                id: ReportId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]),
                time: Time(1_700_736_512),
            },
            public_share: vec![0xab, 0xcd],
            leader_encrypted_input_share: ct(1, &[0xe1], &[0xf1, 0xf2]),
            helper_encrypted_input_share: ct(2, &[0xe2, 0xe3], &[0xf3]),
        };
        assert_eq!(report.get_encoded(), bytes);
        assert_eq!(Report::get_decoded(&bytes), Ok(report.clone()));

        // The in-place view points into the input and holds the same fields.
        let view = ReportRef::get_decoded(&bytes).expect("decodes in place");
        assert_eq!(view.public_share, &[0xab, 0xcd]);
        assert_eq!(
            view.leader_encrypted_input_share,
            HpkeCiphertextRef::from(&report.leader_encrypted_input_share)
        );
        let payload = view.helper_encrypted_input_share.payload;
        assert!(bytes.as_ptr_range().contains(&payload.as_ptr()));
        assert_eq!(view.into_owned(), report);

        // Every strict prefix is truncated input, and one byte more is trailing.
        for cut in 0..bytes.len() {
            assert_eq!(
                Report::get_decoded(&bytes[..cut]),
                Err(CodecError::UnexpectedEnd)
            );
            assert_eq!(
                ReportRef::get_decoded(&bytes[..cut]),
                Err(CodecError::UnexpectedEnd)
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            Report::get_decoded(&long),
            Err(CodecError::TrailingBytes(1))
        );
        assert_eq!(
            ReportRef::get_decoded(&long),
            Err(CodecError::TrailingBytes(1))
        );
    }

    #[test]
    fn report_view_enforces_ciphertext_bounds() {
        // The Leader's `enc` is empty, which `opaque enc<1..2^16-1>` forbids.
        let bytes = hex(concat!(
            "0102030405060708090a0b0c0d0e0f10", // metadata.id
            "0000000000000000",                 // metadata.time
            "00000000",                         // public_share length
            "01",                               // leader share: config_id
            "0000",                             //   enc length: empty
            "00000001",                         //   payload length
            "aa",                               //   payload
        ));
        let err = ReportRef::get_decoded(&bytes).expect_err("empty enc");
        assert!(matches!(err, CodecError::LengthOutOfRange { len: 0, .. }));
        assert_eq!(Report::get_decoded(&bytes), Err(err));
    }

    #[test]
    fn plaintext_input_share_vector() {
        let bytes = hex(concat!(
            "0008",     // extensions length: 8 bytes
            "ff00",     // extension_type: taskprov
            "0000",     // extension_data length
            "1234",     // extension_type: unassigned (still decodes)
            "0000",     // extension_data length
            "00000003", // payload length
            "010203",   // payload
        ));
        let share = PlaintextInputShare {
            extensions: vec![
                Extension {
                    extension_type: ExtensionType::TASKPROV,
                    extension_data: vec![],
                },
                Extension {
                    extension_type: ExtensionType(0x1234),
                    extension_data: vec![],
                },
            ],
            payload: vec![1, 2, 3],
        };
        assert_eq!(share.get_encoded(), bytes);
        assert_eq!(PlaintextInputShare::get_decoded(&bytes), Ok(share.clone()));
        let view = PlaintextInputShareRef::get_decoded(&bytes).expect("decodes in place");
        assert_eq!(view.extensions, share.extensions);
        assert_eq!(view.payload, &bytes[bytes.len() - 3..]);
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            PlaintextInputShareRef::get_decoded(&long),
            Err(CodecError::TrailingBytes(1))
        );
    }

    #[test]
    fn extension_list_must_end_on_an_item_boundary() {
        // Announces 5 bytes of extensions: one whole extension plus one stray byte.
        let bytes = hex("0005 ff00 0000 ff 00000000");
        assert_eq!(
            PlaintextInputShare::get_decoded(&bytes),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    fn input_share_aad_vector() {
        let aad = InputShareAad {
            task_id: TaskId([0x22; 32]),
            metadata: ReportMetadata {
                id: ReportId([0x33; 16]),
                time: Time(60),
            },
            public_share: vec![],
        };
        let bytes = hex(concat!(
            "2222222222222222222222222222222222222222222222222222222222222222", // task_id
            "33333333333333333333333333333333",                                 // metadata.id
            "000000000000003c", // metadata.time = 60
            "00000000",         // public_share length (empty is allowed)
        ));
        assert_eq!(aad.get_encoded(), bytes);
        assert_eq!(
            InputShareAad::encode_parts(&aad.task_id, &aad.metadata, &aad.public_share),
            bytes
        );
        assert_eq!(InputShareAad::get_decoded(&bytes), Ok(aad));
    }
}
