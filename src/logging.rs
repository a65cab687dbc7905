//! Where log lines go and what they look like: tracing-subscriber's formatter, as readable text
//! (colour only on a terminal) or one flat JSON object per line, filtered `RUST_LOG`-style, written by
//! tracing-appender's background thread to stderr or a file.
//!
//! The writer thread is what keeps a stalled terminal (a paused `less`, a full pipe) from stalling the
//! proxy: the runtime thread only hands it lines. It is lossless: no line is ever dropped; past
//! [`QUEUED_BATCHES`] waiting batches the proxy waits for the writer instead.
//!
//! Lines are handed over a millisecond's worth at a time (`Batch`), not one by one: waking the
//! writer thread for every line, on a 2-core machine shared with the client and glance, cost the
//! shim 43% of its small-request req/s (bench/run.py, 0.52x nginx against 0.92x with one write per
//! millisecond). A line is out a millisecond after it was logged, or sooner when 64 KiB have
//! gathered: when a breakpoint holds a request, its arrival line is already in the log.
//!
//! What each line says is decided where it is written (`exchange` for a request's lines, `server`,
//! `upstream`).

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
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
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => fmt.with_ansi(colour).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    }
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
