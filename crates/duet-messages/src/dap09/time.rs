//! `Time`, `Duration` and `Interval` (§4): whole seconds, intervals half-open.

use crate::codec::{CodecError, Decode, Encode, Reader};
use std::fmt;

/// Time arithmetic left the range of `u64` seconds.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("time arithmetic overflowed")]
pub struct TimeOverflow;

/// `Time`: seconds since the UNIX epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

/// `Duration`: a number of seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub u64);

impl Time {
    /// The epoch itself.
    pub const ZERO: Time = Time(0);

    /// Seconds since the epoch.
    pub fn as_seconds(self) -> u64 {
        self.0
    }

    /// The largest multiple of `precision` not after `self`; a zero precision leaves it unchanged.
    pub fn round_down(self, precision: Duration) -> Time {
        match precision.0 {
            0 => self,
            p => Time(self.0 - self.0 % p),
        }
    }

    /// `self + duration`, or an error if that passes `u64::MAX` seconds.
    // A checked add that returns a Result cannot be `std::ops::Add`.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, duration: Duration) -> Result<Time, TimeOverflow> {
        self.0.checked_add(duration.0).map(Time).ok_or(TimeOverflow)
    }

    /// `self - duration`, or an error if that is before the epoch.
    // A checked sub that returns a Result cannot be `std::ops::Sub`.
    #[allow(clippy::should_implement_trait)]
    pub fn sub(self, duration: Duration) -> Result<Time, TimeOverflow> {
        self.0.checked_sub(duration.0).map(Time).ok_or(TimeOverflow)
    }

    /// The duration from `earlier` to `self`, or an error if `earlier` is later.
    pub fn difference(self, earlier: Time) -> Result<Duration, TimeOverflow> {
        self.0
            .checked_sub(earlier.0)
            .map(Duration)
            .ok_or(TimeOverflow)
    }

    /// True if `self` is a multiple of `precision` (a zero precision accepts everything).
    pub fn is_multiple_of(self, precision: Duration) -> bool {
        precision.0 == 0 || self.0 % precision.0 == 0
    }
}

impl Duration {
    /// No time at all.
    pub const ZERO: Duration = Duration(0);

    /// A duration of `seconds` seconds.
    pub const fn from_seconds(seconds: u64) -> Self {
        Self(seconds)
    }

    /// The number of seconds.
    pub fn as_seconds(self) -> u64 {
        self.0
    }

    /// True if `self` is a multiple of `precision` (a zero precision accepts everything).
    pub fn is_multiple_of(self, precision: Duration) -> bool {
        precision.0 == 0 || self.0 % precision.0 == 0
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

impl Encode for Time {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
    }
}

impl Decode for Time {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        u64::decode(r).map(Self)
    }
}

impl Encode for Duration {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
    }
}

impl Decode for Duration {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        u64::decode(r).map(Self)
    }
}

/// `Interval`: the half-open range `[start, start + duration)`.
///
/// Build it with [`Interval::new`] so that the end is representable; the decoder rejects
/// intervals whose end overflows (as Janus does), so a hand-built one that overflows does not
/// round-trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    /// First second in the interval.
    pub start: Time,
    /// Length of the interval.
    pub duration: Duration,
}

impl Interval {
    /// Every time there is: `[0, u64::MAX)`.
    pub const ALL_TIME: Interval = Interval {
        start: Time(0),
        duration: Duration(u64::MAX),
    };

    /// The interval `[start, start + duration)`; errors if the end does not fit in a `Time`.
    pub fn new(start: Time, duration: Duration) -> Result<Self, TimeOverflow> {
        start.add(duration)?;
        Ok(Self { start, duration })
    }

    /// The first second after the interval (saturating for a hand-built overflowing interval).
    pub fn end(&self) -> Time {
        Time(self.start.0.saturating_add(self.duration.0))
    }

    /// True if `t` lies in `[start, end)`.
    pub fn contains(&self, t: Time) -> bool {
        self.start <= t && t < self.end()
    }

