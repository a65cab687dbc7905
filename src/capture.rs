//! Capture to disk (`--capture DIR`): every request, as it ends, appended to a file in DIR, so that
//! its history survives a restart of the shim. On start the inspector shows it again (marked as from
//! disk), and `glance-shim har DIR` turns it into a HAR file.
//!
//! - One record per request: a JSON line of the record's values ([`Meta`]: those of [`Saved`], and
//!   the length of each section that follows), then the sections' bytes as they were kept, then a
//!   newline. The sections are the request's head and the response's head (`name:value` lines, as
//!   the record keeps them) and the first `--capture-body` bytes of each body. Like WARC's records,
//!   the bytes go as they are: nothing to escape or encode, and `less` reads the heads.
//! - What is written is masked as `mask` says: secret header values, secret JSON fields, and bytes
//!   that name a secret which cannot be masked in them are left out. Token values are never written.
//! - The writer is a thread of its own. A request's guard hands it the record over a bounded channel
//!   before the request's completion line is logged; the thread appends it to the current file
//!   through a buffer that it writes out whenever no record waits, and at least every
//!   [`FLUSH_WITHIN`] while records keep coming; after each write it lets records gather for
//!   [`GATHER_FOR`]. So a graceful stop writes every request, and a
//!   `kill -9` loses at most the last [`FLUSH_WITHIN`] of them. A full channel (a stalled disk)
//!   leaves requests out of the capture, counted and warned about; they are still in the log and
//!   the inspector.
//! - Files are named `capture-<time>-<pid>.rec`: a new one at each start, and whenever the current
//!   one passes an eighth of `--capture-max`. While the directory holds more than `--capture-max`,
//!   its oldest files are removed. Files of the first format (`.jsonl`, a JSON line per request)
//!   are still read. Read back, a torn or corrupt record is reported with its file's name, and the
//!   rest is read.
//! - The directory is made 0700 and the files 0600; a directory others can enter is refused.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::warn;

use crate::copies::{Budget, Charge, Copies, Head, KeptBody};
use crate::exchange::{Exchange, Saved};
use crate::mask::{self, Safe};

/// Records that may wait for the writer; past this, requests are left out of the capture (and
/// counted). The copies they hold are charged to `--inspect-memory`, which bounds their bytes.
const QUEUE: usize = 1024;

/// The longest a written record stays in the writer's buffer while records keep coming.
pub const FLUSH_WITHIN: Duration = Duration::from_millis(100);

/// Bytes the writer gathers before it writes them out, unless no record waits.
const BUFFER: usize = 64 << 10;

/// After it writes out, how long the writer leaves records to gather before it takes them again: a
/// busy shim then hands them over in batches, without waking the writer (and writing) for each.
const GATHER_FOR: Duration = Duration::from_millis(10);

/// The format's version, in every record's first line.
const VERSION: u32 = 2;

/// The extension of the files written, and of those of the first format (still read).
const EXTENSION: &str = "rec";
const EXTENSION_V1: &str = "jsonl";

/// Why the capture directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot capture to {} (--capture): {why}", dir.display())]
pub struct CaptureError {
    pub dir: PathBuf,
    pub why: String,
}

/// A record's first line: the request's values, and the length of each section after it.
#[derive(Debug, Serialize, Deserialize)]
struct Meta<'a> {
    v: u32,
    #[serde(flatten)]
    saved: Saved<'a>,
    /// Bytes of the request's head (`name:value` lines, secret values masked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_head: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_head: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_body: Option<BodyMeta<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_body: Option<BodyMeta<'a>>,
}

/// What was kept of a body, besides its bytes.
#[derive(Debug, Serialize, Deserialize)]
struct BodyMeta<'a> {
    /// Bytes of it in the record.
    len: usize,
    /// They are the whole body (as sent, unless `masked`).
    complete: bool,
    /// A JSON body whose secret values were masked before it was written.
    #[serde(default, skip_serializing_if = "is_false")]
    masked: bool,
    /// The kept bytes named a secret that could not be masked: none were written.
    #[serde(default, skip_serializing_if = "is_false")]
    withheld: bool,
    /// Why the copy stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    short: Option<Cow<'a, str>>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// One request read back from a capture.
#[derive(Debug)]
pub struct Record {
    pub saved: Saved<'static>,
    /// `name:value` lines, each ended by `\n`.
    pub request_head: Option<Vec<u8>>,
    pub response_head: Option<Vec<u8>>,
    pub request_body: Option<Body>,
    pub response_body: Option<Body>,
}

