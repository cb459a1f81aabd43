//! The strict TLS-presentation-language codec that every DAP message uses.
//!
//! Integers are big-endian. `opaque x<a..b>` and `T x<a..b>` are written as a length prefix whose
//! width is set by `b` (1, 2 or 4 bytes) followed by that many bytes; for a vector of structs the
//! prefix counts bytes, not items. Decoding is strict: every length is checked against both
//! bounds, a vector's items must consume exactly the announced bytes, and [`Decode::get_decoded`]
//! rejects trailing bytes.
//!
//! Encoding cannot fail. A value that breaks a wire bound (an empty `enc`, an empty
//! `prepare_inits`, more than 65535 bytes behind a 2-byte prefix) still encodes, but the bytes do
//! not decode back to it; see [`encode_opaque`].

/// Why a byte string is not a valid encoding of a message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    /// The input ended in the middle of a value.
    #[error("unexpected end of input")]
    UnexpectedEnd,
    /// A complete value was decoded but this many bytes followed it.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A length-prefixed field is shorter or longer than the spec allows.
    #[error("length {len} of {what} is outside {min}..={max}")]
    LengthOutOfRange {
        /// The field, as `Struct.field`.
        what: &'static str,
        /// The length that was read.
        len: u64,
        /// The smallest allowed length.
        min: u64,
        /// The largest allowed length.
        max: u64,
    },
    /// An enumerated field holds a value the spec does not define.
    #[error("unknown {what} value {value}")]
    UnknownValue {
        /// The enumeration, e.g. `QueryType`.
        what: &'static str,
        /// The value that was read.
        value: u64,
    },
    /// An `Interval` whose end (`start + duration`) does not fit in a `Time`.
    #[error("interval end overflows")]
    IntervalOverflow,
    /// A list holds more items than its reader takes (see [`decode_items_at_most`]).
    #[error("{what} holds more than {max} items")]
    TooManyItems {
        /// The field, as `Struct.field`.
        what: &'static str,
        /// The most items taken.
        max: usize,
    },
}

/// A cursor over a byte slice, consumed from the front by the decoders.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// Number of bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// True once every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads the next `n` bytes.
    pub fn read_bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if n > self.rest.len() {
            return Err(CodecError::UnexpectedEnd);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// Reads the next `N` bytes into an array.
    pub fn read_array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.read_bytes(N)?);
        Ok(out)
    }

    /// Reads one byte.
    pub fn read_u8(&mut self) -> Result<u8, CodecError> {
        Ok(u8::from_be_bytes(self.read_array()?))
    }

    /// Reads a big-endian `u16`.
    pub fn read_u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.read_array()?))
    }

    /// Reads a big-endian `u32`.
    pub fn read_u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.read_array()?))
    }

    /// Reads a big-endian `u64`.
    pub fn read_u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.read_array()?))
    }

    /// Splits off a reader over the next `n` bytes and advances past them.
    pub fn sub_reader(&mut self, n: usize) -> Result<Reader<'a>, CodecError> {
        Ok(Reader::new(self.read_bytes(n)?))
    }

    /// Succeeds only if every byte has been read.
    pub fn expect_empty(&self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecError::TrailingBytes(n)),
        }
    }
}

/// A value with a wire encoding.
pub trait Encode {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Returns the encoding of `self`.
    fn get_encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// A value that can be strictly decoded from its wire encoding.
pub trait Decode: Sized {
    /// Decodes one value from the front of `r`, leaving the rest unread.
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError>;

    /// Strict: decodes the whole slice, trailing bytes are an error.
    fn get_decoded(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let value = Self::decode(&mut r)?;
        r.expect_empty()?;
        Ok(value)
    }
}

macro_rules! impl_codec_for_uint {
    ($($t:ty => $read:ident),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
        }

        impl Decode for $t {
            fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                r.$read()
            }
        }
    )*};
}

impl_codec_for_uint!(u8 => read_u8, u16 => read_u16, u32 => read_u32, u64 => read_u64);

/// Width of a length prefix: 1, 2 or 4 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixWidth {
    /// A `u8` prefix, for upper bounds up to 2^8-1.
    U8,
    /// A `u16` prefix, for upper bounds up to 2^16-1.
    U16,
    /// A `u32` prefix, for upper bounds up to 2^32-1.
    U32,
}

impl PrefixWidth {
    /// The largest length this prefix can express.
    pub const fn max_len(self) -> u64 {
        match self {
            Self::U8 => u8::MAX as u64,
            Self::U16 => u16::MAX as u64,
            Self::U32 => u32::MAX as u64,
        }
    }

