//! Capture to disk (`--capture DIR`): every request, as it ends, appended to a file in DIR, so that
//! its history survives a restart of the shim. On start the inspector shows it again (marked as from
//! disk), and `glance-shim har DIR` turns it into a HAR file.
//!
//! - One record per request: a JSON line of the record's values ([`Meta`]: those of [`Saved`], and
//!   the length of each section that follows), then the sections' bytes as they were kept, then a
//!   newline. The sections are the request's head and the response's head (`name:value` lines,
//!   as the inspector keeps them) and the first `--capture-body` bytes of each body. Like WARC's
//!   records, the bytes go as they are: nothing to escape or encode, and `less` reads the heads.
//! - What is written is masked as the inspector masks it: secret header values, secret JSON fields,
//!   and bytes that name a secret which cannot be masked in them are left out. Token values are never
//!   written.
//! - Files are named `capture-<time>-<pid>.rec`: a new one at each start, and whenever the current
//!   one passes an eighth of `--capture-max`. While the directory holds more than `--capture-max`,
//!   its oldest files are removed. Files of the first format (`.jsonl`, a JSON line per request)
//!   are still read.
//! - Each record is written as its request ends, by the thread that ended it: one copy into a shared
//!   mapping of the file ([`crate::mapped`]), which puts it in the kernel's hands as a `write(2)`
//!   would, so a crash or SIGKILL of the shim loses at most the records being written. While one
//!   thread writes, records that end on others wait for it and go out in its next write (one thread
//!   writes at a time; nginx writes its access log the same way, from its event loop). A record
//!   whose bodies are large is built and written on tokio's blocking pool.
//!   Read back, a torn or corrupt record is reported with its file's name, and the rest is read.
//! - The directory is made 0700 and the files 0600; a directory others can enter is refused.

use std::borrow::Cow;
use std::cell::Cell;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::warn;

use crate::exchange::{Exchange, Saved};
use crate::headers::{MASKED, is_secret_name_bytes};
use crate::inspect::view;
use crate::kept::{Copies, Head, Keeper, KeptBody};
use crate::mapped::{self, AppendError, MappedFile};

/// Bytes of records that may wait while another thread writes; past this, records are left out of
/// the capture (and counted). One record is always let in.
const WAITING: usize = 8 << 20;

/// Bytes of bodies past which a record is built and written on tokio's blocking pool.
const INLINE: usize = 256 << 10;

/// The largest buffer a thread keeps for its next record.
const KEEP: usize = 1 << 20;

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

/// Writes the record of a finished request to `out`, with up to `body_max` bytes of each body;
/// `sections` is scratch space.
///
/// The heads are copied line by line as kept, secret values masked; the bodies as they are (or
/// masked, or left out: [`view::safe`]). Written as JSON lines, with each head's fields and values
/// escaped and each body checked to be JSON or encoded as base64, the same record took 35,000 more
/// instructions per small request (`bench/callgrind.sh`).
fn encode(e: &Exchange, body_max: usize, out: &mut Vec<u8>, sections: &mut Vec<u8>) {
    let c = &e.copies;
    sections.clear();
    // The secret values of both heads are found as they are copied, before the bodies need them.
    let mut secrets = Vec::new();
    let request_head = c.request_head.as_ref();
    let response_head = c.response_head.get();
    let request_head_len = put_head(request_head, sections, &mut secrets);
    let response_head_len = put_head(response_head, sections, &mut secrets);
    let mut body = |kept: Option<&KeptBody>, head: Option<&Head>| {
        let kept = kept?;
        let safe = if view::plain(kept, &secrets) {
            view::Safe::Bytes(&kept.bytes)
        } else {
            let content_type = head.and_then(|h| h.get("content-type"));
            let content_type = content_type.map(String::from_utf8_lossy);
            view::safe(content_type.as_deref(), kept, &secrets)
        };
        let (bytes, masked, withheld) = match safe {
            view::Safe::Bytes(b) => (Cow::Borrowed(b), false, false),
            view::Safe::Masked(b) => (Cow::Owned(b), true, false),
            view::Safe::Withheld => (Cow::Borrowed(&[][..]), false, true),
        };
        // The inspector may keep more of a body than the capture writes (--inspect-body), and a
        // masked body, re-serialised, can be longer than the bytes kept.
        let len = bytes.len().min(body_max);
        sections.extend_from_slice(&bytes[..len]);
        Some(BodyMeta {
            len,
            complete: kept.complete && !withheld && len == bytes.len(),
            masked: masked || kept.masked,
            withheld,
            short: kept.short.map(Cow::Borrowed),
        })
    };
    let request_body = body(c.request_body(), request_head);
    let response_body = body(c.response_body.get(), response_head);
    let meta = Meta {
        v: VERSION,
        saved: e.saved(),
        request_head: request_head_len,
        response_head: response_head_len,
        request_body,
        response_body,
    };
    write_meta(out, &meta);
    out.push(b'\n');
    out.extend_from_slice(sections);
    out.push(b'\n');
}

