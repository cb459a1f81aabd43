//! The JSON shapes of the interop test API: VDAF objects, queries, measurements, results, numbers
//! and byte strings, as draft-dcook-ppm-dap-interop-test-design-07 writes them and Janus 0.7's
//! interop binaries read them.
//!
//! The draft sends VDAF parameters, measurements and results as decimal strings and every other
//! number as a JSON number; [`Decimal`] accepts both forms everywhere, so a runner that quotes a
//! `time_precision` or leaves a `bits` unquoted is still understood.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use duet_core::{AggregateResult, Measurement, VdafInstance};
use duet_messages::dap09::{BatchId, Duration, FixedSizeQuery, Interval, Query, TaskId, Time};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// A non-negative integer written as a decimal string or as a JSON number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decimal<T>(pub T);

impl<'de, T> Deserialize<'de> for Decimal<T>
where
    T: FromStr + TryFrom<u64>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DecimalVisitor(PhantomData))
    }
}

struct DecimalVisitor<T>(PhantomData<T>);

impl<T> Visitor<'_> for DecimalVisitor<T>
where
    T: FromStr + TryFrom<u64>,
{
    type Value = Decimal<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer, as a decimal string or a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        v.trim()
            .parse()
            .map(Decimal)
            .map_err(|_| E::custom(format!("'{v}' is not a non-negative integer in range")))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        T::try_from(v)
            .map(Decimal)
            .map_err(|_| E::custom(format!("{v} is out of range")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))?;
        self.visit_u64(v)
    }
}

/// Unpadded base64url, as the draft writes every byte string.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url (padding tolerated) of the named field.
pub fn unb64(field: &str, s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("\"{field}\" is not base64url: {e}"))
}

/// A task ID in base64url.
pub fn task_id(s: &str) -> Result<TaskId, String> {
    s.trim_end_matches('=')
        .parse()
        .map_err(|e| format!("\"task_id\" is not a 32-byte base64url task ID: {e}"))
}

/// The draft's VDAF object. Parameters are decimal strings.
#[derive(Deserialize)]
#[serde(tag = "type")]
enum VdafObject {
    #[serde(rename = "Prio3Count")]
    Count,
    #[serde(rename = "Prio3Sum")]
    Sum { bits: Decimal<usize> },
    #[serde(rename = "Prio3SumVec")]
    SumVec {
        bits: Decimal<usize>,
        length: Decimal<usize>,
        chunk_length: Decimal<usize>,
    },
    #[serde(rename = "Prio3Histogram")]
    Histogram {
        length: Decimal<usize>,
        chunk_length: Decimal<usize>,
    },
}

/// The VDAF types Duet serves.
const SUPPORTED_VDAFS: &str = "Prio3Count, Prio3Sum, Prio3SumVec and Prio3Histogram";

/// Reads a VDAF object; an unknown `type` or bad parameters is a readable error, not a panic.
pub fn vdaf(value: &Value) -> Result<VdafInstance, String> {
    let name = value.get("type").and_then(Value::as_str).unwrap_or("");
    let known = ["Prio3Count", "Prio3Sum", "Prio3SumVec", "Prio3Histogram"];
    if !known.contains(&name) {
        return Err(format!(
            "VDAF type '{name}' is not supported; Duet supports {SUPPORTED_VDAFS}"
        ));
    }
    let object: VdafObject =
        serde_json::from_value(value.clone()).map_err(|e| format!("bad {name} parameters: {e}"))?;
    let instance = match object {
        VdafObject::Count => VdafInstance::Prio3Count,
        VdafObject::Sum { bits } => VdafInstance::Prio3Sum { bits: bits.0 },
        VdafObject::SumVec {
            bits,
            length,
            chunk_length,
        } => VdafInstance::Prio3SumVec {
            bits: bits.0,
            length: length.0,
            chunk_length: chunk_length.0,
        },
        VdafObject::Histogram {
            length,
            chunk_length,
        } => VdafInstance::Prio3Histogram {
            length: length.0,
            chunk_length: chunk_length.0,
        },
    };
    instance.instantiate().map_err(|e| e.to_string())?;
    Ok(instance)
}