    fn write(self, len: u64, out: &mut Vec<u8>) {
        // Saturating keeps the encoder total; an over-long value is a caller bug that the
        // debug assertion in `write_prefixed` reports, and its bytes will not decode back.
        let len = len.min(self.max_len());
        match self {
            Self::U8 => out.push(len as u8),
            Self::U16 => out.extend_from_slice(&(len as u16).to_be_bytes()),
            Self::U32 => out.extend_from_slice(&(len as u32).to_be_bytes()),
        }
    }

    fn read(self, r: &mut Reader<'_>) -> Result<u64, CodecError> {
        Ok(match self {
            Self::U8 => r.read_u8()?.into(),
            Self::U16 => r.read_u16()?.into(),
            Self::U32 => r.read_u32()?.into(),
        })
    }
}

/// The bounds `<min..max>` of one length-prefixed field, named for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VecBounds {
    /// The field, as `Struct.field`.
    pub what: &'static str,
    /// Width of the length prefix.
    pub width: PrefixWidth,
    /// Smallest allowed length in bytes.
    pub min: u64,
    /// Largest allowed length in bytes (at most `width.max_len()`).
    pub max: u64,
}

impl VecBounds {
    /// Bounds `<min..2^k-1>`, the upper bound being the largest the prefix can express.
    pub const fn new(what: &'static str, width: PrefixWidth, min: u64) -> Self {
        Self {
            what,
            width,
            min,
            max: width.max_len(),
        }
    }

    fn check(&self, len: u64) -> Result<(), CodecError> {
        if len < self.min || len > self.max {
            return Err(CodecError::LengthOutOfRange {
                what: self.what,
                len,
                min: self.min,
                max: self.max,
            });
        }
        Ok(())
    }

    /// Reads the length prefix, checks it against the bounds and returns a reader over the body.
    fn read_body<'a>(&self, r: &mut Reader<'a>) -> Result<Reader<'a>, CodecError> {
        let len = self.width.read(r)?;
        self.check(len)?;
        // A length that does not fit in usize cannot fit in the input either.
        let len = usize::try_from(len).map_err(|_| CodecError::UnexpectedEnd)?;
        r.sub_reader(len)
    }

    /// Writes a placeholder prefix, lets `body` append, then fills the prefix in.
    fn write_prefixed(&self, out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
        let prefix_at = out.len();
        self.width.write(0, out);
        let body_at = out.len();
        body(out);
        let len = (out.len() - body_at) as u64;
        debug_assert!(
            len <= self.width.max_len(),
            "{} is {len} bytes, more than its length prefix can express",
            self.what
        );
        let mut prefix = Vec::with_capacity(4);
        self.width.write(len, &mut prefix);
        out[prefix_at..body_at].copy_from_slice(&prefix);
    }
}

/// Writes `opaque data<min..max>`: the length prefix, then the bytes.
///
/// Never fails. If `data` is shorter than `bounds.min` the output is well formed but the decoder
/// rejects it; if it is longer than the prefix can express the prefix saturates (and debug builds
/// panic), so the output does not decode back to `data`.
pub fn encode_opaque(out: &mut Vec<u8>, bounds: VecBounds, data: &[u8]) {
    bounds.write_prefixed(out, |out| out.extend_from_slice(data));
}

/// Reads `opaque data<min..max>`, enforcing both bounds.
pub fn decode_opaque(r: &mut Reader<'_>, bounds: VecBounds) -> Result<Vec<u8>, CodecError> {
    read_opaque(r, bounds).map(<[u8]>::to_vec)
}

/// Reads `opaque data<min..max>` as a slice of the input, enforcing both bounds.
pub fn read_opaque<'a>(r: &mut Reader<'a>, bounds: VecBounds) -> Result<&'a [u8], CodecError> {
    Ok(bounds.read_body(r)?.rest)
}

/// Writes `T items<min..max>`: a prefix holding the byte length of the encoded items, then the items.
///
/// Never fails; the same caveats as [`encode_opaque`] apply to out-of-bounds lengths.
pub fn encode_items<T: Encode>(out: &mut Vec<u8>, bounds: VecBounds, items: &[T]) {
    bounds.write_prefixed(out, |out| {
        for item in items {
            item.encode(out);
        }
    });
}

/// Reads `T items<min..max>`: decodes items until exactly the announced bytes are consumed.
pub fn decode_items<T: Decode>(
    r: &mut Reader<'_>,
    bounds: VecBounds,
) -> Result<Vec<T>, CodecError> {
    let mut body = bounds.read_body(r)?;
    let mut items = Vec::new();
    while !body.is_empty() {
        items.push(T::decode(&mut body)?);
    }
    Ok(items)
}