/// A body read back from a capture.
#[derive(Debug)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub complete: bool,
    pub masked: bool,
    pub withheld: bool,
    pub short: bool,
}

/// A finished request's record: its first line, its sections, and a newline; up to `body_max`
/// bytes of each body.
fn encode<'e>(e: &'e Exchange, body_max: usize) -> serde_json::Result<Vec<u8>> {
    let c = &e.copies;
    // The secret values of both heads are found as they are masked, before the bodies need them.
    let mut secrets = Vec::new();
    let request_head = c
        .request_head
        .as_ref()
        .map(|h| mask::head_lines(h.lines(), &mut secrets));
    let response_head = c
        .response_head
        .get()
        .map(|h| mask::head_lines(h.lines(), &mut secrets));
    let body = |kept: Option<&'e KeptBody>, head: Option<&Head>| {
        let kept = kept?;
        let content_type = head.and_then(|h| h.get("content-type"));
        let content_type = content_type.map(String::from_utf8_lossy);
        let safe = mask::body(
            content_type.as_deref(),
            &kept.bytes,
            kept.complete,
            &secrets,
        );
        let (bytes, masked, withheld) = match safe {
            Safe::Bytes(b) => (Cow::Borrowed(b), false, false),
            Safe::Masked(b) => (Cow::Owned(b), true, false),
            Safe::Withheld => (Cow::Borrowed(&[][..]), false, true),
        };
        // More of a body may have been copied than the capture writes (--inspect-body), and a
        // masked body, re-serialised, can be longer than the bytes kept.
        let len = bytes.len().min(body_max);
        let meta = BodyMeta {
            len,
            complete: kept.complete && !withheld && len == bytes.len(),
            masked: masked || kept.masked,
            withheld,
            short: kept.short.map(Cow::Borrowed),
        };
        Some((meta, bytes))
    };
    let (request_body, request_bytes) = body(c.request_body(), c.request_head.as_ref()).unzip();
    let (response_body, response_bytes) =
        body(c.response_body.get(), c.response_head.get()).unzip();
    let meta = Meta {
        v: VERSION,
        saved: e.saved(),
        request_head: request_head.as_ref().map(|h| h.len()),
        response_head: response_head.as_ref().map(|h| h.len()),
        request_body,
        response_body,
    };
    let mut out = serde_json::to_vec(&meta)?;
    out.push(b'\n');
    for head in [&request_head, &response_head].into_iter().flatten() {
        out.extend_from_slice(head);
    }
    for (bytes, meta) in [
        (&request_bytes, &meta.request_body),
        (&response_bytes, &meta.response_body),
    ] {
        if let (Some(bytes), Some(meta)) = (bytes, meta) {
            out.extend_from_slice(&bytes[..meta.len]);
        }
    }
    out.push(b'\n');
    Ok(out)
}

/// Reads the records of a file of this format: `bad` gets the number of each record that could
/// not be read, and why. After a bad record, reading goes on at the next line that starts one.
fn decode(text: &[u8], records: &mut Vec<Record>, bad: &mut Vec<(usize, String)>) {
    let mut at = 0;
    let mut n = 0;
    while at < text.len() {
        if text[at] == 0 {
            // The zeros at the end of a file that was being written when the shim was killed.
            at = text[at..]
                .iter()
                .position(|&b| b != 0)
                .map_or(text.len(), |i| at + i);
            continue;
        }
        let Some(end) = memchr::memchr(b'\n', &text[at..]).map(|i| at + i) else {
            bad.push((n + 1, "torn: its first line has no end".into()));
            return;
        };
        if end == at {
            at += 1; // a blank line
            continue;
        }
        n += 1;
        match record(text, at, end) {
            Ok((record, next)) => {
                records.push(record);
                at = next;
            }
            Err(why) => {
                bad.push((n, why));
                at = next_start(text, end);
            }
        }
    }
}

