//! Measurements files: one measurement per line, blank lines and `#` comments skipped.
//!
//! `duet upload` reads a file twice and keeps none of its measurements in memory: a first pass
//! checks every line before anything is sent (a bad line at the end must not leave half the
//! file uploaded), recording only each measurement's line number; the second pass parses the
//! lines again as the uploads take them. A Prio3SumVec(1000) measurement takes 16 kB parsed, so
//! a file of a million of them would otherwise need 16 GB. Standard input, or a pipe named as a
//! path, cannot be read twice, so its text (not its parsed measurements) is kept. A line changed
//! between the passes into another valid measurement is uploaded as it then reads; a change that
//! moves, removes or breaks lines stops the upload there.

use std::io::{BufRead, BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use duet_core::{Measurement, VdafInstance};

/// A measurements file whose every line has been checked.
pub struct MeasurementsFile {
    path: PathBuf,
    vdaf: VdafInstance,
    /// The text of standard input or a pipe; `None` for a file, which is read again to upload.
    stdin: Option<Arc<[u8]>>,
    /// The line (from 1) of each measurement, in order.
    lines: Arc<[usize]>,
}

/// The measurements still to come, parsed as they are taken. An item is an error if the file
/// has changed since it was checked.
pub type Measurements = Box<dyn Iterator<Item = Result<Measurement>> + Send>;

impl MeasurementsFile {
    /// Checks every measurement in `path` (`-` for standard input) against `vdaf`.
    pub fn check(path: &Path, vdaf: &VdafInstance) -> Result<Self> {
        let stdin = if path.as_os_str() == "-" {
            let stdin = std::io::stdin();
            if std::io::IsTerminal::is_terminal(&stdin) {
                eprintln!(
                    "reading measurements from standard input, one per line; end with Ctrl-D \
                     (or pass --measurements FILE)"
                );
            }
            Some(
                read_whole(stdin.lock())
                    .context("could not read measurements from standard input")?,
            )
        } else if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            // A pipe or a device (`<(command)`, `/dev/stdin`) cannot be read twice either.
            Some(
                std::fs::File::open(path)
                    .and_then(read_whole)
                    .with_context(|| format!("could not read {}", path.display()))?,
            )
        } else {
            None
        };
        let mut file = Self {
            path: path.to_path_buf(),
            vdaf: vdaf.clone(),
            stdin,
            lines: Arc::new([]),
        };
        let mut lines = Vec::new();
        for item in file.reader()? {
            let (number, line) = item?;
            file.vdaf
                .parse_measurement(&line)
                .map_err(|e| anyhow!("{}:{number}: {e}", source_name(path)))?;
            lines.push(number);
        }
        if lines.is_empty() {
            bail!("{} holds no measurements", source_name(path));
        }
        file.lines = lines.into();
        Ok(file)
    }

    /// The line (from 1) of each measurement.
    pub fn lines(&self) -> &[usize] {
        &self.lines
    }

    /// How many measurements the file holds.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// The measurements, read again and parsed one at a time.
    pub fn measurements(self) -> Result<Measurements> {
        let name = source_name(&self.path);
        let changed = move |what: String| anyhow!("{name} changed after it was checked: {what}");
        let expected = Arc::clone(&self.lines);
        let vdaf = self.vdaf.clone();
        let mut read = self.reader()?;
        let mut j = 0;
        let mut done = false;
        Ok(Box::new(std::iter::from_fn(move || {
            // Lines added after the check are not read.
            if done || j == expected.len() {
                return None;
            }
            let item = match read.next() {
                None => Some(Err(changed(format!(
                    "it ends after {j} of its {} measurements",
                    expected.len()
                )))),
                Some(Err(e)) => Some(Err(e)),
                Some(Ok((number, _))) if expected[j] != number => {
                    Some(Err(changed(format!("line {number} was not a measurement"))))
                }
                Some(Ok((number, line))) => Some(
                    vdaf.parse_measurement(&line)
                        .map_err(|e| changed(format!("line {number}: {e}"))),
                ),
            };
            j += 1;
            done = !matches!(item, Some(Ok(_)));
            item
        })))
    }

    /// The file's measurement lines: the line number (from 1) and the text of each line that
    /// is neither blank nor a comment.
    fn reader(&self) -> Result<impl Iterator<Item = Result<(usize, String)>> + Send> {
        let source: Box<dyn BufRead + Send> = match &self.stdin {
            Some(text) => Box::new(Cursor::new(Arc::clone(text))),
            None => Box::new(BufReader::new(
                std::fs::File::open(&self.path)
                    .with_context(|| format!("could not read {}", self.path.display()))?,
            )),
        };
        let name = source_name(&self.path);
        Ok(source.lines().enumerate().filter_map(move |(i, line)| {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(anyhow!("{name}:{}: {e}", i + 1))),
            };
            // A byte-order mark (as some editors begin a UTF-8 file) is not part of the
            // first line.
            let line = if i == 0 {
                line.strip_prefix('\u{feff}').unwrap_or(&line)
            } else {
                &line
            };
            let line = line.trim();
            (!line.is_empty() && !line.starts_with('#')).then(|| Ok((i + 1, line.to_owned())))
        }))
    }
}

