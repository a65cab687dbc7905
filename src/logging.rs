//! Where log lines go and what they look like: tracing-subscriber's fmt layer with our
//! [`LineFormat`], as readable text (colour only on a terminal) or one flat JSON object per line,
//! filtered `RUST_LOG`-style, written by tracing-appender's background thread to stderr or a file.
//!
//! The writer thread is what keeps a stalled terminal (a paused `less`, a full pipe) from stalling the
//! proxy: the runtime thread only hands it lines. It is lossless: no line is ever dropped; past
//! [`QUEUED_BATCHES`] waiting batches the proxy waits for the writer instead.
//!
//! Lines are handed over a millisecond's worth at a time (`Batch`), not one by one: waking the
//! writer thread for every line cost 16% of small-request req/s and a third more CPU per request
//! (35.0 against 26.4 us; median of 6 interleaved pairs of 5 s `bench/cost.sh` runs, 2026-11-26) on a
//! 2-core machine shared with the client and glance. A line is out a millisecond after it was
//! logged, or sooner when 64 KiB have gathered: when a breakpoint holds a request, its arrival line
//! is already in the log.
//!
//! What each line says is decided where it is written (`exchange` for a request's lines, `server`,
//! `upstream`).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Batches that may wait for the writer thread (a paused terminal) before the proxy waits with them:
/// the lines of at least 2048 requests. tracing-appender allocates its queue whole at start-up (32
/// bytes a slot), so its default of 128,000 would add 4 MiB to the shim's resident memory.
pub const QUEUED_BATCHES: usize = 4096;

/// A batch goes to the writer thread once it holds this much...
const BATCH_BYTES: usize = 64 * 1024;
/// ...and in any case this long after its first line.
const BATCH_DELAY: Duration = Duration::from_millis(1);

/// Why the log cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("--log-file {}: {error}", path.display())]
pub struct LogFileError {
    path: PathBuf,
    error: io::Error,
}

/// The running log: dropping it writes out every line logged so far and stops the writer thread.
pub struct Log {
    batch: Arc<Batch>,
    _writer_thread: WorkerGuard,
}

impl Log {
    /// Hands each batch over a millisecond after its first line; the runtime must run it.
    pub fn flusher(&self) -> impl Future<Output = ()> + 'static {
        self.batch.clone().flusher()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.batch.hand_over();
    }
}

/// The lines logged since the last hand-over to the writer thread.
struct Batch {
    lines: Mutex<Vec<u8>>,
    writer: Mutex<Box<dyn Write + Send>>,
    /// Woken when a line lands in an empty batch; see [`Batch::flusher`].
    first_line: Notify,
}

impl Batch {
    fn new(writer: Box<dyn Write + Send>) -> Arc<Batch> {
        Arc::new(Batch {
            lines: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
            writer: Mutex::new(writer),
            first_line: Notify::new(),
        })
    }

    fn lines(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a formatted line; a full batch is handed over at once, the first line of one wakes the
    /// flusher.
    fn push(&self, line: &[u8]) {
        let mut lines = self.lines();
        let first = lines.is_empty();
        lines.extend_from_slice(line);
        let full = lines.len() >= BATCH_BYTES;
        drop(lines);
        if full {
            self.hand_over();
        } else if first {
            self.first_line.notify_one();
        }
    }

    /// Hands every line gathered so far to the writer, in one piece.
    fn hand_over(&self) {
        let lines = std::mem::replace(&mut *self.lines(), Vec::with_capacity(BATCH_BYTES));
        if !lines.is_empty() {
            let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            // A log that cannot be written (disk full, closed stderr) must not stop the proxy.
            let _ = writer.write_all(&lines);
        }
    }

    async fn flusher(self: Arc<Self>) {
        loop {
            self.first_line.notified().await;
            tokio::time::sleep(BATCH_DELAY).await;
            self.hand_over();
        }
    }
}

/// What the formatting layer writes each line into: the current batch.
#[derive(Clone)]
struct BatchWriter(Arc<Batch>);

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs the global subscriber. Fails only when `--log-file` cannot be opened for appending.
pub fn init(config: &Config) -> Result<Log, LogFileError> {
    let (sink, colour): (Box<dyn Write + Send>, bool) = match &config.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| LogFileError {
                    path: path.clone(),
                    error,
                })?;
            (Box::new(file), false)
        }
        None => {
            let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            (Box::new(io::stderr()), colour)
        }
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_BATCHES)
        .thread_name("glance-shim-log")
        .finish(sink);
    let batch = Batch::new(Box::new(writer));
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let lines = BatchWriter(batch.clone());
    tracing_subscriber::registry()
        .with(layer(config.log_format, colour, move || lines.clone()).with_filter(filter))
        .init();
    Ok(Log {
        batch,
        _writer_thread: guard,
    })
}