/// The record whose first line is `text[at..end]`, and where the next one starts.
fn record(text: &[u8], at: usize, end: usize) -> Result<(Record, usize), String> {
    let meta: Meta = serde_json::from_slice(&text[at..end]).map_err(|e| e.to_string())?;
    if meta.v != VERSION {
        return Err(format!("format version {}", meta.v));
    }
    let lens = [
        meta.request_head,
        meta.response_head,
        meta.request_body.as_ref().map(|b| b.len),
        meta.response_body.as_ref().map(|b| b.len),
    ];
    let total = lens
        .iter()
        .flatten()
        .try_fold(0usize, |sum, len| sum.checked_add(*len))
        .ok_or("impossible section lengths")?;
    let mut from = end + 1;
    let last = from
        .checked_add(total)
        .filter(|&last| last < text.len() && text[last] == b'\n')
        .ok_or_else(|| format!("torn: its {total} bytes of heads and bodies are not all there"))?;
    let mut take = |len: Option<usize>| {
        let len = len?;
        let bytes = text[from..from + len].to_vec();
        from += len;
        Some(bytes)
    };
    let request_head = take(lens[0]);
    let response_head = take(lens[1]);
    let mut body = |meta: Option<BodyMeta>| {
        let meta = meta?;
        Some(Body {
            bytes: take(Some(meta.len))?,
            complete: meta.complete,
            masked: meta.masked,
            withheld: meta.withheld,
            short: meta.short.is_some(),
        })
    };
    let request_body = body(meta.request_body);
    let response_body = body(meta.response_body);
    let saved = meta.saved.into_owned();
    Ok((
        Record {
            saved,
            request_head,
            response_head,
            request_body,
            response_body,
        },
        last + 1,
    ))
}

/// Where the first record after `from` starts: the next line that starts with `{"v":`.
fn next_start(text: &[u8], from: usize) -> usize {
    static START: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n{\"v\":"));
    match START.find(&text[from..]) {
        Some(i) => from + i + 1,
        None => text.len(),
    }
}

/// A line of the first format: one JSON line per request, heads as `[name, value]` pairs, a body as
/// JSON or base64.
#[derive(Debug, Deserialize)]
struct LineV1<'a> {
    v: u32,
    #[serde(flatten)]
    saved: Saved<'a>,
    request_head: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    response_head: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    request_body: Option<BodyV1<'a>>,
    response_body: Option<BodyV1<'a>>,
}

#[derive(Debug, Deserialize)]
struct BodyV1<'a> {
    #[serde(default)]
    json: Option<Box<RawValue>>,
    #[serde(default)]
    b64: Option<Cow<'a, str>>,
    complete: bool,
    #[serde(default)]
    masked: bool,
    #[serde(default)]
    withheld: bool,
    #[serde(default)]
    short: Option<Cow<'a, str>>,
}

impl LineV1<'_> {
    fn into_record(self) -> Result<Record, String> {
        let head = |fields: Option<Vec<(Cow<str>, Cow<str>)>>| {
            fields.map(|fields| {
                let mut lines = Vec::new();
                for (name, value) in fields {
                    lines.extend_from_slice(name.as_bytes());
                    lines.push(b':');
                    lines.extend_from_slice(value.as_bytes());
                    lines.push(b'\n');
                }
                lines
            })
        };
        let body = |b: Option<BodyV1>| -> Result<Option<Body>, String> {
            let Some(b) = b else { return Ok(None) };
            let bytes = match (b.json, b.b64) {
                (Some(json), _) => json.get().as_bytes().to_vec(),
                (None, Some(b64)) => STANDARD.decode(&*b64).map_err(|e| e.to_string())?,
                (None, None) => Vec::new(),
            };
            Ok(Some(Body {
                bytes,
                complete: b.complete,
                masked: b.masked,
                withheld: b.withheld,
                short: b.short.is_some(),
            }))
        };
        Ok(Record {
            saved: self.saved.into_owned(),
            request_head: head(self.request_head),
            response_head: head(self.response_head),
            request_body: body(self.request_body)?,
            response_body: body(self.response_body)?,
        })
    }
}

/// Reads the lines of a file of the first format.
fn decode_v1(text: &[u8], records: &mut Vec<Record>, bad: &mut Vec<(usize, String)>) {
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        if raw.is_empty() {
            continue;
        }
        let record = serde_json::from_slice::<LineV1>(raw)
            .map_err(|e| e.to_string())
            .and_then(|line| match line.v {
                1 => line.into_record(),
                v => Err(format!("format version {v}")),
            });
        match record {
            Ok(record) => records.push(record),
            Err(why) => bad.push((i + 1, why)),
        }
    }
}

/// The capture: the sending end of the writer thread's channel.
#[derive(Debug)]
pub struct Capture {
    tx: SyncSender<Message>,
    /// The writer thread, until it is joined at close.
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Requests left out because [`QUEUE`] records were waiting.
    dropped: AtomicU64,
}

