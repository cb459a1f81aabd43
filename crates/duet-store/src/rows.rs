//! Reading columns out of result rows, shared by both backends: a missing, mistyped or
//! out-of-range value is `StoreError::Corrupt`, never a panic.

use duet_messages::dap09::{CollectionJobId, Duration, Interval, Time};
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::{CollectionJobBatch, StoreError};

/// Reads a column.
pub(crate) fn col<'r, R, T>(row: &'r R, name: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(name)
        .map_err(|e| StoreError::Corrupt(format!("column {name}: {e}")))
}

/// Reads a non-negative 64-bit integer column.
pub(crate) fn col_u64<R>(row: &R, name: &str) -> Result<u64, StoreError>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let v: i64 = col(row, name)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {name}: negative value {v}")))
}

/// Reads a fixed-length byte-string column.
pub(crate) fn col_array<const N: usize, R>(row: &R, name: &str) -> Result<[u8; N], StoreError>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let v: Vec<u8> = col(row, name)?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| {
        StoreError::Corrupt(format!(
            "column {name}: expected {N} bytes, got {}",
            v.len()
        ))
    })
}

/// Reads an interval from its start and duration columns.
pub(crate) fn col_interval<R>(row: &R, start: &str, duration: &str) -> Result<Interval, StoreError>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(Interval {
        start: Time(col_u64(row, start)?),
        duration: Duration(col_u64(row, duration)?),
    })
}

/// A collection job's batch, from its `job_id`, `batch_start`, `batch_duration` and
/// `aggregation_parameter` columns.
pub(crate) fn collection_job_batch<R>(row: &R) -> Result<CollectionJobBatch, StoreError>
where
    R: Row,
    for<'n> &'n str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(CollectionJobBatch {
        id: CollectionJobId(col_array(row, "job_id")?),
        batch_interval: col_interval(row, "batch_start", "batch_duration")?,
        aggregation_parameter: col(row, "aggregation_parameter")?,
    })
}