    /// True if the two intervals share at least one second (an empty interval overlaps nothing).
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.duration.0 > 0
            && other.duration.0 > 0
            && self.start < other.end()
            && other.start < self.end()
    }

    /// True if both overlap without being the same interval: DAP's batch overlap, which the
    /// same batch collected again is not.
    pub fn overlaps_another(&self, other: &Interval) -> bool {
        self != other && self.overlaps(other)
    }

    /// The smallest interval containing all of `intervals` (empty ones are ignored; empty if
    /// there are none).
    pub fn spanning(intervals: impl IntoIterator<Item = Interval>) -> Interval {
        intervals
            .into_iter()
            .fold(Interval::default(), |span, i| span.merged_with(&i))
    }

    /// The smallest interval containing both (empty intervals are ignored).
    pub fn merged_with(&self, other: &Interval) -> Interval {
        if self.duration.0 == 0 {
            return *other;
        }
        if other.duration.0 == 0 {
            return *self;
        }
        let start = self.start.min(other.start);
        let end = self.end().max(other.end());
        Interval {
            start,
            duration: Duration(end.0 - start.0),
        }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end())
    }
}

impl Encode for Interval {
    fn encode(&self, out: &mut Vec<u8>) {
        self.start.encode(out);
        self.duration.encode(out);
    }
}

impl Decode for Interval {
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let start = Time::decode(r)?;
        let duration = Duration::decode(r)?;
        Interval::new(start, duration).map_err(|TimeOverflow| CodecError::IntervalOverflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(start: u64, duration: u64) -> Interval {
        Interval {
            start: Time(start),
            duration: Duration(duration),
        }
    }

    #[test]
    fn round_down() {
        assert_eq!(Time(3599).round_down(Duration(3600)), Time(0));
        assert_eq!(Time(3600).round_down(Duration(3600)), Time(3600));
        assert_eq!(Time(7).round_down(Duration(0)), Time(7));
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(Time(1).add(Duration(2)), Ok(Time(3)));
        assert_eq!(Time(u64::MAX).add(Duration(1)), Err(TimeOverflow));
        assert_eq!(Time(1).sub(Duration(2)), Err(TimeOverflow));
        assert_eq!(Time(5).difference(Time(2)), Ok(Duration(3)));
        assert_eq!(
            Interval::new(Time(u64::MAX), Duration(1)),
            Err(TimeOverflow)
        );
        assert_eq!(
            Interval::new(Time(u64::MAX), Duration(0)),
            Ok(iv(u64::MAX, 0))
        );
    }

    #[test]
    fn half_open_semantics() {
        let a = iv(10, 10);
        assert!(a.contains(Time(10)) && a.contains(Time(19)));
        assert!(!a.contains(Time(20)) && !a.contains(Time(9)));
        assert!(a.overlaps(&iv(19, 5)));
        assert!(!a.overlaps(&iv(20, 5)));
        assert!(!a.overlaps(&iv(0, 10)));
        assert!(!a.overlaps(&iv(15, 0)));
        assert!(iv(0, 100).overlaps(&a));
        assert!(!a.overlaps_another(&a));
        assert!(a.overlaps_another(&iv(19, 5)));
        assert!(!a.overlaps_another(&iv(20, 5)));
        assert_eq!(a.merged_with(&iv(30, 5)), iv(10, 25));
        assert_eq!(a.merged_with(&iv(0, 0)), a);
    }

    #[test]
    fn interval_wire_format() {
        let bytes = [
            0, 0, 0, 0, 0x65, 0x5f, 0x2e, 0x00, // start = 1_700_736_512
            0, 0, 0, 0, 0, 0, 0x0e, 0x10, // duration = 3600
        ];
        let interval = iv(1_700_736_512, 3600);
        assert_eq!(interval.get_encoded(), bytes);
        assert_eq!(Interval::get_decoded(&bytes), Ok(interval));
    }

    #[test]
    fn overflowing_interval_is_rejected() {
        let bytes = iv(u64::MAX, 1).get_encoded();
        assert_eq!(
            Interval::get_decoded(&bytes),
            Err(CodecError::IntervalOverflow)
        );
    }
}
