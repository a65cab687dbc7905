//! Capture to disk (`--capture DIR`): every request, as it ends, appended to a file in DIR, so that
//! its history survives a restart of the shim. On start the inspector shows it again (marked as from
//! disk), and `glance-shim har DIR` turns it into a HAR file.
//!
//! - One JSON line per request ([`Line`]): the record's values ([`Saved`]) and its kept copies,
//!   masked as the inspector masks them: secret header values, secret JSON fields, and bytes that
//!   name a secret which cannot be masked in them are left out. Token values are never written.
//! - Files are named `capture-<time>-<pid>.jsonl`: a new one at each start, and whenever the current
//!   one passes an eighth of `--capture-max`. While the directory holds more than `--capture-max`,
//!   its oldest files are removed.
//! - Lines are appended by a thread of its own (the proxy only hands over the record), each as soon
//!   as its request ends: one `write(2)` per request, or per batch of those that ended meanwhile when
//!   they come faster. A crash or SIGKILL loses at most what was not yet written: normally the line
//!   being written. Read back, a torn or corrupt line is reported with its file's name, and the rest
//!   is read.
//! - The directory is made 0700 and the files 0600; a directory others can enter is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::exchange::{Exchange, Saved};
use crate::inspect::view;
use crate::kept::{Copies, Head, Keeper, KeptBody};

/// Records waiting for the writer; past this, records are left out of the capture (and counted).
const QUEUE: usize = 4096;

/// Bytes of lines written at most in one write.
const BATCH: usize = 1 << 20;

/// The format's version, in every line.
const VERSION: u32 = 1;

/// Why the capture directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot capture to {} (--capture): {why}", dir.display())]
pub struct CaptureError {
    pub dir: PathBuf,
    pub why: String,
}

/// One request as written: its values, and what was kept of its heads and bodies.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line {
    pub v: u32,
    #[serde(flatten)]
    pub saved: Saved,
    /// `[name, value]` pairs as they arrived, secret values masked.
    pub request_head: Option<Vec<(String, String)>>,
    pub response_head: Option<Vec<(String, String)>>,
    pub request_body: Option<BodyLine>,
    pub response_body: Option<BodyLine>,
}

/// What was kept of a body.
#[derive(Debug, Serialize, Deserialize)]
pub struct BodyLine {
    /// The bytes written, base64.
    pub b64: String,
    /// They are the whole body (as sent, unless `masked`).
    pub complete: bool,
    /// A JSON body whose secret values were masked before it was written.
    #[serde(default)]
    pub masked: bool,
    /// The kept bytes named a secret that could not be masked: none were written.
    #[serde(default)]
    pub withheld: bool,
    /// Why the copy stopped early, if it did.
    pub short: Option<String>,
}

impl Line {
    /// The line for a finished request, with up to `body_max` bytes of each body.
    pub fn of(e: &Exchange, body_max: usize) -> Line {
        let c = &e.copies;
        let secrets = view::secret_values(e);
        let content_type = |h: Option<&Head>| {
            h.and_then(|h| h.get("content-type"))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let head = |h: &Head| {
            view::fields(h)
                .into_iter()
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect()
        };
        Line {
            v: VERSION,
            saved: e.saved(),
            request_head: c.request_head.as_ref().map(head),
            response_head: c.response_head.get().map(head),
            request_body: c.request_body().map(|b| {
                BodyLine::of(
                    content_type(c.request_head.as_ref()).as_deref(),
                    b,
                    body_max,
                    &secrets,
                )
            }),
            response_body: c.response_body.get().map(|b| {
                BodyLine::of(
                    content_type(c.response_head.get()).as_deref(),
                    b,
                    body_max,
                    &secrets,
                )
            }),
        }
    }
}

impl BodyLine {
    fn of(content_type: Option<&str>, kept: &KeptBody, max: usize, secrets: &[String]) -> BodyLine {
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        // The inspector may keep more of a body than the capture writes (--inspect-body).
        let cut = kept.bytes.len() > max;
        let (b64, masked, withheld) = match view::safe(content_type, kept, secrets) {
            view::Safe::Bytes(b) => (encode(&b[..b.len().min(max)]), false, false),
            view::Safe::Masked(b) => (encode(&b), true, false),
            view::Safe::Withheld => (String::new(), false, true),
        };
        BodyLine {
            b64,
            complete: kept.complete && !withheld && !cut,
            masked: masked || kept.masked,
            withheld,
            short: kept.short.map(str::to_owned),
        }
    }
}

/// The capture: a queue to the thread that writes.
#[derive(Debug)]
pub struct Capture {
    queue: SyncSender<Arc<Exchange>>,
    /// Records left out because the writer fell [`QUEUE`] behind.
    dropped: AtomicU64,
}

impl Capture {
    /// Makes `dir` (0700) if needed, refuses one that others can enter, reads what it holds, and
    /// starts the writer on a new file. Returns the lines read, oldest first.
    pub fn open(config: &crate::config::Capture) -> Result<(Capture, Loaded), CaptureError> {
        let dir = &config.dir;
        let fail = |why: String| CaptureError {
            dir: dir.clone(),
            why,
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(e.to_string()))?;
        }
        let meta = fs::metadata(dir).map_err(|e| fail(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fail("it is not a directory".into()));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(fail(format!(
                "others can read it (mode {:o}); it holds requests: chmod 700 it, or name a new \
                 directory",
                meta.permissions().mode() & 0o777
            )));
        }
        let loaded = load(dir);
        let writer =
            Writer::new(dir.clone(), config.max, config.body).map_err(|e| fail(e.to_string()))?;
        writer.prune();
        let (queue, rx) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("glance-shim-capture".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fail(e.to_string()))?;
        Ok((
            Capture {
                queue,
                dropped: AtomicU64::new(0),
            },
            loaded,
        ))
    }

