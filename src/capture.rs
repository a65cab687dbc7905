//! Capture to disk (`--capture DIR`): every request, as it ends, appended to a file in DIR, so that
//! its history survives a restart of the shim. On start the inspector shows it again (marked as from
//! disk), and `glance-shim har DIR` turns it into a HAR file.
//!
//! - One JSON line per request ([`Line`]): the record's values ([`Saved`]) and its kept copies,
//!   masked as the inspector masks them: secret header values, secret JSON fields, and bytes that
//!   name a secret which cannot be masked in them are left out. Token values are never written.
//!   A JSON body is written as it is (`jq .response_body.json` reads it), any other as base64.
//! - Files are named `capture-<time>-<pid>.jsonl`: a new one at each start, and whenever the current
//!   one passes an eighth of `--capture-max`. While the directory holds more than `--capture-max`,
//!   its oldest files are removed.
//! - Each line is written as its request ends, by the thread that ended it: one `write(2)`, which
//!   puts it in the kernel's hands, so a crash or SIGKILL of the shim loses at most the lines being
//!   written. While one thread writes, lines that end on others wait for it and go out in its next
//!   write (one thread writes at a time; nginx writes its access log the same way, from its event
//!   loop). A line whose bodies are large is built and written on tokio's blocking pool. Read back,
//!   a torn or corrupt line is reported with its file's name, and the rest is read.
//! - The directory is made 0700 and the files 0600; a directory others can enter is refused.

use std::borrow::Cow;
use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::warn;

use crate::exchange::{Exchange, Saved};
use crate::inspect::view;
use crate::kept::{Copies, Head, Keeper, KeptBody};

/// Bytes of lines that may wait while another thread writes; past this, lines are left out of the
/// capture (and counted). One line is always let in.
const WAITING: usize = 8 << 20;

/// Bytes of bodies past which a line is built and written on tokio's blocking pool.
const INLINE: usize = 256 << 10;

/// The largest line buffer a thread keeps for its next line.
const KEEP: usize = 1 << 20;

/// The format's version, in every line.
const VERSION: u32 = 1;

/// Why the capture directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot capture to {} (--capture): {why}", dir.display())]
pub struct CaptureError {
    pub dir: PathBuf,
    pub why: String,
}

/// One request as written (borrowed from its record) or read back (owned): its values, and what
/// was kept of its heads and bodies.
#[derive(Debug, Serialize, Deserialize)]
pub struct Line<'a> {
    pub v: u32,
    #[serde(flatten)]
    pub saved: Saved<'a>,
    /// `[name, value]` pairs as they arrived, secret values masked.
    pub request_head: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    pub response_head: Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>,
    pub request_body: Option<BodyLine<'a>>,
    pub response_body: Option<BodyLine<'a>>,
}

/// What was kept of a body: a JSON body as it is (`json`, byte for byte), any other as `b64`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BodyLine<'a> {
    /// The bytes written, when they are one JSON value on one line, with nothing around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Cow<'a, RawValue>>,
    /// The bytes written, base64, when they are not `json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64: Option<Base64<'a>>,
    /// They are the whole body (as sent, unless `masked`).
    pub complete: bool,
    /// A JSON body whose secret values were masked before it was written.
    #[serde(default, skip_serializing_if = "is_false")]
    pub masked: bool,
    /// The kept bytes named a secret that could not be masked: none were written.
    #[serde(default, skip_serializing_if = "is_false")]
    pub withheld: bool,
    /// Why the copy stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short: Option<Cow<'a, str>>,
}

/// Bytes as a base64 JSON string, written as a raw JSON value: base64 has nothing to escape.
#[derive(Debug)]
pub struct Base64<'a>(pub Cow<'a, [u8]>);

impl Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut quoted = String::with_capacity(self.0.len().div_ceil(3) * 4 + 2);
        quoted.push('"');
        STANDARD.encode_string(&self.0, &mut quoted);
        quoted.push('"');
        serde_json::value::RawValue::from_string(quoted)
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Base64<'_> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        let bytes = STANDARD.decode(&*text).map_err(serde::de::Error::custom)?;
        Ok(Base64(Cow::Owned(bytes)))
    }
}

fn is_false(b: &bool) -> bool {
    !b
}

impl<'a> Line<'a> {
    /// The line for a finished request, with up to `body_max` bytes of each body.
    pub fn of(e: &'a Exchange, body_max: usize) -> Line<'a> {
        let c = &e.copies;
        let secrets = view::secret_values(e);
        let content_type = |h: Option<&'a Head>| {
            h.and_then(|h| h.get("content-type"))
                .map(|v| String::from_utf8_lossy(v))
        };
        let body = |head: Option<&'a Head>, kept: &'a KeptBody| {
            BodyLine::of(content_type(head).as_deref(), kept, body_max, &secrets)
        };
        Line {
            v: VERSION,
            saved: e.saved(),
            request_head: c.request_head.as_ref().map(view::fields),
            response_head: c.response_head.get().map(view::fields),
            request_body: c.request_body().map(|b| body(c.request_head.as_ref(), b)),
            response_body: c
                .response_body
                .get()
                .map(|b| body(c.response_head.get(), b)),
        }
    }
}

