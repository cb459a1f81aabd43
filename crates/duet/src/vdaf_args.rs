//! The VDAF flags shared by several commands.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use duet_core::vdaf::default_chunk_length;
use duet_core::VdafInstance;

/// The VDAF families the CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VdafKind {
    /// Prio3Count: each measurement is 0 or 1.
    Count,
    /// Prio3Sum: each measurement is an integer of `--bits` bits.
    Sum,
    /// Prio3SumVec: each measurement is `--length` integers of `--bits` bits.
    Sumvec,
    /// Prio3Histogram: each measurement is a bucket index below `--length`.
    Histogram,
}

impl VdafKind {
    /// The name used on the command line and in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Sum => "sum",
            Self::Sumvec => "sumvec",
            Self::Histogram => "histogram",
        }
    }
}

/// `--vdaf` and its parameters.
#[derive(Args, Clone, Debug)]
pub struct VdafArgs {
    /// The kind of statistic.
    #[arg(long, value_enum)]
    pub vdaf: VdafKind,
    /// Bits per integer (sum, sumvec). Default 8.
    #[arg(long)]
    pub bits: Option<usize>,
    /// Number of buckets (histogram) or of vector elements (sumvec). Default 10.
    #[arg(long)]
    pub length: Option<usize>,
    /// Parallel-sum chunk length (histogram, sumvec). Default: about the square root of the
    /// measurement's size.
    #[arg(long)]
    pub chunk_length: Option<usize>,
}

impl VdafArgs {
    /// The configured VDAF, or an error naming the flag to fix.
    pub fn instance(&self) -> Result<VdafInstance> {
        let only = |flag: &str, given: bool| -> Result<()> {
            if given {
                bail!(
                    "--{flag} does not apply to --vdaf {}; remove it",
                    self.vdaf.name()
                );
            }
            Ok(())
        };
        let instance = match self.vdaf {
            VdafKind::Count => {
                only("bits", self.bits.is_some())?;
                only("length", self.length.is_some())?;
                only("chunk-length", self.chunk_length.is_some())?;
                VdafInstance::Prio3Count
            }
            VdafKind::Sum => {
                only("length", self.length.is_some())?;
                only("chunk-length", self.chunk_length.is_some())?;
                VdafInstance::Prio3Sum {
                    bits: self.bits.unwrap_or(8),
                }
            }
            VdafKind::Sumvec => {
                let bits = self.bits.unwrap_or(8);
                let length = self.length.unwrap_or(10);
                let Some(measurement_len) = bits.checked_mul(length) else {
                    bail!("--bits {bits} times --length {length} is too large; use smaller ones");
                };
                let chunk_length = self
                    .chunk_length
                    .unwrap_or_else(|| default_chunk_length(measurement_len));
                VdafInstance::Prio3SumVec {
                    bits,
                    length,
                    chunk_length,
                }
            }
            VdafKind::Histogram => {
                only("bits", self.bits.is_some())?;
                let length = self.length.unwrap_or(10);
                let chunk_length = self
                    .chunk_length
                    .unwrap_or_else(|| default_chunk_length(length));
                VdafInstance::Prio3Histogram {
                    length,
                    chunk_length,
                }
            }
        };
        instance
            .instantiate()
            .map_err(|e| anyhow::anyhow!("{e}; check --bits, --length and --chunk-length"))?;
        Ok(instance)
    }
}