    /// Hands a finished request to the writer. The proxy never waits: if the writer is [`QUEUE`]
    /// records behind, this one is left out of the capture, and a warning says how many were.
    pub fn record(&self, e: &Arc<Exchange>) {
        match self.queue.try_send(e.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(
                        id = e.id.as_str(),
                        left_out = n,
                        "the capture's disk is {QUEUE} requests behind: {n} requests left out of \
                         the capture so far (they are still in the log and the inspector)"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Writes lines to the current file, starts a new one past its size, and keeps the directory under
/// its bound.
struct Writer {
    dir: PathBuf,
    max: u64,
    /// Bytes of each body written (`--capture-body`).
    body_max: usize,
    file: File,
    path: PathBuf,
    written: u64,
}

impl Writer {
    fn new(dir: PathBuf, max: usize, body_max: usize) -> io::Result<Writer> {
        let (file, path) = new_file(&dir)?;
        Ok(Writer {
            dir,
            max: max as u64,
            body_max,
            file,
            path,
            written: 0,
        })
    }

    fn run(mut self, rx: Receiver<Arc<Exchange>>) {
        let mut failing = false;
        let mut lines = Vec::new();
        // Woken for each request as it ends, so that a crash loses at most the lines in hand. (Waking
        // once a millisecond instead saved 2-4 us of system time per request under full load, and
        // would lose up to a millisecond of requests: see bench/README.md, "The capture's cost".)
        while let Ok(e) = rx.recv() {
            // What ended meanwhile goes out in the same write.
            let mut next = Some(e);
            while let Some(e) = next.take() {
                if serde_json::to_writer(&mut lines, &Line::of(&e, self.body_max)).is_ok() {
                    lines.push(b'\n');
                }
                if lines.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            let written = self.write(&lines);
            lines.clear();
            match written {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    warn!(
                        file = %self.path.display(),
                        error = %error,
                        "cannot write the capture ({error}); requests are left out of it until it \
                         can be written again"
                    );
                }
                Err(_) => {}
            }
        }
    }

    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        self.file.write_all(line)?;
        self.written += line.len() as u64;
        if self.written > self.file_max() {
            (self.file, self.path) = new_file(&self.dir)?;
            self.written = 0;
            self.prune();
        }
        Ok(())
    }

    /// The size past which a new file is started.
    fn file_max(&self) -> u64 {
        (self.max / 8).max(4096)
    }

    /// Removes the oldest files until the others leave room for the current one to grow to its
    /// size (never the current one): the directory stays within `max`, give or take one line.
    fn prune(&self) {
        let files = capture_files(&self.dir);
        let mut total: u64 = files.iter().map(|(_, size)| size).sum();
        let room = self.max.saturating_sub(self.file_max());
        for (path, size) in files {
            if total <= room || path == self.path {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
    }
}

fn new_file(dir: &Path) -> io::Result<(File, PathBuf)> {
    let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let path = dir.join(format!("capture-{stamp}-{}.jsonl", std::process::id()));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)?;
    Ok((file, path))
}

/// The capture files in `dir` with their sizes, oldest first (their names sort by time).
fn capture_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files: Vec<(PathBuf, u64)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("capture-") && name.ends_with(".jsonl")
        })
        .filter_map(|entry| Some((entry.path(), entry.metadata().ok()?.len())))
        .collect();
    files.sort();
    files
}

/// What a capture directory held.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Oldest first.
    pub lines: Vec<Line>,
    /// One for each file that could not be read whole, naming it.
    pub warnings: Vec<String>,
}