/// The formatting layer: `TIMESTAMP LEVEL message key=value ...`, or a flat JSON object with
/// `timestamp`, `level`, `message` and the event's fields.
pub fn layer<S, W>(format: LogFormat, colour: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .event_format(LineFormat {
            json: format == LogFormat::Json,
            colour,
        })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// The line format

/// One event as one line: `TIMESTAMP LEVEL message key=value ...`, or a flat JSON object with
/// `timestamp`, `level`, `message` and the event's fields.
///
/// Written here rather than left to tracing-subscriber's `Format` (text) and `Json`, which write the
/// same lines: those cost 9% of small-request req/s (median of 6 interleaved pairs of 5 s runs,
/// bench/cost.sh, 2026-11-26: 34,636 against 37,395 req/s) and 2.5 us of CPU per request (26.4
/// against 23.9), or 16,800 instructions (bench/callgrind.sh: 69,773 against 52,964). It caches the
/// date, writes numbers without `fmt` and escapes JSON by hand; tracing-subscriber's fmt layer still
/// does the rest (filtering, the per-line buffer, the writer).
#[derive(Clone, Copy, Debug)]
pub struct LineFormat {
    pub json: bool,
    pub colour: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Formatting into a plain String and handing it over in one piece is cheaper than many small
        // writes through the `dyn Write` the subscriber passes in.
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            self.format(
                &mut line,
                SystemTime::now(),
                event.metadata().level(),
                |v| event.record(v),
            )?;
            w.write_str(&line)
        })
    }
}

impl LineFormat {
    /// Formats one line into `out`; `record` feeds the event's fields to a visitor. Separate from
    /// tracing's types so the exact output can be tested.
    ///
    /// tracing's macros record the message first, so one pass writes it right after the level.
    pub fn format(
        &self,
        out: &mut String,
        now: SystemTime,
        level: &Level,
        record: impl Fn(&mut dyn Visit),
    ) -> fmt::Result {
        let mut line = Line {
            out,
            first: true,
            result: Ok(()),
        };
        if self.json {
            line.out.write_str("{\"timestamp\":\"")?;
            timestamp(line.out, now)?;
            line.out.write_str("\",\"level\":\"")?;
            line.out.write_str(level.as_str())?;
            line.out.write_char('"')?;
            record(&mut Json(&mut line));
            line.result?;
            line.out.write_str("}\n")
        } else {
            timestamp(line.out, now)?;
            let colour = match *level {
                _ if !self.colour => None,
                Level::ERROR => Some("\x1b[31m"),
                Level::WARN => Some("\x1b[33m"),
                Level::INFO => Some("\x1b[32m"),
                _ => Some("\x1b[2m"),
            };
            line.out.write_char(' ')?;
            if let Some(c) = colour {
                line.out.write_str(c)?;
            }
            line.out.write_str(match *level {
                Level::ERROR => "ERROR",
                Level::WARN => " WARN",
                Level::INFO => " INFO",
                Level::DEBUG => "DEBUG",
                Level::TRACE => "TRACE",
            })?;
            if colour.is_some() {
                line.out.write_str("\x1b[0m")?;
            }
            record(&mut Text(&mut line));
            line.result?;
            line.out.write_char('\n')
        }
    }
}