/// Everything `source` holds.
fn read_whole(mut source: impl Read) -> std::io::Result<Arc<[u8]>> {
    let mut text = Vec::new();
    source.read_to_end(&mut text)?;
    Ok(Arc::from(text))
}

/// Reads every measurement of `path` (`-` for standard input) into memory, with the line (from
/// 1) each was on.
pub fn read_all(path: &Path, vdaf: &VdafInstance) -> Result<(Vec<Measurement>, Vec<usize>)> {
    let file = MeasurementsFile::check(path, vdaf)?;
    let lines = file.lines().to_vec();
    let measurements = file.measurements()?.collect::<Result<Vec<_>>>()?;
    Ok((measurements, lines))
}

/// How messages name a measurements file: `-` is standard input.
pub fn source_name(path: &Path) -> String {
    if path.as_os_str() == "-" {
        "standard input".into()
    } else {
        path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.txt");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    /// Comments, blank lines, a byte-order mark and Windows line ends are skipped; each
    /// measurement keeps its line number.
    #[test]
    fn lines_are_numbered_as_in_the_file() {
        let (_dir, path) = written("\u{feff}# counts\r\n1\r\n0\n\n  1  \n");
        let (measurements, lines) = read_all(&path, &VdafInstance::Prio3Count).expect("read");
        assert_eq!(lines, [2, 3, 5]);
        assert_eq!(
            measurements,
            [
                Measurement::Count(true),
                Measurement::Count(false),
                Measurement::Count(true)
            ]
        );
    }

    /// A bad line is found before anything is read for upload, and named by its line.
    #[test]
    fn a_bad_line_is_named_before_any_upload() {
        let (_dir, path) = written("1\n0\n7\n");
        let e = MeasurementsFile::check(&path, &VdafInstance::Prio3Count)
            .err()
            .expect("refused");
        assert!(
            e.to_string()
                .starts_with(&format!("{}:3: ", path.display())),
            "{e}"
        );
        let (_dir, path) = written("# nothing\n\n");
        let e = MeasurementsFile::check(&path, &VdafInstance::Prio3Count)
            .err()
            .expect("refused");
        assert!(e.to_string().ends_with("holds no measurements"), "{e}");
    }

    /// A pipe named as a path (as `<(command)` gives) is read once and kept.
    #[test]
    fn a_pipe_named_as_a_path_is_read_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(&fifo, "1\n0\n").expect("write"))
        };
        // Read on a thread of its own: opening the pipe again would wait for a writer forever.
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = MeasurementsFile::check(&fifo, &VdafInstance::Prio3Count)
                .and_then(MeasurementsFile::measurements)
                .and_then(|m| m.collect::<Result<Vec<_>>>());
            let _ = done.send(read.map_err(|e| e.to_string()));
        });
        let measurements = outcome
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pipe was opened again and never ended")
            .expect("read");
        writer.join().expect("writer");
        assert_eq!(
            measurements,
            [Measurement::Count(true), Measurement::Count(false)]
        );
    }

    /// A file that changes between the check and the upload yields an error where it changed,
    /// and nothing after it: a line that became bad, a measurement moved to another line, or a
    /// file cut short. One that grew yields no more than was checked.
    #[test]
    fn a_file_changed_after_its_check_stops_where_it_changed() {
        let count = VdafInstance::Prio3Count;
        let outcomes = |after: &str| {
            let (_dir, path) = written("1\n0\n1\n");
            let file = MeasurementsFile::check(&path, &count).expect("check");
            std::fs::write(&path, after).expect("rewrite");
            file.measurements()
                .expect("reopen")
                .map(|m| m.map_err(|e| e.to_string()))
                .collect::<Vec<_>>()
        };
        let bad = outcomes("1\n5\n1\n");
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0], Ok(Measurement::Count(true)));
        assert!(bad[1]
            .as_ref()
            .is_err_and(|e| e.contains("changed after it was checked: line 2")));
        let moved = outcomes("1\n\n0\n1\n");
        assert_eq!(moved.len(), 2);
        assert!(moved[1]
            .as_ref()
            .is_err_and(|e| e.contains("line 3 was not a measurement")));
        let short = outcomes("1\n0\n");
        assert_eq!(short.len(), 3);
        assert!(short[2]
            .as_ref()
            .is_err_and(|e| e.contains("it ends after 2 of its 3")));
        let grown = outcomes("1\n0\n1\n1\n1\n");
        assert_eq!(grown.len(), 3);
        assert!(grown.iter().all(|m| m.is_ok()));
    }
}
