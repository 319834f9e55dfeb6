//! Task output files: a size-bounded, rotating `output.log` and reading it back.
//!
//! The shim writes stdout and stderr of the workload, line by line, into one combined file
//! `output.log` in the task dir (no stream prefix, so `flotilla logs` shows what the program
//! printed). When the file would exceed [`LogLimits::max_file_bytes`] it is renamed to
//! `output.log.1`, older files shift up, and at most [`LogLimits::max_files`] files exist in total.

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Name of the current log file inside a task dir.
pub const LOG_FILE: &str = "output.log";
/// Longest line kept whole; longer output is split into lines of this size so a program that
/// never prints a newline cannot grow the shim's memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum LogError {
    #[error("log limits: {field} {reason}")]
    BadLimits {
        field: &'static str,
        reason: &'static str,
    },
    #[error("log file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Size bounds of a task's log files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimits {
    /// Size at which `output.log` is rotated.
    pub max_file_bytes: u64,
    /// Files kept in total, the current one included (at least 1).
    pub max_files: u32,
}

impl Default for LogLimits {
    /// Docker's json-file driver with `max-size=10m max-file=3`.
    fn default() -> Self {
        LogLimits {
            max_file_bytes: 10 << 20,
            max_files: 3,
        }
    }
}

impl LogLimits {
    pub fn validate(&self) -> Result<(), LogError> {
        if self.max_file_bytes < 1024 {
            return Err(LogError::BadLimits {
                field: "max_file_bytes",
                reason: "must be at least 1024",
            });
        }
        if self.max_files == 0 {
            return Err(LogError::BadLimits {
                field: "max_files",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// Path of log file number `n` (0 = current) in `dir`.
fn log_path(dir: &Path, n: u32) -> PathBuf {
    if n == 0 {
        dir.join(LOG_FILE)
    } else {
        dir.join(format!("{LOG_FILE}.{n}"))
    }
}

/// Appends whole lines to `output.log`, rotating by size.
pub struct RotatingLog {
    dir: PathBuf,
    limits: LogLimits,
    file: File,
    size: u64,
}

impl RotatingLog {
    /// Opens (appending to) the current log file in `dir`.
    pub fn open(dir: &Path, limits: LogLimits) -> Result<Self, LogError> {
        limits.validate()?;
        let path = log_path(dir, 0);
        let file = open_append(&path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingLog {
            dir: dir.to_path_buf(),
            limits,
            file,
            size,
        })
    }

    /// Writes one line (which should end in `\n`), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), LogError> {
        if self.size > 0 && self.size + line.len() as u64 > self.limits.max_file_bytes {
            self.rotate()?;
        }
        let path = log_path(&self.dir, 0);
        self.file
            .write_all(line)
            .map_err(|source| LogError::Io { path, source })?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), LogError> {
        let oldest = self.limits.max_files - 1;
        if oldest == 0 {
            // One file only: start it over.
            let path = log_path(&self.dir, 0);
            self.file
                .set_len(0)
                .map_err(|source| LogError::Io { path, source })?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..=oldest).rev() {
            let from = log_path(&self.dir, n - 1);
            let to = log_path(&self.dir, n);
            match std::fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(LogError::Io { path: from, source }),
            }
        }
        self.file = open_append(&log_path(&self.dir, 0))?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, LogError> {
    // The workload's output may hold secrets: readable by root only, like `docker logs`.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`], keeping any unterminated tail
/// for the next chunk.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds a chunk and returns the complete lines it finished (each ending in `\n`).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for &b in chunk {
            self.pending.push(b);
            if b == b'\n' {
                lines.push(std::mem::take(&mut self.pending));
            } else if self.pending.len() >= MAX_LINE_BYTES {
                self.pending.push(b'\n');
                lines.push(std::mem::take(&mut self.pending));
            }
        }
        lines
    }

    /// The unterminated rest at end of stream, newline-terminated, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            None
        } else {
            let mut rest = std::mem::take(&mut self.pending);
            rest.push(b'\n');
            Some(rest)
        }
    }
}

/// The last `tail` lines (all lines if `None`) across the rotated files of `dir`, oldest first,
/// and the position in the current file right after them (for following).
pub fn read_tail(
    dir: &Path,
    tail: Option<usize>,
) -> Result<(Vec<Vec<u8>>, FollowPosition), LogError> {
    let mut lines: VecDeque<Vec<u8>> = VecDeque::new();
    let mut n = 1;
    let mut rotated = Vec::new();
    while log_path(dir, n).exists() {
        rotated.push(log_path(dir, n));
        n += 1;
    }
    // Rotated files first, highest number (oldest) first. Then the current file, whose handle we
    // keep so a rotation during or after reading cannot make us miss or repeat lines.
    for path in rotated.iter().rev() {
        match File::open(path) {
            Ok(f) => push_lines(BufReader::new(f), &mut lines, tail, path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LogError::Io {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    let current_path = log_path(dir, 0);
    let position = match File::open(&current_path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(|source| LogError::Io {
                path: current_path.clone(),
                source,
            })?;
            // Only complete lines are consumed; a partial last line is left for the follower.
            let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            push_lines(&buf[..complete], &mut lines, tail, &current_path)?;
            let offset = complete as u64;
            f.seek(SeekFrom::Start(offset))
                .map_err(|source| LogError::Io {
                    path: current_path.clone(),
                    source,
                })?;
            FollowPosition {
                file: Some(f),
                offset,
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => FollowPosition {
            file: None,
            offset: 0,
        },
        Err(source) => {
            return Err(LogError::Io {
                path: current_path,
                source,
            })
        }
    };
    Ok((lines.into(), position))
}

fn push_lines(
    reader: impl BufRead,
    lines: &mut VecDeque<Vec<u8>>,
    tail: Option<usize>,
    path: &Path,
) -> Result<(), LogError> {
    for line in reader.split(b'\n') {
        let mut line = line.map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        line.push(b'\n');
        lines.push_back(line);
        if tail.is_some_and(|t| lines.len() > t) {
            lines.pop_front();
        }
    }
    Ok(())
}

/// Where a follower is in the current log file.
pub struct FollowPosition {
    file: Option<File>,
    offset: u64,
}

/// Reads what was appended since `position`, switching to the new `output.log` after a rotation
/// (the old handle is drained first, so nothing is lost across it).
fn read_new(dir: &Path, position: &mut FollowPosition) -> Result<Vec<u8>, LogError> {
    let path = log_path(dir, 0);
    let io_err = |source| LogError::Io {
        path: path.clone(),
        source,
    };
    let mut out = Vec::new();
    if let Some(f) = position.file.as_mut() {
        let read = f.read_to_end(&mut out).map_err(io_err)?;
        position.offset += read as u64;
    }
    let current = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(e)),
    };
    let same = match (&position.file, current.metadata()) {
        (Some(old), Ok(new_meta)) => old
            .metadata()
            .map(|m| m.ino() == new_meta.ino() && m.dev() == new_meta.dev())
            .unwrap_or(false),
        _ => false,
    };
    if !same {
        let mut f = current;
        let read = f.read_to_end(&mut out).map_err(io_err)?;
        position.file = Some(f);
        position.offset = read as u64;
    } else if position
        .file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.len() < position.offset)
    {
        // Truncated in place (single-file rotation): start over.
        if let Some(f) = position.file.as_mut() {
            f.seek(SeekFrom::Start(0)).map_err(io_err)?;
            let read = f.read_to_end(&mut out).map_err(io_err)?;
            position.offset = read as u64;
        }
    }
    Ok(out)
}

/// A stream of log chunks: the tail, then (when `follow`) new output until `finished` reports
/// true and everything written so far was delivered.
pub fn log_stream<F>(
    dir: PathBuf,
    tail: Option<usize>,
    follow: bool,
    finished: F,
) -> Result<BoxStream<'static, Result<bytes::Bytes, LogError>>, LogError>
where
    F: Fn() -> bool + Send + 'static,
{
    let (lines, position) = read_tail(&dir, tail)?;
    let head = futures::stream::iter(lines.into_iter().map(|l| Ok(bytes::Bytes::from(l))));
    if !follow {
        return Ok(head.boxed());
    }
    struct Follow<F> {
        dir: PathBuf,
        position: FollowPosition,
        finished: F,
        done: bool,
    }
    let state = Follow {
        dir,
        position,
        finished,
        done: false,
    };
    let rest = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            // Checked before reading so output written just before the exit is still delivered.
            let finished = (st.finished)();
            match read_new(&st.dir, &mut st.position) {
                Ok(chunk) if !chunk.is_empty() => return Some((Ok(bytes::Bytes::from(chunk)), st)),
                Ok(_) if finished => return None,
                Ok(_) => tokio::time::sleep(FOLLOW_POLL).await,
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
        }
    });
    Ok(head.chain(rest).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_bounds_lines() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\nbc"), vec![b"a\n".to_vec()]);
        assert_eq!(s.push(b"d\n"), vec![b"bcd\n".to_vec()]);
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES + 1);
        assert_eq!(s.finish().map(|l| l.len()), Some(11));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn rotation_keeps_total_bounded_and_tail_spans_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: 1024,
            max_files: 3,
        };
        let mut log = RotatingLog::open(dir.path(), limits).unwrap();
        for i in 0..1000 {
            log.write_line(format!("line {i:05}\n").as_bytes()).unwrap();
        }
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3 * 1024, "total {total}");
        assert!(!dir.path().join("output.log.3").exists());
        let (lines, _) = read_tail(dir.path(), Some(200)).unwrap();
        assert_eq!(lines.len(), 200);
        assert_eq!(lines.last().unwrap(), b"line 00999\n");
        assert_eq!(lines[0], b"line 00800\n".to_vec());
    }

    #[test]
    fn bad_limits_named() {
        let err = LogLimits {
            max_file_bytes: 10,
            max_files: 3,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("max_file_bytes"), "{err}");
        let err = LogLimits {
            max_file_bytes: 4096,
            max_files: 0,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("max_files"), "{err}");
    }

    #[tokio::test]
    async fn follow_crosses_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits {
            max_file_bytes: 1024,
            max_files: 2,
        };
        let mut log = RotatingLog::open(dir.path(), limits).unwrap();
        log.write_line(b"first\n").unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done2 = done.clone();
        let mut stream = log_stream(dir.path().to_path_buf(), None, true, move || {
            done2.load(std::sync::atomic::Ordering::SeqCst)
        })
        .unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            bytes::Bytes::from("first\n")
        );
        // Enough to force a rotation; the follower must see every line exactly once.
        let mut expected = Vec::new();
        for i in 0..200 {
            let l = format!("l{i:04}\n");
            log.write_line(l.as_bytes()).unwrap();
            expected.extend_from_slice(l.as_bytes());
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }
}