impl<'a> BodyLine<'a> {
    fn of(
        content_type: Option<&str>,
        kept: &'a KeptBody,
        max: usize,
        secrets: &[String],
    ) -> BodyLine<'a> {
        // The inspector may keep more of a body than the capture writes (--inspect-body).
        let cut = kept.bytes.len() > max;
        let (bytes, masked, withheld) = match view::safe(content_type, kept, secrets) {
            view::Safe::Bytes(b) => (Cow::Borrowed(&b[..b.len().min(max)]), false, false),
            view::Safe::Masked(b) => (Cow::Owned(b), true, false),
            view::Safe::Withheld => (Cow::Borrowed(&[][..]), false, true),
        };
        // As JSON, the body is copied as it is; as base64 it is encoded, and as an escaped string
        // it was 17,000 of the 99,000 instructions per small request (`bench/callgrind.sh`).
        let (json, b64) = match bytes {
            Cow::Borrowed(b) => match json_value(b) {
                Some(raw) => (Some(Cow::Borrowed(raw)), None),
                None => (None, Some(Base64(Cow::Borrowed(b)))),
            },
            Cow::Owned(b) => match json_value(&b) {
                Some(raw) => (Some(Cow::Owned(raw.to_owned())), None),
                None => (None, Some(Base64(Cow::Owned(b)))),
            },
        };
        BodyLine {
            json,
            b64,
            complete: kept.complete && !withheld && !cut,
            masked: masked || kept.masked,
            withheld,
            short: kept.short.map(Cow::Borrowed),
        }
    }

    /// The bytes written (empty for a body whose bytes were withheld).
    fn into_bytes(self) -> Vec<u8> {
        match (self.json, self.b64) {
            (Some(json), _) => json.get().as_bytes().to_vec(),
            (None, Some(b64)) => b64.0.into_owned(),
            (None, None) => Vec::new(),
        }
    }
}

/// `bytes` as one JSON value that a line can hold as it is: valid, on one line, and with nothing
/// around it (so that it reads back byte for byte).
fn json_value(bytes: &[u8]) -> Option<&RawValue> {
    if !matches!(bytes.first(), Some(b'{' | b'[')) || memchr::memchr(b'\n', bytes).is_some() {
        return None;
    }
    let raw: &RawValue = serde_json::from_slice(bytes).ok()?;
    (raw.get().len() == bytes.len()).then_some(raw)
}

/// The capture: each finished request's line, written by the thread that finished it (or, while
/// another thread is writing, by that one right after).
#[derive(Debug, Clone)]
pub struct Capture {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes of each body written (`--capture-body`).
    body_max: usize,
    state: Mutex<State>,
    /// Lines left out because [`WAITING`] bytes were waiting.
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// The file; `None` while a thread is writing to it.
    writer: Option<Writer>,
    /// Lines that ended while a thread was writing: it writes them next, in one write.
    waiting: Vec<u8>,
}

thread_local! {
    /// Each thread's buffer for the line it builds, kept warm between requests.
    static LINE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl Capture {
    /// Makes `dir` (0700) if needed, refuses one that others can enter, reads what it holds, and
    /// opens a new file. Returns the lines read, oldest first.
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
        let writer = Writer::new(dir.clone(), config.max).map_err(|e| fail(e.to_string()))?;
        writer.prune();
        let shared = Shared {
            body_max: config.body,
            state: Mutex::new(State {
                writer: Some(writer),
                waiting: Vec::new(),
            }),
            dropped: AtomicU64::new(0),
        };
        Ok((
            Capture {
                shared: Arc::new(shared),
            },
            loaded,
        ))
    }

    /// Writes a finished request's line. A line with more than [`INLINE`] bytes of bodies is built
    /// and written on tokio's blocking pool, not on the thread serving requests.
    pub fn record(&self, e: &Arc<Exchange>) {
        let c = &e.copies;
        let bodies = c.request_body().map_or(0, |b| b.bytes.len())
            + c.response_body.get().map_or(0, |b| b.bytes.len());
        if bodies.min(self.shared.body_max * 2) > INLINE
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (shared, e) = (self.shared.clone(), e.clone());
            runtime.spawn_blocking(move || shared.record(&e));
        } else {
            self.shared.record(e);
        }
    }
}

