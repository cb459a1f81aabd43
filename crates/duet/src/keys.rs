//! `duet keys`: HPKE keypairs for collectors.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use duet_core::hpke::HpkeKeypair;
use duet_messages::dap09::HpkeConfigId;

/// Key commands.
#[derive(Subcommand)]
pub enum Command {
    /// Generate an HPKE keypair (X25519, HKDF-SHA256, AES-128-GCM) and print it as JSON. Give the
    /// `config` to `duet task create --collector-hpke-config`; keep the file for `duet collect`.
    Generate {
        /// The HPKE config ID.
        #[arg(long, default_value_t = 1)]
        id: u8,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

/// Runs a key command.
pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Generate { id, out } => {
            let kp = HpkeKeypair::generate(HpkeConfigId(id));
            let json = serde_json::to_string_pretty(&kp.to_serde())?;
            match out {
                Some(path) => std::fs::write(&path, json + "\n")
                    .with_context(|| format!("could not write {}", path.display()))?,
                None => writeln!(std::io::stdout(), "{json}")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads a keypair file written by `duet keys generate`.
pub fn read_keypair(path: &std::path::Path) -> Result<HpkeKeypair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    let serde = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a key file written by `duet keys generate`",
            path.display()
        )
    })?;
    Ok(HpkeKeypair::from_serde(&serde)?)
}