/// The line being written, and the first write error (a `Visit` cannot return one).
struct Line<'a> {
    out: &'a mut String,
    first: bool,
    result: fmt::Result,
}

impl Line<'_> {
    fn put(&mut self, s: &str) {
        if self.result.is_ok() {
            self.result = self.out.write_str(s);
        }
    }

    fn put_fmt(&mut self, args: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.out.write_fmt(args);
        }
    }
}

/// `message key=value ...`; strings with spaces, quotes or nothing in them are quoted.
struct Text<'l, 'a>(&'l mut Line<'a>);

impl Text<'_, '_> {
    /// Writes the separator and key; false for the message, which is written bare.
    fn key(&mut self, field: &Field) -> bool {
        let first = std::mem::replace(&mut self.0.first, false);
        self.0.put(" ");
        if field.name() == "message" && first {
            return false;
        }
        self.0.put(field.name());
        self.0.put("=");
        true
    }
}

impl Visit for Text<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field)
            && (value.is_empty() || any_byte(value.as_bytes(), |b| b <= b' ' || b == b'"'))
        {
            self.0.put_fmt(format_args!("{value:?}"));
        } else {
            self.0.put(value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let mut buf = Digits::default();
        self.0.put(buf.u64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.0.put_fmt(format_args!("{value}"));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        let mut buf = Digits::default();
        match buf.tenths(value) {
            Some(s) => self.0.put(s),
            None => self.0.put_fmt(format_args!("{value}")),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.0.put(if value { "true" } else { "false" });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.0.put_fmt(format_args!("{value:?}"));
    }
}

/// `,"key":value` pairs: numbers and booleans as JSON numbers and booleans, everything else a string.
struct Json<'l, 'a>(&'l mut Line<'a>);

impl Json<'_, '_> {
    fn key(&mut self, field: &Field) {
        self.0.put(",\"");
        self.0.put(field.name());
        self.0.put("\":");
    }

    fn string(&mut self, value: &str) {
        if self.0.result.is_ok() {
            self.0.result = json_str(self.0.out, value);
        }
    }
}

impl Visit for Json<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.string(value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let mut buf = Digits::default();
        self.0.put(buf.u64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.0.put_fmt(format_args!("{value}"));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        let mut buf = Digits::default();
        match buf.tenths(value) {
            Some(s) => self.0.put(s),
            None if value.is_finite() => self.0.put_fmt(format_args!("{value}")),
            None => self.0.put("null"),
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.0.put(if value { "true" } else { "false" });
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        let text = format!("{value:?}");
        self.string(&text);
    }
}

/// Numbers written without going through `fmt` (five per completion line).
#[derive(Default)]
struct Digits {
    buf: [u8; 24],
}

impl Digits {
    fn u64(&mut self, mut v: u64) -> &str {
        let mut i = self.buf.len();
        loop {
            i -= 1;
            self.buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.buf[i..]).unwrap_or("0")
    }

    /// A non-negative float with at most one decimal (the durations logged are rounded so), or
    /// `None` for anything else.
    fn tenths(&mut self, v: f64) -> Option<&str> {
        let tenths = (v * 10.0).round();
        if !(v >= 0.0 && tenths < 1e15 && (tenths - v * 10.0).abs() < 1e-6) {
            return None;
        }
        let tenths = tenths as u64;
        let decimal = (tenths % 10) as u8;
        let len = self.buf.len();
        let end = if decimal == 0 {
            len
        } else {
            self.buf[len - 2] = b'.';
            self.buf[len - 1] = b'0' + decimal;
            len - 2
        };
        let mut v = tenths / 10;
        let mut i = end;
        loop {
            i -= 1;
            self.buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.buf[i..]).ok()
    }
}

/// `2026-11-25T16:14:16.137017Z`. The date and time up to the second are formatted once per second.
fn timestamp(out: &mut dyn fmt::Write, now: SystemTime) -> fmt::Result {
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            let s = secs % 86_400;
            cache.1.clear();
            let _ = write!(
                cache.1,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
                s / 3600,
                s / 60 % 60,
                s % 60
            );
            cache.0 = secs;
        }
        out.write_str(&cache.1)
    })?;
    let micros = since.subsec_micros();
    let mut frac = *b".000000Z";
    for (i, shift) in [100_000, 10_000, 1_000, 100, 10, 1].into_iter().enumerate() {
        frac[i + 1] = b'0' + (micros / shift % 10) as u8;
    }
    out.write_str(std::str::from_utf8(&frac).unwrap_or(".000000Z"))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// True when some byte of `bytes` satisfies `special`, which must hold for no byte of 0x21..=0x7e
/// other than `"` and `\\`. Eight bytes at a time: log values are ids and paths that need no quoting or
/// escaping, and this check runs for every field of every line.
fn any_byte(bytes: &[u8], special: impl Fn(u8) -> bool) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` equal to `b` makes the corresponding byte of the result have its top bit set.
    let eq = |x: u64, b: u8| {
        let y = x ^ (ONES * u64::from(b));
        y.wrapping_sub(ONES) & !y & HIGH
    };
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        // Some byte below 0x21 (control or space), 0x7f and above, a quote or a backslash: look
        // closer. Plain printable ASCII, the usual case, passes on these tests alone.
        let low = x.wrapping_sub(ONES * 0x21) & !x & HIGH;
        let high = (x.wrapping_add(ONES) | x) & HIGH;
        if (low | high | eq(x, b'"') | eq(x, b'\\')) != 0 && chunk.iter().any(|&b| special(b)) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| special(b))
}

fn json_special(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f
}

/// Writes `s` as a JSON string literal (RFC 8259 escaping).
pub fn json_str(out: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    if !any_byte(s.as_bytes(), json_special) {
        out.write_str(s)?;
        return out.write_char('"');
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f | 0x7f => "",
            _ => continue,
        };
        out.write_str(&s[start..i])?;
        if escape.is_empty() {
            write!(out, "\\u{b:04x}")?;
        } else {
            out.write_str(escape)?;
        }
        start = i + 1;
    }
    out.write_str(&s[start..])?;
    out.write_char('"')
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Emits events through the production layer into a string.
    fn capture(format: LogFormat, emit: impl FnOnce()) -> String {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber =
            tracing_subscriber::registry().with(layer(format, false, move || sink.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_str(&mut out, "a\"b\\c\nd\u{1}e\u{7f}é").unwrap();
        assert_eq!(out, r#""a\"b\\c\nd\u0001e\u007fé""#);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}e\u{7f}é");
    }

    #[test]
    fn numbers() {
        for (v, want) in [
            (0.0, Some("0")),
            (1201.7, Some("1201.7")),
            (3.0, Some("3")),
            (0.1, Some("0.1")),
            (2.25, None),
            (-1.5, None),
            (f64::NAN, None),
        ] {
            assert_eq!(Digits::default().tenths(v), want, "{v}");
        }
        for v in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(Digits::default().u64(v), v.to_string());
        }
    }

    #[test]
    fn byte_scan_matches_the_plain_loop() {
        let text = |b: u8| b <= b' ' || b == b'"';
        let samples: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"req-0f8a6b2c-1d3e-4f5a-8b7c-9d0e1f2a3b4c".to_vec(),
            b"/v2/images?limit=20&sort_key=name".to_vec(),
            b"/v2/images/abc def".to_vec(),
            b"quote\"here-and-more-bytes".to_vec(),
            b"back\\slash/long/enough/path".to_vec(),
            "caf\u{e9}-t\u{e9}l\u{e9}phone-xxxxxxxx".as_bytes().to_vec(),
            b"tab\there-xxxxxxxxxxxxxxxx".to_vec(),
            b"del\x7f-xxxxxxxxxxxxxxxxxxx".to_vec(),
        ];
        for s in &samples {
            for start in 0..s.len().min(9) {
                let s = &s[start..];
                assert_eq!(any_byte(s, text), s.iter().any(|&b| text(b)), "{s:?}");
                assert_eq!(
                    any_byte(s, json_special),
                    s.iter().any(|&b| json_special(b)),
                    "{s:?}"
                );
            }
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_710_856_137_017);
        let mut out = String::new();
        timestamp(&mut out, t).unwrap();
        assert_eq!(out, "2026-11-26T16:34:16.137017Z");
        // The cached second is reused, the micros are not.
        let mut out = String::new();
        timestamp(&mut out, t + Duration::from_micros(5)).unwrap();
        assert_eq!(out, "2026-11-26T16:34:16.137022Z");
    }

    #[test]
    fn text_lines_keep_their_look() {
        let line = capture(
            LogFormat::Text,
            || tracing::info!(id = %"req-1", status = 200u16, total_ms = 1.5, error = "a: b", "completed"),
        );
        let (stamp, rest) = line.split_once(' ').unwrap();
        assert!(
            stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "an RFC 3339 timestamp with microseconds: {stamp}"
        );
        assert_eq!(
            rest,
            " INFO completed id=req-1 status=200 total_ms=1.5 error=\"a: b\"\n"
        );
        // The pattern deploy/vscode/tasks.json waits for.
        let line = capture(
            LogFormat::Text,
            || tracing::info!(listen = %"127.0.0.1:1", "listening"),
        );
        assert!(
            line.contains(" INFO listening listen=127.0.0.1:1"),
            "{line}"
        );
    }

    #[test]
    fn json_lines_are_flat_objects() {
        let line = capture(LogFormat::Json, || {
            tracing::warn!(id = %"req-\"1", status = 502u16, ok = false, total_ms = 12.5,
                none = Option::<&str>::None, "quote \" here")
        });
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "quote \" here");
        assert_eq!(v["id"], "req-\"1");
        assert_eq!(v["status"], 502);
        assert_eq!(v["total_ms"], 12.5);
        assert_eq!(v["ok"], false);
        assert!(v.get("none").is_none() && v.get("fields").is_none() && v.get("target").is_none());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    /// A writer that records each write it is given.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn count(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_handed_over_in_one_piece_a_millisecond_after_its_first_line() {
        let writes = Writes::default();
        let batch = Batch::new(Box::new(writes.clone()));
        tokio::spawn(batch.clone().flusher());
        tokio::task::yield_now().await;
        for n in 0..100 {
            BatchWriter(batch.clone())
                .write_all(format!("line {n}\n").as_bytes())
                .unwrap();
        }
        tokio::task::yield_now().await;
        assert_eq!(writes.count(), 0, "nothing before the millisecond is up");
        tokio::time::sleep(BATCH_DELAY).await;
        tokio::task::yield_now().await;
        assert_eq!(
            writes.count(),
            1,
            "one write for the lines of that millisecond"
        );
        let text = String::from_utf8(writes.0.lock().unwrap()[0].clone()).unwrap();
        let expected: String = (0..100).map(|n| format!("line {n}\n")).collect();
        assert_eq!(text, expected);
    }

    #[test]
    fn a_full_batch_goes_at_once_and_the_rest_when_the_log_ends() {
        let writes = Writes::default();
        let batch = Batch::new(Box::new(writes.clone()));
        let line = [b'x'; 1000];
        for _ in 0..(BATCH_BYTES / 1000 + 1) {
            batch.push(&line);
        }
        assert_eq!(
            writes.count(),
            1,
            "64 KiB gathered: handed over without waiting"
        );
        batch.push(b"the last line\n");
        batch.hand_over(); // what dropping the Log does
        assert_eq!(writes.count(), 2);
        assert_eq!(writes.0.lock().unwrap()[1], b"the last line\n");
    }

    #[test]
    fn the_writer_thread_keeps_every_line_and_flushes_on_drop() {
        let sink = Sink::default();
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(16)
            .finish(sink.clone());
        let subscriber = tracing_subscriber::registry().with(layer(LogFormat::Json, false, writer));
        tracing::subscriber::with_default(subscriber, || {
            for n in 0..5000u32 {
                tracing::info!(n, "line");
            }
        });
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let numbers: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            numbers,
            (0..5000).collect::<Vec<u64>>(),
            "all lines, in order"
        );
    }
}