/// [`decode_items`], but stops with [`CodecError::TooManyItems`] at the item after the `max`-th,
/// so that a list of many small items costs no more than `max` of them before it is refused.
pub fn decode_items_at_most<T: Decode>(
    r: &mut Reader<'_>,
    bounds: VecBounds,
    max: usize,
) -> Result<Vec<T>, CodecError> {
    let mut body = bounds.read_body(r)?;
    let mut items = Vec::new();
    while !body.is_empty() {
        if items.len() == max {
            return Err(CodecError::TooManyItems {
                what: bounds.what,
                max,
            });
        }
        items.push(T::decode(&mut body)?);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list is refused at the item after the last one taken, before that item is decoded
    /// (here it would not decode), and a list of at most that many decodes as usual.
    #[test]
    fn item_lists_are_refused_past_their_limit() {
        let mut out = Vec::new();
        encode_items(&mut out, WIDE, &[1u16, 2, 3]);
        let mut truncated = out.clone();
        truncated.truncate(out.len() - 1);
        truncated[3] -= 1;
        assert_eq!(
            decode_items_at_most::<u16>(&mut Reader::new(&truncated), WIDE, 2),
            Err(CodecError::TooManyItems {
                what: "Test.wide",
                max: 2
            })
        );
        assert_eq!(
            decode_items_at_most::<u16>(&mut Reader::new(&out), WIDE, 3),
            Ok(vec![1, 2, 3])
        );
        assert_eq!(
            decode_items::<u16>(&mut Reader::new(&truncated), WIDE),
            Err(CodecError::UnexpectedEnd)
        );
    }

    const SMALL: VecBounds = VecBounds::new("Test.small", PrefixWidth::U8, 1);
    const WIDE: VecBounds = VecBounds::new("Test.wide", PrefixWidth::U32, 0);

    #[test]
    fn reader_reads_big_endian_integers() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(r.read_u8(), Ok(0x01));
        assert_eq!(r.read_u16(), Ok(0x0203));
        assert_eq!(r.read_u32(), Ok(0x0405_0607));
        assert_eq!(r.read_u64(), Ok(0x0809_0a0b_0c0d_0e0f));
        assert!(r.is_empty());
        assert_eq!(r.read_u8(), Err(CodecError::UnexpectedEnd));
    }

    #[test]
    fn reader_does_not_advance_on_short_read() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.read_u32(), Err(CodecError::UnexpectedEnd));
        assert_eq!(r.remaining(), 3);
    }

    #[test]
    fn get_decoded_rejects_trailing_bytes() {
        assert_eq!(u16::get_decoded(&[0, 1]), Ok(1));
        assert_eq!(
            u16::get_decoded(&[0, 1, 2]),
            Err(CodecError::TrailingBytes(1))
        );
        assert_eq!(u16::get_decoded(&[0]), Err(CodecError::UnexpectedEnd));
    }

    #[test]
    fn opaque_round_trips_and_enforces_bounds() {
        let mut out = Vec::new();
        encode_opaque(&mut out, SMALL, b"abc");
        assert_eq!(out, [3, b'a', b'b', b'c']);
        assert_eq!(
            decode_opaque(&mut Reader::new(&out), SMALL),
            Ok(b"abc".to_vec())
        );

        // Below the lower bound.
        assert_eq!(
            decode_opaque(&mut Reader::new(&[0]), SMALL),
            Err(CodecError::LengthOutOfRange {
                what: "Test.small",
                len: 0,
                min: 1,
                max: 255
            })
        );
        // Prefix longer than the input.
        assert_eq!(
            decode_opaque(&mut Reader::new(&[0, 0, 0, 9, 1]), WIDE),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    fn explicit_upper_bound_is_enforced() {
        let bounds = VecBounds { max: 2, ..SMALL };
        assert_eq!(
            decode_opaque(&mut Reader::new(&[3, 1, 2, 3]), bounds),
            Err(CodecError::LengthOutOfRange {
                what: "Test.small",
                len: 3,
                min: 1,
                max: 2
            })
        );
    }

    #[test]
    fn items_must_fill_the_announced_length_exactly() {
        let mut out = Vec::new();
        encode_items(&mut out, WIDE, &[0x0102u16, 0x0304]);
        assert_eq!(out, [0, 0, 0, 4, 1, 2, 3, 4]);
        assert_eq!(
            decode_items::<u16>(&mut Reader::new(&out), WIDE),
            Ok(vec![0x0102, 0x0304])
        );

        // Three bytes cannot hold a whole number of u16 items.
        assert_eq!(
            decode_items::<u16>(&mut Reader::new(&[0, 0, 0, 3, 1, 2, 3]), WIDE),
            Err(CodecError::UnexpectedEnd)
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "more than its length prefix can express")]
    fn oversize_encode_panics_in_debug_builds() {
        let mut out = Vec::new();
        encode_opaque(&mut out, SMALL, &[0; 256]);
    }
}