/// Reads a measurement: `"0"`/`"1"` for Prio3Count, a decimal string for Prio3Sum and
/// Prio3Histogram (the bucket), an array of decimal strings for Prio3SumVec. Range checks are the
/// VDAF's own.
pub fn measurement(vdaf: &VdafInstance, value: &Value) -> Result<Measurement, String> {
    let scalar = |v: &Value| -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(format!("expected a decimal string, got {other}")),
        }
    };
    let text = match (vdaf, value) {
        (VdafInstance::Prio3SumVec { .. }, Value::Array(items)) => items
            .iter()
            .map(scalar)
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        (VdafInstance::Prio3SumVec { .. }, other) => {
            return Err(format!(
                "a Prio3SumVec measurement is an array of decimal strings, got {other}"
            ))
        }
        (_, v) => scalar(v)?,
    };
    vdaf.parse_measurement(&text)
        .map_err(|e| format!("bad measurement for {vdaf}: {e}"))
}

/// An aggregate as the draft reports it: a decimal string, or an array of them.
pub fn result(aggregate: &AggregateResult) -> Value {
    match aggregate {
        AggregateResult::Number(n) => Value::String(n.to_string()),
        AggregateResult::Vector(v) => {
            Value::Array(v.iter().map(|n| Value::String(n.to_string())).collect())
        }
    }
}

/// The draft's query object.
#[derive(Debug, Deserialize)]
pub struct QueryObject {
    /// 1 for time_interval, 2 for fixed_size.
    #[serde(rename = "type")]
    pub query_type: Decimal<u8>,
    /// time_interval: start, seconds since the epoch.
    #[serde(default)]
    pub batch_interval_start: Option<Decimal<u64>>,
    /// time_interval: duration in seconds.
    #[serde(default)]
    pub batch_interval_duration: Option<Decimal<u64>>,
    /// fixed_size: 0 by batch ID, 1 current batch.
    #[serde(default)]
    pub subtype: Option<Decimal<u8>>,
    /// fixed_size by batch ID: the batch, base64url.
    #[serde(default)]
    pub batch_id: Option<String>,
}

impl QueryObject {
    /// The DAP query.
    pub fn to_query(&self) -> Result<Query, String> {
        match self.query_type.0 {
            1 => {
                let start = self
                    .batch_interval_start
                    .ok_or("\"batch_interval_start\" is missing")?;
                let duration = self
                    .batch_interval_duration
                    .ok_or("\"batch_interval_duration\" is missing")?;
                let batch_interval = Interval::new(Time(start.0), Duration(duration.0))
                    .map_err(|_| "the batch interval ends after the end of time".to_string())?;
                Ok(Query::TimeInterval { batch_interval })
            }
            2 => {
                let fixed_size_query = match self.subtype.map(|s| s.0) {
                    Some(0) => {
                        let raw = self
                            .batch_id
                            .as_deref()
                            .ok_or("\"batch_id\" is missing for a by-batch-ID query")?;
                        let batch_id = BatchId::try_from(unb64("batch_id", raw)?.as_slice())
                            .map_err(|e| format!("bad \"batch_id\": {e}"))?;
                        FixedSizeQuery::ByBatchId { batch_id }
                    }
                    Some(1) => FixedSizeQuery::CurrentBatch,
                    Some(other) => return Err(format!("unknown fixed_size subtype {other}")),
                    None => return Err("\"subtype\" is missing for a fixed_size query".into()),
                };
                Ok(Query::FixedSize { fixed_size_query })
            }
            other => Err(format!(
                "unknown query type {other} (1 is time_interval, 2 is fixed_size)"
            )),
        }
    }
}