impl Shared {
    fn record(&self, e: &Exchange) {
        let mut line = LINE.take();
        line.clear();
        if serde_json::to_writer(&mut line, &Line::of(e, self.body_max)).is_err() {
            return;
        }
        line.push(b'\n');
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut writer) = state.writer.take() else {
            // Another thread is writing: it writes this line too, as soon as it is done.
            if state.waiting.is_empty() || state.waiting.len() + line.len() <= WAITING {
                state.waiting.extend_from_slice(&line);
            } else {
                drop(state);
                self.left_out(e);
            }
            LINE.set(line);
            return;
        };
        drop(state);
        // This thread writes its line, then what ended meanwhile, until nothing waits.
        let mut batch = line;
        loop {
            writer.write(&batch);
            batch.clear();
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.waiting.is_empty() {
                state.writer = Some(writer);
                break;
            }
            std::mem::swap(&mut state.waiting, &mut batch);
        }
        if batch.capacity() <= KEEP {
            LINE.set(batch);
        }
    }

    /// Counts a line left out, and says so now and then.
    fn left_out(&self, e: &Exchange) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(
                id = e.id.as_str(),
                left_out = n,
                "the capture's disk is more than {} behind: {n} requests left out of the capture so \
                 far (they are still in the log and the inspector)",
                bytesize::ByteSize(WAITING as u64).display().iec()
            );
        }
    }
}

/// Writes lines to the current file, starts a new one past its size, and keeps the directory under
/// its bound.
///
/// Lines are written with `write(2)`, not copied into a shared mapping of the file: a mapping cost
/// about 2 us less per small request (`bench/cost.sh`), but the shim would die of SIGBUS if anyone
/// truncated the file it is writing (`truncate -s 0`, to clear a capture).
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    max: u64,
    file: File,
    path: PathBuf,
    written: u64,
    /// The last write failed (and said so): the next failure is not reported again.
    failing: bool,
}

impl Writer {
    fn new(dir: PathBuf, max: usize) -> io::Result<Writer> {
        let (file, path) = new_file(&dir)?;
        Ok(Writer {
            dir,
            max: max as u64,
            file,
            path,
            written: 0,
            failing: false,
        })
    }

    /// Writes `lines`; a failure is reported once, until a write succeeds again.
    fn write(&mut self, lines: &[u8]) {
        match self.append(lines) {
            Ok(()) => self.failing = false,
            Err(error) if !self.failing => {
                self.failing = true;
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

    fn append(&mut self, lines: &[u8]) -> io::Result<()> {
        self.file.write_all(lines)?;
        self.written += lines.len() as u64;
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
    pub lines: Vec<Line<'static>>,
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

impl Line<'_> {
    /// The record this line was written from, under `serial`, its copies charged to `keeper`.
    pub fn restore(
        self,
        serial: u64,
        keeper: &Keeper,
        evicted: &mut dyn FnMut(&Exchange),
    ) -> Result<Exchange, String> {
        type Fields<'a> = Option<Vec<(Cow<'a, str>, Cow<'a, str>)>>;
        let head = |fields: Fields, evicted: &mut dyn FnMut(&Exchange)| {
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
            let short = match (b.withheld, &b.short) {
                (true, _) => Some(WITHHELD),
                (false, Some(_)) => Some(SHORT),
                (false, None) => None,
            };
            let (complete, masked) = (b.complete, b.masked);
            keeper.restored_body(b.into_bytes(), complete, short, masked, evicted)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(bytes: &[u8]) -> String {
        let keeper = Keeper::new(1, usize::MAX, usize::MAX);
        let kept = keeper
            .restored_body(bytes.to_vec(), true, None, false, &mut |_| {})
            .unwrap();
        let line = BodyLine::of(Some("application/json"), &kept, usize::MAX, &[]);
        serde_json::to_string(&line).unwrap()
    }

    fn read_back(text: &str) -> Vec<u8> {
        serde_json::from_str::<BodyLine>(text).unwrap().into_bytes()
    }

    #[test]
    fn a_json_body_is_written_as_it_is_and_reads_back_byte_for_byte() {
        let body = br#"{"name": "cirros", "tags": ["a\"b", "\u00e9"], "size": 1.50}"#;
        let text = line_of(body);
        assert!(text.starts_with(r#"{"json":{"name": "cirros""#), "{text}");
        assert_eq!(read_back(&text), body);
    }

    #[test]
    fn bytes_that_are_not_one_json_value_on_one_line_go_as_base64() {
        for body in [
            &b" {\"a\": 1}"[..],
            b"{\"a\": 1}\n",
            b"{\n\"a\": 1}",
            b"{\"a\": ",
            b"\"a string\"",
            b"not json",
            b"\x00\xff\xfe",
            b"",
        ] {
            let text = line_of(body);
            assert!(text.starts_with(r#"{"b64":""#), "{text}");
            assert_eq!(read_back(&text), body, "{text}");
        }
    }

    #[test]
    fn a_line_of_the_first_format_still_reads() {
        let old = r#"{"b64":"eyJhIjogMX0=","complete":true,"masked":false,"withheld":false,"short":null}"#;
        assert_eq!(read_back(old), br#"{"a": 1}"#);
    }
}