/// A member's name as [`Object`] writes it, `,"name":`, made when compiled: one copy per member.
/// (Written as four pushes, the names took 900 instructions per record.)
macro_rules! name {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

/// Writes `meta` as the JSON object that serde would write for it (`Meta`'s `Deserialize` reads it
/// back; a test holds the two to the same fields): names and numbers copied as they are, strings
/// escaped only when they need it. Through serde_json the same line took 5,900 of the capture's
/// 12,000 instructions per small request (`bench/callgrind.sh`).
fn write_meta(out: &mut Vec<u8>, meta: &Meta) {
    let mut o = Object::new(out);
    let s = &meta.saved;
    o.num(name!("v"), meta.v.into());
    o.str(name!("id"), &s.id);
    o.str(name!("id_from"), &s.id_from);
    o.str(name!("method"), &s.method);
    o.str(name!("target"), &s.target);
    o.str(name!("client"), &s.client);
    o.str(name!("arrived_at"), &s.arrived_at);
    o.key(name!("marks_us"));
    for (i, mark) in s.marks_us.iter().enumerate() {
        o.out.push(if i == 0 { b'[' } else { b',' });
        match mark {
            Some(us) => o
                .out
                .extend_from_slice(itoa::Buffer::new().format(*us).as_bytes()),
            None => o.out.extend_from_slice(b"null"),
        }
    }
    o.out.push(b']');
    o.num(name!("bytes_in"), s.bytes_in);
    o.num(name!("bytes_out"), s.bytes_out);
    o.opt_num(name!("status"), s.status.map(u64::from));
    o.opt_num(name!("upstream_status"), s.upstream_status.map(u64::from));
    o.opt_str(name!("upstream_id"), s.upstream_id.as_deref());
    o.opt_str(name!("outcome"), s.outcome.as_deref());
    o.str(name!("ended_in"), &s.ended_in);
    o.opt_str(name!("error"), s.error.as_deref());
    o.opt_str(name!("expect"), s.expect.as_deref());
    o.opt_num(name!("request_head"), meta.request_head.map(|n| n as u64));
    o.opt_num(name!("response_head"), meta.response_head.map(|n| n as u64));
    for (name, body) in [
        (name!("request_body"), &meta.request_body),
        (name!("response_body"), &meta.response_body),
    ] {
        let Some(b) = body else { continue };
        o.key(name);
        let mut inner = Object::new(o.out);
        inner.num(name!("len"), b.len as u64);
        inner.bool(name!("complete"), b.complete);
        if b.masked {
            inner.bool(name!("masked"), true);
        }
        if b.withheld {
            inner.bool(name!("withheld"), true);
        }
        inner.opt_str(name!("short"), b.short.as_deref());
        inner.end();
    }
    o.end();
}

/// A JSON object being written.
struct Object<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Object<'o> {
    fn new(out: &'o mut Vec<u8>) -> Object<'o> {
        out.push(b'{');
        Object { out, first: true }
    }

    /// A member's name from [`name!`] (never one that needs escaping), with the `,` before it
    /// left out for the first.
    fn key(&mut self, name: &[u8]) {
        let name = if self.first { &name[1..] } else { name };
        self.first = false;
        self.out.extend_from_slice(name);
    }

    fn num(&mut self, name: &[u8], n: u64) {
        self.key(name);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    fn opt_num(&mut self, name: &[u8], n: Option<u64>) {
        if let Some(n) = n {
            self.num(name, n);
        }
    }

    fn bool(&mut self, name: &[u8], b: bool) {
        self.key(name);
        self.out
            .extend_from_slice(if b { b"true" } else { b"false" });
    }

    fn str(&mut self, name: &[u8], value: &str) {
        self.key(name);
        // Ids, methods, targets, addresses and times are printable ASCII without quotes or
        // backslashes: copied as they are. Anything else is escaped by serde_json.
        // (Checked without stopping at the first, so that the compiler checks many bytes at once.)
        let escaped = value.bytes().fold(false, |any, b| {
            any | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
        });
        if !escaped {
            self.out.reserve(value.len() + 2);
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut *self.out, value);
        }
    }

    fn opt_str(&mut self, name: &[u8], value: Option<&str>) {
        if let Some(value) = value {
            self.str(name, value);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Copies `head`'s lines to `out`, secret values masked and added to `secrets`; returns the bytes
/// written.
fn put_head(head: Option<&Head>, out: &mut Vec<u8>, secrets: &mut Vec<String>) -> Option<usize> {
    let head = head?;
    let lines = head.lines();
    if !head.holds_secret() {
        // Most heads (every response, as a rule): one copy, and no line looked at.
        out.extend_from_slice(lines);
        return Some(lines.len());
    }
    let start = out.len();
    // Copied in runs between secret fields.
    let mut copied = 0;
    let mut at = 0;
    while at < lines.len() {
        let end = memchr::memchr(b'\n', &lines[at..]).map_or(lines.len(), |i| at + i);
        let line = &lines[at..end];
        let next = (end + 1).min(lines.len());
        if let Some(colon) = memchr::memchr(b':', line) {
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if is_secret_name_bytes(name) {
                out.extend_from_slice(&lines[copied..at]);
                view::secret_words(value, secrets);
                out.extend_from_slice(name);
                out.push(b':');
                out.extend_from_slice(MASKED.as_bytes());
                out.push(b'\n');
                copied = next;
            }
        }
        at = next;
    }
    out.extend_from_slice(&lines[copied..]);
    Some(out.len() - start)
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
    /// Writes to the file so far, and whether a task waits for them to stop to flush the file.
    writes: AtomicU64,
    flushing: AtomicBool,
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
    /// And for its sections, before they follow its first line.
    static SECTIONS: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
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
        let mut loaded = Loaded::default();
        recover(dir, &mut loaded.warnings);
        let read = load(dir);
        loaded.records = read.records;
        loaded.warnings.extend(read.warnings);
        let writer = Writer::new(dir.clone(), config.max).map_err(|e| fail(e.to_string()))?;
        writer.prune();
        let shared = Shared {
            body_max: config.body,
            state: Mutex::new(State {
                writer: Some(writer),
                waiting: Vec::new(),
            }),
            dropped: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
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

/// How long the capture is idle before the records of the segment being filled are written to
/// the file itself (they are in the ring beside it until then).
const IDLE: std::time::Duration = std::time::Duration::from_millis(5);

/// How long at most records stay only in the ring while requests keep ending.
const STALE: std::time::Duration = std::time::Duration::from_secs(1);

impl Shared {
    fn record(self: &Arc<Self>, e: &Exchange) {
        let mut line = LINE.take();
        let mut sections = SECTIONS.take();
        line.clear();
        encode(e, self.body_max, &mut line, &mut sections);
        if sections.capacity() <= KEEP {
            SECTIONS.set(sections);
        }
        if line.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(writer) = state.writer.take() else {
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
        let batch = self.write(writer, line, false);
        if batch.capacity() <= KEEP {
            LINE.set(batch);
        }
        self.writes.fetch_add(1, Ordering::Release);
        self.flush_when_idle();
    }

    /// Writes `batch` with `writer` (taken from the state), then what ended meanwhile, until
    /// nothing waits, flushing the file after each write if `flush`; puts the writer back. Returns
    /// the buffer.
    fn write(&self, mut writer: Writer, mut batch: Vec<u8>, flush: bool) -> Vec<u8> {
        loop {
            if !batch.is_empty() {
                writer.write(&batch);
                batch.clear();
            }
            if flush {
                writer.flush();
            }
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.waiting.is_empty() {
                state.writer = Some(writer);
                return batch;
            }
            std::mem::swap(&mut state.waiting, &mut batch);
        }
    }

    /// Has the file flushed once the capture has been idle for [`IDLE`], or at the latest after
    /// [`STALE`]: under load, the records go to the file a whole segment at a time; at a person's
    /// pace, each is in the file a few milliseconds after its request ends.
    fn flush_when_idle(self: &Arc<Self>) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.flushing.store(false, Ordering::Release);
            self.flush();
            return;
        };
        let shared = self.clone();
        runtime.spawn(async move {
            let mut seen = shared.writes.load(Ordering::Acquire);
            let stale = tokio::time::Instant::now() + STALE;
            while tokio::time::Instant::now() < stale {
                tokio::time::sleep(IDLE).await;
                let now = shared.writes.load(Ordering::Acquire);
                if now == seen {
                    break;
                }
                seen = now;
            }
            // A write after this schedules another flush.
            shared.flushing.store(false, Ordering::Release);
            shared.flush();
        });
    }

    /// Writes the segment being filled to the file, unless a thread is writing (it has a flush
    /// made after). The lock is not held meanwhile: records that end go on waiting for the writer.
    fn flush(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(writer) = state.writer.take() else {
            return;
        };
        drop(state);
        self.write(writer, Vec::new(), true);
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

/// Writes records to the current file, starts a new one past its size (or when someone else has
/// truncated it), and keeps the directory under its bound.
#[derive(Debug)]
struct Writer {
    dir: PathBuf,
    max: u64,
    file: MappedFile,
    path: PathBuf,
    /// The last write failed (and said so): the next failure is not reported again.
    failing: bool,
}

impl Writer {
    fn new(dir: PathBuf, max: usize) -> io::Result<Writer> {
        let max = max as u64;
        let (file, path) = new_file(&dir)?;
        Ok(Writer {
            dir,
            max,
            file,
            path,
            failing: false,
        })
    }

    /// Writes `records`; a failure is reported once, until a write succeeds again.
    fn write(&mut self, records: &[u8]) {
        match self.append(records) {
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

    fn flush(&mut self) {
        if let Err(error) = self.file.flush()
            && !self.failing
        {
            self.failing = true;
            warn!(
                file = %self.path.display(),
                error = %error,
                "cannot write the capture ({error}); requests are left out of it until it \
                 can be written again"
            );
        }
    }

    fn append(&mut self, records: &[u8]) -> io::Result<()> {
        match self.file.append(records) {
            Ok(()) => {}
            Err(AppendError::Truncated) => {
                warn!(
                    file = %self.path.display(),
                    "the capture file was truncated by another program while it was written; \
                     the requests being written are lost, and the next go to a new file"
                );
                self.next_file()?;
                return Ok(());
            }
            Err(AppendError::Io(e)) => return Err(e),
        }
        if self.file.len() > file_max(self.max) {
            self.next_file()?;
        }
        Ok(())
    }

    /// Starts a new file, and removes the oldest on tokio's blocking pool: removing a file of
    /// 32 MiB (an eighth of the default `--capture-max`) takes milliseconds, during which the
    /// thread that serves every connection would serve none.
    fn next_file(&mut self) -> io::Result<()> {
        // Closed first, so that two rings are never mapped at once (RSS).
        self.file.close();
        (self.file, self.path) = new_file(&self.dir)?;
        let (dir, max, current) = (self.dir.clone(), self.max, self.path.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || prune(&dir, max, &current))),
            Err(_) => prune(&dir, max, &current),
        }
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
            // The ring of a shim that stopped without closing the file.
            let _ = fs::remove_file(mapped::ring_path(path));
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

fn running(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Writes into their files the rings that shims which stopped without closing their files left
/// in `dir` (killed, or crashed), so the files hold every record; a ring that cannot be read is
/// named in `warnings`. Called before this shim makes its own file.
fn recover(dir: &Path, warnings: &mut Vec<String>) {
    let suffix = format!(".{EXTENSION}.ring");
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(file) = name
            .to_str()
            .filter(|name| name.starts_with("capture-"))
            .and_then(|name| name.strip_suffix(".ring"))
            .filter(|_| name.to_string_lossy().ends_with(&suffix))
        else {
            continue;
        };
        let file = dir.join(file);
        // A ring under this process's number is from an earlier one (a container's shim has the
        // same number at each start): this one has not made its own yet.
        if writer_of(&file).is_some_and(|pid| pid != std::process::id() as i32 && running(pid)) {
            continue;
        }
        if let Err(warning) = mapped::recover(&file) {
            warnings.push(warning);
        }
    }
}

/// The size past which a new file is started.
fn file_max(max: u64) -> u64 {
    (max / 8).max(4096)
}

fn new_file(dir: &Path) -> io::Result<(MappedFile, PathBuf)> {
    let stamp = humantime::format_rfc3339_micros(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let path = dir.join(format!(
        "capture-{stamp}-{}.{EXTENSION}",
        std::process::id()
    ));
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    let file = MappedFile::new(file, &path);
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
        let mut text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                loaded
                    .warnings
                    .push(format!("{}: cannot be read ({e}); skipped", path.display()));
                continue;
            }
        };
        let mut bad = Vec::new();
        let (what, first) = match path.extension().and_then(|x| x.to_str()) {
            Some(EXTENSION_V1) => {
                decode_v1(&text, &mut loaded.records, &mut bad);
                ("line", "line")
            }
            _ => {
                if let Err(warning) = mapped::overlay(&path, &mut text) {
                    loaded.warnings.push(warning);
                }
                decode(&text, &mut loaded.records, &mut bad);
                ("record", "record")
            }
        };
        if let Some((n, why)) = bad.first() {
            loaded.warnings.push(format!(
                "{}: {} {what}{} could not be read ({first} {n}: {why}); the rest was read",
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
    let keeper = Keeper::new(read.len(), usize::MAX, usize::MAX);
    let mut records = Vec::with_capacity(read.len());
    for (serial, record) in (0..).zip(read) {
        let id = record.saved.id.clone();
        match record.restore(serial, &keeper, &mut |_| {}) {
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
    /// The record this one was written from, under `serial`, its copies charged to `keeper`.
    pub fn restore(
        self,
        serial: u64,
        keeper: &Keeper,
        evicted: &mut dyn FnMut(&Exchange),
    ) -> Result<Exchange, String> {
        let body = |b: Option<Body>, evicted: &mut dyn FnMut(&Exchange)| {
            let b = b?;
            let short = match (b.withheld, b.short) {
                (true, _) => Some(WITHHELD),
                (false, true) => Some(SHORT),
                (false, false) => None,
            };
            keeper.restored_body(b.bytes, b.complete, short, b.masked, evicted)
        };
        let request_head = self
            .request_head
            .and_then(|lines| keeper.restored_head(lines, evicted));
        let copies = Copies::new(request_head, false);
        if let Some(h) = self
            .response_head
            .and_then(|lines| keeper.restored_head(lines, evicted))
        {
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
    use http::{HeaderMap, HeaderValue, Method};

    const TOKEN: &str = "gAAAAABtoken-value-of-a-test";
    const COOKIE: &str = "session=cookie-value-of-a-test";

    fn no_eviction(_: &Exchange) {}

    /// A finished PATCH with a token, a JSON body with a password, and a binary response body that
    /// holds what looks like the start of a record.
    fn exchange(keeper: &Keeper, response: &[u8]) -> Exchange {
        let mut h = HeaderMap::new();
        h.append("host", HeaderValue::from_static("controller"));
        h.append("x-auth-token", HeaderValue::from_static(TOKEN));
        h.append(
            "content-type",
            HeaderValue::from_static("application/openstack-images-v2.1-json-patch"),
        );
        let head = keeper.head(&h, &mut no_eviction);
        let copies = Copies::new(head, false);
        let body = format!(
            r#"[{{"op":"add","path":"/k","value":"v"}},{{"op":"add","path":"/db_password","value":"hunter2"}},{{"op":"add","path":"/echo","value":"{TOKEN}"}}]"#
        );
        copies.keep_request_body(
            keeper
                .restored_body(body.into_bytes(), true, None, false, &mut no_eviction)
                .unwrap(),
        );
        let mut h = HeaderMap::new();
        h.append(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        h.append("set-cookie", HeaderValue::from_static(COOKIE));
        let _ = copies
            .response_head
            .set(keeper.head(&h, &mut no_eviction).unwrap());
        let _ = copies.response_body.set(
            keeper
                .restored_body(response.to_vec(), true, None, false, &mut no_eviction)
                .unwrap(),
        );
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
        let mut out = Vec::new();
        encode(e, body_max, &mut out, &mut Vec::new());
        out
    }

    /// The first of `records` made a record of this process again.
    fn restore_first(records: Vec<Record>, keeper: &Keeper) -> Exchange {
        let first = records.into_iter().next().unwrap();
        first.restore(9, keeper, &mut no_eviction).unwrap()
    }

    fn decoded(text: &[u8]) -> (Vec<Record>, Vec<(usize, String)>) {
        let (mut records, mut bad) = (Vec::new(), Vec::new());
        decode(text, &mut records, &mut bad);
        (records, bad)
    }

    #[test]
    fn a_record_reads_back_masked_and_byte_for_byte() {
        let keeper = Keeper::new(10, 1 << 20, 1 << 20);
        let response = b"\x00\xff\n{\"v\":2,\"id\":\"not a record\"}\nmore";
        let e = exchange(&keeper, response);
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
        let restored = restore_first(records, &keeper);
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
    fn the_first_line_is_what_serde_writes_for_it() {
        let saved = |error: Option<&'static str>, target: &'static str| Saved {
            id: "req-1".into(),
            id_from: "client".into(),
            method: "PATCH".into(),
            target: target.into(),
            client: "127.0.0.1:5000".into(),
            arrived_at: "2026-11-26T00:00:00.000001Z".into(),
            marks_us: [Some(1), None, Some(300), Some(u64::MAX), Some(0)],
            bytes_in: 12,
            bytes_out: u64::MAX,
            status: Some(502),
            upstream_status: Some(500),
            upstream_id: Some("req-up".into()),
            outcome: Some("upstream_broke_off".into()),
            ended_in: "streaming".into(),
            error: error.map(Cow::Borrowed),
            expect: Some("relayed".into()),
        };
        let body = |masked, withheld, short: Option<&'static str>| BodyMeta {
            len: 802,
            complete: false,
            masked,
            withheld,
            short: short.map(Cow::Borrowed),
        };
        let metas = [
            Meta {
                v: VERSION,
                saved: saved(
                    Some("a \"quoted\" error\n\u{1} caf\u{e9}"),
                    "/v2/images?a=\\b",
                ),
                request_head: Some(119),
                response_head: Some(84),
                request_body: Some(body(true, false, Some("memory full"))),
                response_body: Some(body(false, true, None)),
            },
            Meta {
                v: VERSION,
                saved: Saved {
                    status: None,
                    upstream_status: None,
                    upstream_id: None,
                    outcome: None,
                    expect: None,
                    ..saved(None, "/")
                },
                request_head: None,
                response_head: None,
                request_body: None,
                response_body: None,
            },
        ];
        for meta in metas {
            let mut ours = Vec::new();
            write_meta(&mut ours, &meta);
            let serde = serde_json::to_vec(&meta).unwrap();
            assert_eq!(
                String::from_utf8(ours.clone()).unwrap(),
                String::from_utf8(serde).unwrap()
            );
            let back: Meta = serde_json::from_slice(&ours).unwrap();
            assert_eq!(back.saved, meta.saved);
        }
    }

    #[test]
    fn a_replaced_id_reads_back_as_replaced() {
        let keeper = Keeper::new(10, 1 << 20, 1 << 20);
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
        let restored = restore_first(records, &keeper);
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

    /// The records in the file at `path` alone, and with its ring.
    fn in_file_and_ring(path: &Path) -> (usize, usize) {
        let mut text = fs::read(path).unwrap();
        let alone = decoded(&text).0.len();
        mapped::overlay(path, &mut text).unwrap();
        (alone, decoded(&text).0.len())
    }

    /// Records go to the file when the capture is idle for a moment, and at the latest a second
    /// after they end while requests keep coming.
    #[tokio::test(start_paused = true)]
    async fn the_file_gets_the_records_when_idle_and_at_most_a_second_late() {
        let dir = std::env::temp_dir().join(format!("glance-shim-idle-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (capture, _) = Capture::open(&defaults(&dir)).unwrap();
        let path = capture_files(&dir).pop().unwrap().0;
        let keeper = Keeper::new(1000, 1 << 30, 1 << 30);
        let record = |n: usize| {
            for _ in 0..n {
                capture.record(&Arc::new(exchange(&keeper, b"{}")));
            }
        };
        record(3);
        assert_eq!(in_file_and_ring(&path), (0, 3), "in the ring first");
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(in_file_and_ring(&path), (3, 3), "in the file once idle");
        // A record every 2 ms for 0.8 s: never idle, and too little to fill a segment.
        for _ in 0..400 {
            record(1);
            tokio::time::sleep(IDLE / 2 - std::time::Duration::from_micros(500)).await;
        }
        assert_eq!(in_file_and_ring(&path), (3, 403), "still only in the ring");
        for _ in 0..150 {
            record(1);
            tokio::time::sleep(IDLE / 2 - std::time::Duration::from_micros(500)).await;
        }
        let (alone, all) = in_file_and_ring(&path);
        assert_eq!(all, 553);
        assert!(alone > 403, "in the file a second after: {alone}");
        drop(capture);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A shim killed under the number this process has now (as in a container, where the shim
    /// has the same number at each start) left records only in its ring: the start writes them
    /// into its file, and a ring that is not one is named.
    #[test]
    fn a_start_recovers_the_rings_of_killed_shims_even_under_its_own_number() {
        let dir = std::env::temp_dir().join(format!("glance-shim-recover-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let keeper = Keeper::new(10, 1 << 20, 1 << 20);
        let (mut killed, path) = new_file(&dir).unwrap();
        killed
            .append(&encoded(&exchange(&keeper, b"{}"), 1 << 20))
            .unwrap();
        killed.abandon();
        assert_eq!(in_file_and_ring(&path), (0, 1));
        let bad = dir.join("capture-20261127T000000Z-1.rec");
        fs::write(&bad, b"").unwrap();
        fs::write(mapped::ring_path(&bad), b"not a ring").unwrap();

        let (capture, loaded) = Capture::open(&defaults(&dir)).unwrap();
        assert_eq!(loaded.records.len(), 1);
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("capture-20261127T000000Z-1.rec.ring")),
            "{:?}",
            loaded.warnings
        );
        assert_eq!(decoded(&fs::read(&path).unwrap()).0.len(), 1);
        assert!(!mapped::ring_path(&path).exists());
        drop(capture);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pruning_spares_the_file_another_running_shim_writes_to() {
        let dir = std::env::temp_dir().join(format!("glance-shim-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let (alive, dead, me) = (
            unsafe { libc::getppid() } as u32,
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
        let keeper = Keeper::new(10, 1 << 20, 1 << 20);
        let e = exchange(&keeper, &[7; 100]);
        let (records, _) = decoded(&encoded(&e, 10));
        let body = records[0].response_body.as_ref().unwrap();
        assert_eq!(body.bytes, [7; 10]);
        assert!(!body.complete);
    }

    #[test]
    fn a_torn_or_corrupt_record_is_reported_and_the_rest_is_read() {
        let keeper = Keeper::new(10, 1 << 20, 1 << 20);
        let one = encoded(&exchange(&keeper, b"one"), 1 << 20);
        let two = encoded(&exchange(&keeper, b"two\n{\"v\":"), 1 << 20);
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
