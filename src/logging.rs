//! Where log lines go and what they look like: tracing-subscriber's formatter, as readable text
//! (colour only on a terminal) or one flat JSON object per line, filtered `RUST_LOG`-style, written by
//! tracing-appender's background thread to stderr or a file.
//!
//! The writer thread is what keeps a stalled terminal (a paused `less`, a full pipe) from stalling the
//! proxy: the runtime thread only queues a formatted line. The queue is lossless: no line is ever
//! dropped; past [`QUEUED_LINES`] waiting lines the proxy waits for the writer instead. Lines gathered
//! while the writer was busy go out in one write(2).
//!
//! What each line says is decided where it is written (`exchange` for a request's lines, `server`,
//! `upstream`).

use std::fs::OpenOptions;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Lines that may wait for the writer thread before the proxy waits with them: the lines of 2048
/// requests. The queue is allocated whole at start-up (32 bytes a line), so it is kept this small:
/// tracing-appender's default of 128,000 lines added 2 MiB to the shim's resident memory.
pub const QUEUED_LINES: usize = 4096;

/// Why the log cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("--log-file {}: {error}", path.display())]
pub struct LogFileError {
    path: PathBuf,
    error: io::Error,
}

/// Keeps the writer thread running; dropping it writes out every queued line.
pub struct LogGuard(#[allow(dead_code)] WorkerGuard);

/// Installs the global subscriber. Fails only when `--log-file` cannot be opened for appending.
pub fn init(config: &Config) -> Result<LogGuard, LogFileError> {
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
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("glance-shim-log")
        // The writer thread flushes when the queue runs empty: what queued up meanwhile is one write.
        .finish(BufWriter::with_capacity(64 * 1024, sink));
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    tracing_subscriber::registry()
        .with(layer(config.log_format, colour, writer).with_filter(filter))
        .init();
    Ok(LogGuard(guard))
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

    #[test]
    fn the_writer_thread_keeps_every_line_and_flushes_on_drop() {
        let sink = Sink::default();
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(16)
            .finish(BufWriter::new(sink.clone()));
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
