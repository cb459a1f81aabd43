//! `duet`: privacy-respecting aggregate statistics. One binary for the Leader, the Helper, the
//! client and the collector of the Distributed Aggregation Protocol (DAP-09, Prio3).
#![forbid(unsafe_code)]

/// `println!` that returns an error from the enclosing function, rather than panicking, when
/// standard output is closed or full (`duet collect … | head -1`, a full disk).
macro_rules! outln {
    ($($arg:tt)*) => {
        crate::write_stdout(&format!("{}\n", format_args!($($arg)*)))?
    };
}

/// `print!` likewise.
macro_rules! out {
    ($($arg:tt)*) => {
        crate::write_stdout(&format!($($arg)*))?
    };
}

mod bench;
mod collect;
mod db;
mod interop;
mod keys;
mod measurements;
mod open_files;
mod quickstart;
mod serve;
mod task;
mod upload;
mod vdaf_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Privacy-respecting aggregate statistics (DAP-09 with Prio3).
#[derive(Parser)]
#[command(name = "duet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (e.g. `info`, `duet_aggregator=debug`); also read from RUST_LOG.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "warn")]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run Leader, Helper, clients and collector in one process and print a private aggregate.
    Quickstart(quickstart::Args),
    /// Serve a Leader, a Helper or both, as configured in a TOML file.
    Serve(serve::Args),
    /// Create, import and list tasks.
    #[command(subcommand)]
    Task(task::Command),
    /// Upload measurements to a task's Leader.
    Upload(upload::Args),
    /// Collect a batch's aggregate from a task's Leader.
    Collect(collect::Args),
    /// Measure throughput, latency and memory on this machine.
    Bench(bench::Args),
    /// Manage HPKE keys.
    #[command(subcommand)]
    Keys(keys::Command),
    /// Serve the DAP interop test API (draft-dcook-ppm-dap-interop-test-design-07) for one role.
    #[command(subcommand)]
    Interop(interop::Command),
}

/// Writes `text` to standard output, or says why it could not.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| anyhow::anyhow!("could not write to standard output: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only on a terminal: logs piped to a file or a journal stay plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Quickstart(a) => quickstart::run(a).await,
            Command::Serve(a) => serve::run(a).await,
            Command::Task(c) => task::run(c).await,
            Command::Upload(a) => upload::run(a).await,
            Command::Collect(a) => collect::run(a).await,
            Command::Keys(c) => keys::run(c),
            Command::Interop(c) => interop::run(c).await,
            Command::Bench(a) => bench::run(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
