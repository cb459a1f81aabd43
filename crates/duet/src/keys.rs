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
        /// Write to this file instead of standard output (readable by its owner only).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Replace the file if it exists (the key in it is lost, and with it every collection
        /// of the tasks made for it).
        #[arg(long, requires = "out")]
        force: bool,
    },
}

/// Runs a key command.
pub fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Generate { id, out, force } => {
            let kp = HpkeKeypair::generate(HpkeConfigId(id));
            let json = serde_json::to_string_pretty(&kp.to_serde())?;
            match out {
                Some(path) => write_secret(&path, &(json + "\n"), force)?,
                None => writeln!(std::io::stdout(), "{json}")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes a file of secrets (a private key, a task's tokens and verify key) readable by its owner
/// only. An existing file is kept unless `force`: replacing one loses what it holds.
pub fn write_secret(path: &std::path::Path, contents: &str, force: bool) -> Result<()> {
    write_new(path, contents, force, 0o600)
}

/// Writes a file anyone may read (nothing secret in it); an existing file is kept unless `force`.
pub fn write_public(path: &std::path::Path, contents: &str, force: bool) -> Result<()> {
    write_new(path, contents, force, 0o644)
}

fn write_new(path: &std::path::Path, contents: &str, force: bool, mode: u32) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = match options.open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} exists; pass --force to replace it (what it holds is lost) or choose another file",
            path.display()
        ),
        opened => opened.with_context(|| format!("could not write {}", path.display()))?,
    };
    // A replaced file keeps its old mode unless it is set.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("could not set the permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("could not write {}", path.display()))
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