/// What the writer thread is sent.
#[derive(Debug)]
enum Message {
    /// A finished request to append.
    Record(Arc<Exchange>),
    /// Write out what is buffered and stop.
    Close,
}

impl Capture {
    /// Makes `dir` (0700) if needed, refuses one that others can enter, reads what it holds, opens a
    /// new file and starts the writer. Returns the records read, oldest first.
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
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("glance-shim-capture".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| fail(format!("cannot start its writer: {e}")))?;
        let capture = Capture {
            tx,
            thread: Mutex::new(Some(thread)),
            dropped: AtomicU64::new(0),
        };
        Ok((capture, loaded))
    }

    /// Hands a finished request to the writer, or counts it left out when too many wait.
    pub fn record(&self, e: &Arc<Exchange>) {
        match self.tx.try_send(Message::Record(e.clone())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.left_out(e),
            // The writer is gone: closed, or it could not go on (and said so).
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Has the writer write every record handed to it so far, and stop; returns once it has.
    pub fn close(&self) {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // Waits for room: what is queued before it is written first.
            let _ = self.tx.send(Message::Close);
            let _ = thread.join();
        }
    }

    /// Counts a request left out, and says so now and then.
    fn left_out(&self, e: &Exchange) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(
                id = %e.id,
                left_out = n,
                "the capture's writer is {QUEUE} requests behind (a slow or stalled disk): {n} \
                 requests left out of the capture so far (they are still in the log and the \
                 inspector)"
            );
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's end: appends records to the current file, starts a new one past its size,
/// and keeps the directory under its bound.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    max: u64,
    /// Bytes of each body written (`--capture-body`).
    body_max: usize,
    file: BufWriter<File>,
    path: PathBuf,
    /// Bytes written to the current file.
    written: u64,
    /// The last write failed (and said so): the next failure is not reported again.
    failing: bool,
}

impl Writer {
    fn new(dir: PathBuf, max: usize, body_max: usize) -> io::Result<Writer> {
        let (file, path) = new_file(&dir)?;
        Ok(Writer {
            dir,
            max: max as u64,
            body_max,
            file: BufWriter::with_capacity(BUFFER, file),
            path,
            written: 0,
            failing: false,
        })
    }

    /// Appends the records it is sent until it is closed (or every sender is gone), writing out its
    /// buffer whenever no record waits, and at least every [`FLUSH_WITHIN`] (a record may have
    /// waited [`GATHER_FOR`] before it was taken).
    fn run(mut self, rx: Receiver<Message>) {
        while let Ok(first) = rx.recv() {
            let flush_by = Instant::now() + FLUSH_WITHIN - GATHER_FOR;
            let mut next = Some(first);
            while let Some(message) = next {
                match message {
                    Message::Record(e) => self.append(&e),
                    Message::Close => return self.flush(),
                }
                if Instant::now() >= flush_by {
                    break;
                }
                next = rx.try_recv().ok();
            }
            self.flush();
            std::thread::sleep(GATHER_FOR);
        }
        self.flush();
    }

    fn append(&mut self, e: &Exchange) {
        let written = encode(e, self.body_max)
            .map_err(io::Error::other)
            .and_then(|record| {
                self.file.write_all(&record)?;
                Ok(record.len() as u64)
            });
        match written {
            Ok(n) => self.written += n,
            Err(error) => return self.failed(&error),
        }
        if self.written > file_max(self.max) {
            self.flush();
            if let Err(error) = self.next_file() {
                self.failed(&error);
            }
        }
    }

    fn flush(&mut self) {
        match self.file.flush() {
            Ok(()) => self.failing = false,
            Err(error) => self.failed(&error),
        }
    }

    /// Reports a failed write once, until a write succeeds again.
    fn failed(&mut self, error: &io::Error) {
        if !std::mem::replace(&mut self.failing, true) {
            warn!(
                file = %self.path.display(),
                error = %error,
                "cannot write the capture ({error}); requests are left out of it until it can be \
                 written again"
            );
        }
    }

    /// Starts a new file and removes the oldest.
    fn next_file(&mut self) -> io::Result<()> {
        let (file, path) = new_file(&self.dir)?;
        (self.file, self.path, self.written) = (BufWriter::with_capacity(BUFFER, file), path, 0);
        self.prune();
        Ok(())
    }

    fn prune(&self) {
        prune(&self.dir, self.max, &self.path);
    }
}