/// A query type number: 1 (time_interval) or 2 (fixed_size).
pub fn check_query_type(query_type: u8) -> Result<(), String> {
    match query_type {
        1 | 2 => Ok(()),
        other => Err(format!(
            "unknown query type {other} (1 is time_interval, 2 is fixed_size)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vdaf_objects_as_janus_sends_them() {
        assert_eq!(
            vdaf(&json!({"type": "Prio3Count"})),
            Ok(VdafInstance::Prio3Count)
        );
        assert_eq!(
            vdaf(&json!({"type": "Prio3Sum", "bits": "64"})),
            Ok(VdafInstance::Prio3Sum { bits: 64 })
        );
        assert_eq!(
            vdaf(&json!({"type": "Prio3SumVec", "bits": "64", "length": "4", "chunk_length": 18})),
            Ok(VdafInstance::Prio3SumVec {
                bits: 64,
                length: 4,
                chunk_length: 18
            })
        );
        assert_eq!(
            vdaf(&json!({"type": "Prio3Histogram", "length": "6", "chunk_length": "2"})),
            Ok(VdafInstance::Prio3Histogram {
                length: 6,
                chunk_length: 2
            })
        );
        let e = vdaf(&json!({"type": "Poplar1", "bits": "8"})).expect_err("refused");
        assert!(e.contains("Poplar1") && e.contains("Prio3Count"), "{e}");
        let e = vdaf(&json!({"type": "Prio3Sum"})).expect_err("refused");
        assert!(e.contains("bits"), "{e}");
        let e = vdaf(&json!({"type": "Prio3Sum", "bits": "-3"})).expect_err("refused");
        assert!(e.contains("-3"), "{e}");
    }

    #[test]
    fn measurements_and_results() {
        let sv = VdafInstance::Prio3SumVec {
            bits: 4,
            length: 3,
            chunk_length: 2,
        };
        assert_eq!(
            measurement(&sv, &json!(["1", "2", "15"])),
            Ok(Measurement::SumVec(vec![1, 2, 15]))
        );
        assert!(measurement(&sv, &json!(["1", "2", "16"])).is_err());
        assert!(measurement(&sv, &json!("1")).is_err());
        assert_eq!(
            measurement(&VdafInstance::Prio3Count, &json!("1")),
            Ok(Measurement::Count(true))
        );
        assert!(measurement(&VdafInstance::Prio3Count, &json!("2")).is_err());
        assert_eq!(
            result(&AggregateResult::Vector(vec![1, u128::MAX])),
            json!(["1", u128::MAX.to_string()])
        );
        assert_eq!(result(&AggregateResult::Number(7)), json!("7"));
    }

    #[test]
    fn queries() {
        let q: QueryObject = serde_json::from_value(json!({
            "type": 1, "batch_interval_start": 3600, "batch_interval_duration": "7200"
        }))
        .expect("parses");
        assert_eq!(
            q.to_query(),
            Ok(Query::TimeInterval {
                batch_interval: Interval {
                    start: Time(3600),
                    duration: Duration(7200)
                }
            })
        );
        let q: QueryObject =
            serde_json::from_value(json!({"type": 2, "subtype": 1})).expect("parses");
        assert_eq!(
            q.to_query(),
            Ok(Query::FixedSize {
                fixed_size_query: FixedSizeQuery::CurrentBatch
            })
        );
        let q: QueryObject = serde_json::from_value(json!({
            "type": 2, "subtype": 0, "batch_id": b64(&[7; 32])
        }))
        .expect("parses");
        assert_eq!(
            q.to_query(),
            Ok(Query::FixedSize {
                fixed_size_query: FixedSizeQuery::ByBatchId {
                    batch_id: BatchId([7; 32])
                }
            })
        );
        let q: QueryObject = serde_json::from_value(json!({"type": 3})).expect("parses");
        assert!(q.to_query().is_err());
        assert!(serde_json::from_value::<QueryObject>(json!({"type": -1})).is_err());
    }
}