/// Reads every capture file in `dir`, oldest first. A line that does not parse (torn by a crash,
/// or corrupt) is skipped, and a warning names its file.
pub fn load(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    for (path, _) in capture_files(dir) {
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                loaded
                    .warnings
                    .push(format!("{}: cannot be read ({e}); skipped", path.display()));
                continue;
            }
        };
        let mut bad = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            if raw.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Line>(raw) {
                Ok(line) if line.v == VERSION => loaded.lines.push(line),
                Ok(line) => bad.push((i + 1, format!("format version {}", line.v))),
                Err(e) => bad.push((i + 1, e.to_string())),
            }
        }
        if let Some((first, why)) = bad.first() {
            loaded.warnings.push(format!(
                "{}: {} line{} could not be read (line {first}: {why}); the rest was read",
                path.display(),
                bad.len(),
                if bad.len() == 1 { "" } else { "s" },
            ));
        }
    }
    loaded
}

/// Every request captured in `dir`, oldest first, as records (for `glance-shim har DIR`), and the
/// warnings about what could not be read.
pub fn records(dir: &Path) -> (Vec<Arc<Exchange>>, Vec<String>) {
    let Loaded {
        lines,
        mut warnings,
    } = load(dir);
    let keeper = Keeper::new(lines.len(), usize::MAX, usize::MAX);
    let mut records = Vec::with_capacity(lines.len());
    for (serial, line) in (0..).zip(lines) {
        let id = line.saved.id.clone();
        match line.restore(serial, &keeper, &mut |_| {}) {
            Ok(e) => records.push(Arc::new(e)),
            Err(why) => warnings.push(format!("{id}: cannot be read back: {why}")),
        }
    }
    (records, warnings)
}

/// Why the copy of a body read back stopped early.
const SHORT: &str = "the inspector's memory (--inspect-memory) was full when it was captured";
const WITHHELD: &str = "left out of the capture: it names a secret that could not be masked";

impl Line {
    /// The record this line was written from, under `serial`, its copies charged to `keeper`.
    pub fn restore(
        self,
        serial: u64,
        keeper: &Keeper,
        evicted: &mut dyn FnMut(&Exchange),
    ) -> Result<Exchange, String> {
        let head = |fields: Option<Vec<(String, String)>>, evicted: &mut dyn FnMut(&Exchange)| {
            let mut lines = Vec::new();
            for (name, value) in fields? {
                lines.extend_from_slice(name.as_bytes());
                lines.push(b':');
                lines.extend_from_slice(value.as_bytes());
                lines.push(b'\n');
            }
            keeper.restored_head(lines, evicted)
        };
        let body = |b: Option<BodyLine>, evicted: &mut dyn FnMut(&Exchange)| {
            let b = b?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&b.b64)
                .unwrap_or_default();
            let short = match (b.withheld, &b.short) {
                (true, _) => Some(WITHHELD),
                (false, Some(_)) => Some(SHORT),
                (false, None) => None,
            };
            keeper.restored_body(bytes, b.complete, short, b.masked, evicted)
        };
        let request_head = head(self.request_head, evicted);
        let copies = Copies::new(request_head, false);
        if let Some(h) = head(self.response_head, evicted) {
            let _ = copies.response_head.set(h);
        }
        if let Some(b) = body(self.request_body, evicted) {
            copies.keep_request_body(b);
        }
        if let Some(b) = body(self.response_body, evicted) {
            let _ = copies.response_body.set(b);
        }
        Exchange::restore(serial, self.saved, copies)
    }
}