/// Removes the oldest files in `dir` until the others leave room for the current one to grow to
/// its size: the directory stays within `max`, give or take one record. Never the current one, nor
/// the file another running shim writes to (two shims on one directory would otherwise remove each
/// other's, and what they wrote after would be lost).
fn prune(dir: &Path, max: u64, current: &Path) {
    // One at a time: two that listed the same files would each remove the oldest.
    static ONE: Mutex<()> = Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
    let files = capture_files(dir);
    let mut total: u64 = files.iter().map(|(_, size)| size).sum();
    let room = max.saturating_sub(file_max(max));
    let written = written_by_others(&files);
    for (path, size) in &files {
        if total <= room {
            break;
        }
        if path == current || written.contains(&path) {
            continue;
        }
        if fs::remove_file(path).is_ok() {
            total -= size;
        }
    }
}

/// The files that other shims still running write to: each one's newest (a file is named
/// `capture-TIME-PID`). A process that took the number of one that has stopped keeps that shim's
/// last file from being removed while it runs: the directory can then exceed its bound by a file.
fn written_by_others(files: &[(PathBuf, u64)]) -> Vec<&PathBuf> {
    let mut newest: Vec<(i32, &PathBuf)> = Vec::new();
    // Oldest first, so the last seen of each is its newest.
    for (path, _) in files {
        let Some(pid) = writer_of(path) else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        match newest.iter_mut().find(|(p, _)| *p == pid) {
            Some(entry) => entry.1 = path,
            None => newest.push((pid, path)),
        }
    }
    newest
        .into_iter()
        .filter(|&(pid, _)| running(pid))
        .map(|(_, path)| path)
        .collect()
}

/// The process that wrote the capture file at `path` (named `capture-TIME-PID.rec`).
fn writer_of(path: &Path) -> Option<i32> {
    let stem = path.file_stem()?.to_str()?;
    stem.rsplit('-').next()?.parse().ok()
}

