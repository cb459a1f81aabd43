//! The bench's two servers: `duet serve` child processes for the Leader and the Helper, and what
//! `/proc` says about their CPU time and memory.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

/// Kills the server on every exit path. The server also stops by itself when the pipe on its
/// standard input closes, which happens however this process ends.
pub(super) struct ServerProcess(pub(super) std::process::Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user and system, all threads) a process has used so far, from `/proc`; `None`
/// for this process.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    /// `/proc` counts CPU time in `USER_HZ` ticks, 100 per second on Linux.
    const TICKS_PER_S: f64 = 100.0;
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name, which may itself hold spaces:
            // `state` is field 3, `utime` 14 and `stime` 15.
            let rest = stat.get(stat.rfind(')')? + 1..)?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / TICKS_PER_S)
        })
        .unwrap_or(0.0)
}

/// CPU seconds used so far by each of `servers`, then by this process (the upload client and
/// the collector).
pub(super) fn cpu_snapshot(servers: &[&ServerProcess]) -> Vec<f64> {
    servers
        .iter()
        .map(|s| cpu_seconds(Some(s.0.id())))
        .chain([cpu_seconds(None)])
        .collect()
}

/// The CPU microseconds per report each process of two [`cpu_snapshot`]s spent between them,
/// over `reports` reports.
pub(super) fn cpu_us_per_report(before: &[f64], after: &[f64], reports: usize) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) * 1e6 / reports as f64)
        .collect()
}

pub(super) fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Lines of a server's output kept to explain why it did not start.
const SERVER_LINES_KEPT: usize = 10;

/// Which role a bench server plays.
#[derive(Clone, Copy)]
pub(super) enum ServerRole {
    /// The Leader at `/leader/`, running its jobs or (`false`) only serving its API.
    Leader { jobs: bool },
    /// The Helper at `/helper/`.
    Helper,
}

/// Where a run's servers keep their logs: a directory, and the run's prefix for file names.
pub(super) type ServerLogs<'a> = Option<(&'a Path, &'a str)>;

/// Starts `duet serve` in `role` on `database`, with the top-level config lines `settings`;
/// returns it and its base URL. With `logs`, every
/// line the server writes to its standard error is appended to `<prefix>-<role>.log` there.
pub(super) fn start_server(
    dir: &Path,
    database: &str,
    settings: &str,
    role: ServerRole,
    logs: ServerLogs<'_>,
) -> Result<(ServerProcess, String)> {
    let (name, section) = match role {
        ServerRole::Leader { jobs } => (
            if jobs { "leader" } else { "leader-api" },
            format!("[leader]\npath_prefix = \"/leader\"\n[aggregator]\nrun_jobs = {jobs}\n"),
        ),
        ServerRole::Helper => (
            "helper",
            "[helper]\npath_prefix = \"/helper\"\n".to_string(),
        ),
    };
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:0\"\ndatabase = \"{database}\"\n{settings}{section}"),
    )?;
    let exe = std::env::current_exe().context("cannot find the duet executable")?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--exit-on-stdin-eof", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .env_remove("DUET_DATABASE")
        .env_remove("DUET_LISTEN")
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `duet serve`")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let server = ServerProcess(child);
    let mut log = match logs {
        Some((logs, prefix)) => {
            let path = logs.join(format!("{prefix}-{name}.log"));
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("cannot open the server log {}", path.display()))?,
            )
        }
        None => None,
    };
    let mut reader = BufReader::new(stderr);
    // The server may log before it serves (at whatever level `RUST_LOG` asks for): skip to the
    // line naming its address, keeping the last few others for the error if it never comes.
    let mut before: Vec<String> = Vec::new();
    let base = loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("the server did not start:\n{}", before.join("\n"));
        }
        if let Some(log) = log.as_mut() {
            log.write_all(line.as_bytes())?;
        }
        if let Some(base) = line.trim().strip_prefix("duet serving on ") {
            break base.to_string();
        }
        if before.len() == SERVER_LINES_KEPT {
            before.remove(0);
        }
        before.push(line.trim_end().to_string());
    };
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            // A log that can no longer be written is dropped; the server runs on.
            if log.as_mut().is_some_and(|log| log.write_all(&buf).is_err()) {
                eprintln!("warning: could not write a server log; the rest of it is discarded");
                log = None;
            }
            buf.clear();
        }
    });
    Ok((server, base))
}
