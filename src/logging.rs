//! Where log lines go and what they look like: readable text on stderr (colour only on a terminal) or
//! one JSON object per line, optionally appended to a file, filtered `RUST_LOG`-style.
//!
//! Lines are formatted by a formatter of our own (two lines per request make the log a hot path: it
//! caches the date, writes fields without `Debug` round trips, escapes JSON by hand) straight into a
//! buffer that is written in batches: a millisecond after its first line (so an idle shim's line, such
//! as the arrival of a request a breakpoint holds, is out at once), when 64 KiB have gathered, and at
//! exit. A busy shim thus makes one write(2) per millisecond instead of two per request, and no line
//! is ever dropped. What each line says
//! is decided where it is written (`proxy`, `body`, `inflight`, `upstream`).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

/// A batch is written once it reaches this size...
const BATCH_BYTES: usize = 64 * 1024;
/// ...and in any case this long after its first line: the flusher task's delay.
const BATCH_DELAY: Duration = Duration::from_millis(1);

struct Batch {
    buf: String,
    sink: Box<dyn Write + Send>,
    /// The line format, fixed at start-up.
    format: LineFormat,
}

impl Batch {
    fn write_out(&mut self) {
        if !self.buf.is_empty() {
            // A log that cannot be written (disk full, closed stderr) must not stop the proxy.
            let _ = self.sink.write_all(self.buf.as_bytes());
            let _ = self.sink.flush();
            self.buf.clear();
        }
    }
}

static BATCH: OnceLock<Mutex<Batch>> = OnceLock::new();
/// Woken when a line lands in an empty batch; see [`flusher`].
static PENDING: Notify = Notify::const_new();

fn batch() -> Option<MutexGuard<'static, Batch>> {
    BATCH
        .get()
        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Writes out every gathered line. Called by the flusher and before exit.
pub fn flush() {
    if let Some(mut b) = batch() {
        b.write_out();
    }
}

/// Writes the batch out a millisecond after its first line: one write(2) for however many lines a
/// busy millisecond brings, and an idle shim's line (the arrival of a request a breakpoint holds) is
/// out within that millisecond. Runs for the life of the runtime.
pub async fn flusher() {
    loop {
        PENDING.notified().await;
        tokio::time::sleep(BATCH_DELAY).await;
        flush();
    }
}

/// Formats each event straight into the batch.
struct Lines;

impl<S: Subscriber> Layer<S> for Lines {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(mut b) = batch() else { return };
        let was_empty = b.buf.is_empty();
        let format = b.format;
        let _ = format.format(
            &mut b.buf,
            SystemTime::now(),
            event.metadata().level(),
            |v| event.record(v),
        );
        if b.buf.len() >= BATCH_BYTES {
            b.write_out();
        } else if was_empty {
            drop(b);
            PENDING.notify_one();
        }
    }
}

/// Installs the global subscriber. Fails (with a message naming the flag) only when `--log-file`
/// cannot be opened for appending. Lines are written by [`flusher`], which the runtime must run.
pub fn init(config: &Config) -> Result<(), String> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let (sink, colour): (Box<dyn Write + Send>, bool) = match &config.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            (Box::new(file), false)
        }
        None => {
            let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            (Box::new(io::stderr()), colour)
        }
    };
    let format = LineFormat {
        json: config.log_format == LogFormat::Json,
        colour,
    };
    let _ = BATCH.set(Mutex::new(Batch {
        buf: String::with_capacity(BATCH_BYTES),
        sink,
        format,
    }));
    tracing_subscriber::registry()
        .with(filter)
        .with(Lines)
        .init();
    Ok(())
}

/// One event as one line: `TIMESTAMP LEVEL message key=value ...`, or a flat JSON object with
/// `timestamp`, `level`, `message` and the event's fields.
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
    use super::*;

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

    /// Formats a real event through the real subscriber into a string.
    fn capture(json: bool, emit: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .event_format(LineFormat {
                json,
                colour: false,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_lines() {
        let line = capture(
            false,
            || tracing::info!(id = %"req-1", status = 200u16, total_ms = 1.5, headers = "a: b", "completed"),
        );
        let rest = line.split_once(' ').unwrap().1;
        assert_eq!(
            rest,
            " INFO completed id=req-1 status=200 total_ms=1.5 headers=\"a: b\"\n"
        );
    }

    #[test]
    fn json_lines_are_flat_objects() {
        let line = capture(
            true,
            || tracing::warn!(id = %"req-\"1", status = 502u16, ok = false, none = Option::<&str>::None, "quote \" here"),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "quote \" here");
        assert_eq!(v["id"], "req-\"1");
        assert_eq!(v["status"], 502);
        assert_eq!(v["ok"], false);
        assert!(v.get("none").is_none());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
    }
}