/// True while a process numbered `pid` exists.
fn running(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The size past which a new file is started.
fn file_max(max: u64) -> u64 {
    (max / 8).max(4096)
}

fn new_file(dir: &Path) -> io::Result<(File, PathBuf)> {
    let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let path = dir.join(format!(
        "capture-{stamp}-{}.{EXTENSION}",
        std::process::id()
    ));
    // Appended to: a file another program truncates is written on from its new end.
    let file = OpenOptions::new()
        .create_new(true)
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
            let ext = Path::new(&*name).extension().and_then(|x| x.to_str());
            name.starts_with("capture-") && matches!(ext, Some(EXTENSION | EXTENSION_V1))
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
    pub records: Vec<Record>,
    /// One for each file that could not be read whole, naming it.
    pub warnings: Vec<String>,
}

/// Reads every capture file in `dir`, oldest first. A record that does not parse (torn by a crash,
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
        let what = match path.extension().and_then(|x| x.to_str()) {
            Some(EXTENSION_V1) => {
                decode_v1(&text, &mut loaded.records, &mut bad);
                "line"
            }
            _ => {
                decode(&text, &mut loaded.records, &mut bad);
                "record"
            }
        };
        if let Some((n, why)) = bad.first() {
            loaded.warnings.push(format!(
                "{}: {} {what}{} could not be read ({what} {n}: {why}); the rest was read",
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
        records: read,
        mut warnings,
    } = load(dir);
    let budget = Budget::new(usize::MAX);
    let mut records = Vec::with_capacity(read.len());
    for (serial, record) in (0..).zip(read) {
        let id = record.saved.id.clone();
        match record.restore(serial, &mut |n| budget.try_charge(n)) {
            Ok(e) => records.push(Arc::new(e)),
            Err(why) => warnings.push(format!("{id}: cannot be read back: {why}")),
        }
    }
    (records, warnings)
}

/// Why the copy of a body read back stopped early.
const SHORT: &str = "the inspector's memory (--inspect-memory) was full when it was captured";
const WITHHELD: &str = "left out of the capture: it names a secret that could not be masked";

impl Record {
    /// The record this one was written from, under `serial`; `charge` pays for its copies (a copy
    /// it refuses is left out).
    pub fn restore(
        self,
        serial: u64,
        charge: &mut dyn FnMut(usize) -> Option<Charge>,
    ) -> Result<Exchange, String> {
        let mut head = |lines: Option<Vec<u8>>| {
            let lines = lines?;
            let paid = charge(lines.len())?;
            Some(Head::new(lines.into_boxed_slice(), paid))
        };
        let request_head = head(self.request_head);
        let response_head = head(self.response_head);
        let mut body = |b: Option<Body>| {
            let b = b?;
            let short = match (b.withheld, b.short) {
                (true, _) => Some(WITHHELD),
                (false, true) => Some(SHORT),
                (false, false) => None,
            };
            let paid = charge(b.bytes.capacity())?;
            Some(KeptBody::restored(
                b.bytes, b.complete, short, b.masked, paid,
            ))
        };
        let request_body = body(self.request_body);
        let response_body = body(self.response_body);
        let copies = Copies::new(request_head, false);
        if let Some(h) = response_head {
            let _ = copies.response_head.set(h);
        }
        if let Some(b) = request_body {
            copies.keep_request_body(b);
        }
        if let Some(b) = response_body {
            let _ = copies.response_body.set(b);
        }
        Exchange::restore(serial, self.saved, copies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};

    use crate::mask::MASKED;

    const TOKEN: &str = "gAAAAABtoken-value-of-a-test";
    const COOKIE: &str = "session=cookie-value-of-a-test";

    /// A budget for copies made in tests.
    fn budget() -> Arc<Budget> {
        Budget::new(usize::MAX)
    }

    fn head(budget: &Arc<Budget>, h: &HeaderMap) -> Head {
        let lines = crate::copies::lines_of(h);
        let charge = budget.try_charge(lines.len()).unwrap();
        Head::new(lines, charge)
    }

    fn body(budget: &Arc<Budget>, bytes: &[u8]) -> KeptBody {
        let charge = budget.try_charge(bytes.len()).unwrap();
        KeptBody::restored(bytes.to_vec(), true, None, false, charge)
    }

    /// A finished PATCH with a token, a JSON body with a password, and a binary response body that
    /// holds what looks like the start of a record.
    fn exchange(response: &[u8]) -> Exchange {
        let budget = budget();
        let mut h = HeaderMap::new();
        h.append("host", HeaderValue::from_static("controller"));
        h.append("x-auth-token", HeaderValue::from_static(TOKEN));
        h.append(
            "content-type",
            HeaderValue::from_static("application/openstack-images-v2.1-json-patch"),
        );
        let copies = Copies::new(Some(head(&budget, &h)), false);
        let request = format!(
            r#"[{{"op":"add","path":"/k","value":"v"}},{{"op":"add","path":"/db_password","value":"hunter2"}},{{"op":"add","path":"/echo","value":"{TOKEN}"}}]"#
        );
        copies.keep_request_body(body(&budget, request.as_bytes()));
        let mut h = HeaderMap::new();
        h.append(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        h.append("set-cookie", HeaderValue::from_static(COOKIE));
        let _ = copies.response_head.set(head(&budget, &h));
        let _ = copies.response_body.set(body(&budget, response));
        let mut headers = HeaderMap::new();
        Exchange::new(
            3,
            crate::correlation::assign(&mut headers),
            Method::PATCH,
            "/v2/images/abc".into(),
            crate::exchange::Client::new("127.0.0.1:5000".parse().unwrap()),
            copies,
        )
    }

    fn encoded(e: &Exchange, body_max: usize) -> Vec<u8> {
        encode(e, body_max).unwrap()
    }

    /// The first of `records` made a record of this process again.
    fn restore_first(records: Vec<Record>) -> Exchange {
        let first = records.into_iter().next().unwrap();
        let budget = budget();
        first.restore(9, &mut |n| budget.try_charge(n)).unwrap()
    }

    fn decoded(text: &[u8]) -> (Vec<Record>, Vec<(usize, String)>) {
        let (mut records, mut bad) = (Vec::new(), Vec::new());
        decode(text, &mut records, &mut bad);
        (records, bad)
    }

    #[test]
    fn a_record_reads_back_masked_and_byte_for_byte() {
        let response = b"\x00\xff\n{\"v\":2,\"id\":\"not a record\"}\nmore";
        let e = exchange(response);
        let text = encoded(&e, 1 << 20);
        assert!(memchr::memmem::find(&text, TOKEN.as_bytes()).is_none());
        assert!(memchr::memmem::find(&text, b"hunter2").is_none());
        assert!(memchr::memmem::find(&text, COOKIE.as_bytes()).is_none());

        let (records, bad) = decoded(&text);
        assert!(bad.is_empty(), "{bad:?}");
        let [r] = &records[..] else {
            panic!("{records:?}")
        };
        assert_eq!(r.saved, e.saved().into_owned());
        let request_head = String::from_utf8(r.request_head.clone().unwrap()).unwrap();
        assert_eq!(
            request_head,
            "host:controller\nx-auth-token:<masked>\n\
             content-type:application/openstack-images-v2.1-json-patch\n"
        );
        let response_head = String::from_utf8(r.response_head.clone().unwrap()).unwrap();
        assert_eq!(
            response_head,
            "content-type:application/octet-stream\nset-cookie:<masked>\n"
        );
        let request_body = r.request_body.as_ref().unwrap();
        assert!(request_body.masked && request_body.complete);
        let json: serde_json::Value = serde_json::from_slice(&request_body.bytes).unwrap();
        assert_eq!(json[0]["value"], "v");
        assert_eq!(json[1]["value"], MASKED);
        assert_eq!(json[2]["value"], MASKED);
        let response_body = r.response_body.as_ref().unwrap();
        assert_eq!(response_body.bytes, response);
        assert!(response_body.complete && !response_body.masked);

        // Read back as a record again, it shows the same heads and bodies.
        let restored = restore_first(records);
        assert!(restored.from_disk);
        assert_eq!(restored.copies.response_body.get().unwrap().bytes, response);
        assert_eq!(
            restored
                .copies
                .request_head
                .as_ref()
                .unwrap()
                .get("x-auth-token"),
            Some(MASKED.as_bytes())
        );
    }

    #[test]
    fn a_replaced_id_reads_back_as_replaced() {
        let mut headers = HeaderMap::new();
        headers.append("x-openstack-request-id", HeaderValue::from_static(""));
        let assigned = crate::correlation::assign(&mut headers);
        assert_eq!(assigned.from.as_str(), "replaced");
        let e = Exchange::new(
            4,
            assigned,
            Method::GET,
            "/v2/images".into(),
            crate::exchange::Client::new("127.0.0.1:5000".parse().unwrap()),
            Copies::new(None, true),
        );
        let (records, bad) = decoded(&encoded(&e, 1 << 20));
        assert!(bad.is_empty(), "{bad:?}");
        let restored = restore_first(records);
        assert_eq!(restored.id, e.id);
        assert_eq!(restored.id_from.as_str(), "replaced");
    }

    /// A capture to `dir` with the flags' defaults.
    fn defaults(dir: &Path) -> crate::config::Capture {
        crate::config::Capture {
            dir: dir.to_owned(),
            body: 64 << 10,
            max: 256 << 20,
            memory: 32 << 20,
        }
    }

    /// A temporary capture directory, made 0700 as the shim makes it.
    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("glance-shim-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn every_record_handed_to_the_writer_is_in_the_file_once_it_is_closed() {
        let dir = dir("close");
        let (capture, loaded) = Capture::open(&defaults(&dir)).unwrap();
        assert!(loaded.records.is_empty() && loaded.warnings.is_empty());
        assert_eq!(mode(&dir), 0o700);
        for _ in 0..300 {
            capture.record(&Arc::new(exchange(b"{}")));
        }
        capture.close();
        let files = capture_files(&dir);
        assert_eq!(files.len(), 1);
        assert_eq!(mode(&files[0].0), 0o600);
        let (records, bad) = decoded(&fs::read(&files[0].0).unwrap());
        assert_eq!((records.len(), bad.len()), (300, 0));
        // A start reads them back.
        let (capture, loaded) = Capture::open(&defaults(&dir)).unwrap();
        assert_eq!(loaded.records.len(), 300);
        drop(capture);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_rotate_past_an_eighth_of_the_bound_and_the_oldest_go() {
        let dir = dir("rotate");
        let config = crate::config::Capture {
            max: 64 << 10,
            ..defaults(&dir)
        };
        let (capture, _) = Capture::open(&config).unwrap();
        let record = exchange(&[7; 1000]);
        let size = encoded(&record, config.body).len() as u64;
        let record = Arc::new(record);
        for _ in 0..200 {
            capture.record(&record);
        }
        capture.close();
        let files = capture_files(&dir);
        let total: u64 = files.iter().map(|(_, n)| n).sum();
        assert!(files.len() > 2, "{files:?}");
        assert!(total <= 64 << 10, "{total} bytes in {files:?}");
        for (_, n) in &files {
            assert!(*n <= file_max(64 << 10) + size, "{files:?}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_queue_leaves_requests_out_and_counts_them() {
        // A writer that takes nothing: the queue fills, and what does not fit is counted.
        let (tx, _rx) = std::sync::mpsc::sync_channel(2);
        let capture = Capture {
            tx,
            thread: Mutex::new(None),
            dropped: AtomicU64::new(0),
        };
        let record = Arc::new(exchange(b"{}"));
        for _ in 0..5 {
            capture.record(&record);
        }
        assert_eq!(capture.dropped.load(Ordering::Relaxed), 3);
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pruning_spares_the_file_another_running_shim_writes_to() {
        let dir = std::env::temp_dir().join(format!("glance-shim-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let (alive, dead, me) = (
            std::os::unix::process::parent_id(),
            dead.id(),
            std::process::id(),
        );
        let names = [
            format!("capture-20261127T000001Z-{dead}.rec"),
            format!("capture-20261127T000002Z-{alive}.rec"),
            format!("capture-20261127T000003Z-{alive}.rec"),
            format!("capture-20261127T000004Z-{me}.rec"),
            format!("capture-20261127T000005Z-{me}.rec"),
        ];
        for name in &names {
            fs::write(dir.join(name), vec![b'x'; 1000]).unwrap();
        }
        // Room for nothing but the current file: everything else goes, but for the live one's newest.
        prune(&dir, 4096, &dir.join(&names[4]));
        let left: Vec<String> = capture_files(&dir)
            .into_iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [names[2].clone(), names[4].clone()]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_body_longer_than_capture_body_is_cut_and_marked() {
        let e = exchange(&[7; 100]);
        let (records, _) = decoded(&encoded(&e, 10));
        let body = records[0].response_body.as_ref().unwrap();
        assert_eq!(body.bytes, [7; 10]);
        assert!(!body.complete);
    }

    #[test]
    fn a_torn_or_corrupt_record_is_reported_and_the_rest_is_read() {
        let one = encoded(&exchange(b"one"), 1 << 20);
        let two = encoded(&exchange(b"two\n{\"v\":"), 1 << 20);
        let mut text = one.clone();
        text.extend_from_slice(b"{\"v\":2,\"id\":\"req-x\",\"garbage\n");
        text.extend_from_slice(&two);
        text.extend_from_slice(&one[..one.len() - 5]); // torn by a crash
        let (records, bad) = decoded(&text);
        let bodies: Vec<&[u8]> = records
            .iter()
            .map(|r| &r.response_body.as_ref().unwrap().bytes[..])
            .collect();
        assert_eq!(bodies, [&b"one"[..], b"two\n{\"v\":"]);
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert_eq!(bad[0].0, 2);
        assert!(bad[1].1.starts_with("torn"), "{bad:?}");

        // A file that was being written when the shim was killed ends in zeros.
        let mut killed = one.clone();
        killed.extend_from_slice(&[0; 5000]);
        let (records, bad) = decoded(&killed);
        assert_eq!((records.len(), bad.len()), (1, 0), "{bad:?}");

        // Section lengths past the end of the file.
        let (records, bad) = decoded(&one[..one.len() - 1]);
        assert!(records.is_empty());
        assert!(bad[0].1.starts_with("torn"), "{bad:?}");
    }

    #[test]
    fn lines_of_the_first_format_still_read() {
        let text = br#"{"v":1,"id":"req-1","id_from":"shim","method":"GET","target":"/","client":"127.0.0.1:1","arrived_at":"2026-11-26T00:00:00.000000Z","marks_us":[null,null,null,null,5],"bytes_in":0,"bytes_out":8,"status":200,"ended_in":"done","request_head":[["host","h"]],"response_head":[["content-type","application/json"]],"request_body":{"b64":"eyJhIjogMX0=","complete":true,"masked":false,"withheld":false,"short":null},"response_body":{"json":{"b": [1]},"complete":true}}
{"v":1,"torn
"#;
        let (mut records, mut bad) = (Vec::new(), Vec::new());
        decode_v1(text, &mut records, &mut bad);
        assert_eq!(bad.len(), 1);
        let r = &records[0];
        assert_eq!(r.request_head.as_deref(), Some(&b"host:h\n"[..]));
        assert_eq!(r.request_body.as_ref().unwrap().bytes, br#"{"a": 1}"#);
        assert_eq!(r.response_body.as_ref().unwrap().bytes, br#"{"b": [1]}"#);
    }
}
