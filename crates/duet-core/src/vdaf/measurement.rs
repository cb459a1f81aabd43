//! Measurements as clients give them and aggregates as collectors read them: parsing a
//! measurement for a configured VDAF, and the aggregate of measurements in the clear.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::VdafInstance;
use crate::error::CoreError;

/// One client measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Measurement {
    /// For Prio3Count.
    Count(bool),
    /// For Prio3Sum.
    Sum(u128),
    /// For Prio3SumVec.
    SumVec(Vec<u128>),
    /// For Prio3Histogram: the bucket index.
    Histogram(usize),
}

/// The result of a collection: a number (count, sum) or a vector (histogram, sum vector).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AggregateResult {
    /// Count and sum.
    Number(u128),
    /// Histogram and sum vector.
    Vector(Vec<u128>),
}

impl fmt::Display for AggregateResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Vector(v) => {
                let parts: Vec<String> = v.iter().map(u128::to_string).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

impl VdafInstance {
    /// Parses one measurement as written in a measurements file: `0`/`1` for count, an integer for
    /// sum, a bucket index for histogram, comma-separated integers for sum vectors.
    pub fn parse_measurement(&self, text: &str) -> Result<Measurement, CoreError> {
        let text = text.trim();
        // Digits only: Rust's parser would also take a leading `+`.
        let int = |s: &str| -> Result<u128, CoreError> {
            let digits = s.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CoreError::InvalidParameter(format!(
                    "'{s}' is not a non-negative integer"
                )));
            }
            digits
                .parse::<u128>()
                .map_err(|_| CoreError::InvalidParameter(format!("'{s}' is too large")))
        };
        let in_bits = |v: u128, bits: usize| -> Result<u128, CoreError> {
            if bits < 128 && v >> bits != 0 {
                Err(CoreError::InvalidParameter(format!(
                    "{v} does not fit in {bits} bits (largest is {})",
                    (1u128 << bits) - 1
                )))
            } else {
                Ok(v)
            }
        };
        match self {
            Self::Prio3Count => match text {
                "0" => Ok(Measurement::Count(false)),
                "1" => Ok(Measurement::Count(true)),
                _ => Err(CoreError::InvalidParameter(format!(
                    "a count measurement is 0 or 1, got '{text}'"
                ))),
            },
            Self::Prio3Sum { bits } => Ok(Measurement::Sum(in_bits(int(text)?, *bits)?)),
            Self::Prio3Histogram { length, .. } => {
                let b = int(text)?;
                if b >= *length as u128 {
                    return Err(CoreError::InvalidParameter(format!(
                        "bucket {b} is out of range: the histogram has buckets 0 to {}",
                        length.saturating_sub(1)
                    )));
                }
                Ok(Measurement::Histogram(b as usize))
            }
            Self::Prio3SumVec { bits, length, .. } => {
                let v = text
                    .split(',')
                    .map(|s| int(s).and_then(|v| in_bits(v, *bits)))
                    .collect::<Result<Vec<_>, _>>()?;
                if v.len() != *length {
                    return Err(CoreError::InvalidParameter(format!(
                        "a sum vector measurement has {length} comma-separated integers, got {}",
                        v.len()
                    )));
                }
                Ok(Measurement::SumVec(v))
            }
        }
    }

    /// The aggregate computed in the clear, to check a private result against.
    pub fn plaintext_aggregate<'a>(
        &self,
        measurements: impl IntoIterator<Item = &'a Measurement>,
    ) -> Result<AggregateResult, CoreError> {
        let mismatch = || CoreError::InvalidParameter(format!("measurement does not fit {self}"));
        match self {
            Self::Prio3Count | Self::Prio3Sum { .. } => {
                let mut total = 0u128;
                for m in measurements {
                    total += match m {
                        Measurement::Count(b) if *self == Self::Prio3Count => u128::from(*b),
                        Measurement::Sum(v) if matches!(self, Self::Prio3Sum { .. }) => *v,
                        _ => return Err(mismatch()),
                    };
                }
                Ok(AggregateResult::Number(total))
            }
            Self::Prio3SumVec { length, .. } | Self::Prio3Histogram { length, .. } => {
                let mut total = vec![0u128; *length];
                for m in measurements {
                    match m {
                        Measurement::Histogram(b) if *b < *length => total[*b] += 1,
                        Measurement::SumVec(v) if v.len() == *length => {
                            total.iter_mut().zip(v).for_each(|(t, x)| *t += x)
                        }
                        _ => return Err(mismatch()),
                    }
                }
                Ok(AggregateResult::Vector(total))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Measurements are digits only: a sign, a space inside or a number too large is refused.
    #[test]
    fn measurements_are_plain_digits() {
        let sum = VdafInstance::Prio3Sum { bits: 8 };
        assert_eq!(
            sum.parse_measurement(" 5 ").expect("5"),
            Measurement::Sum(5)
        );
        for bad in [
            "+5",
            "-5",
            "5 5",
            "",
            "0x5",
            "999999999999999999999999999999999999999999",
        ] {
            assert!(sum.parse_measurement(bad).is_err(), "{bad:?}");
        }
        let vec = VdafInstance::Prio3SumVec {
            bits: 8,
            length: 2,
            chunk_length: 1,
        };
        assert!(vec.parse_measurement("1,+2").is_err());
    }
}
