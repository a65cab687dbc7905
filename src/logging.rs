//! Where log lines go and what they look like: tracing-subscriber's own text format
//! (`TIMESTAMP LEVEL message key=value ...`, colour only on a terminal) or its JSON format (one flat
//! object per line), filtered `RUST_LOG`-style.
//!
//! Where a line is written decides how:
//! - **A regular file** (`--log-file`, or stderr redirected to one) is written by the thread that
//!   logs, one `write(2)` per line, as nginx writes its access log. A file does not stop taking
//!   writes the way a paused terminal does, and handing each line to another thread would cost a
//!   lone request a thread wake-up per line (measured in bench/README.md).
//! - **A terminal or a pipe** (a paused `less`, a full pipe) can stop taking writes, so its lines go
//!   through tracing-appender's non-blocking writer: a thread of its own writes them. It is lossless:
//!   no line is ever dropped; past [`QUEUED_LINES`] waiting lines the proxy waits with them.
//!
//! What each line says is decided where it is logged (`exchange` for a request's lines, `server`,
//! `upstream`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Lines that may wait for the writer thread (a paused terminal) before the proxy waits with them:
/// those of at least 2,000 requests. tracing-appender allocates its queue whole at start-up (32 bytes
/// a line), so its default of 128,000 would add 4 MiB to the shim's resident memory.
pub const QUEUED_LINES: usize = 4096;

/// Why the log cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("--log-file {}: {error}", path.display())]
pub struct LogFileError {
    path: PathBuf,
    error: io::Error,
}

/// The running log: dropping it writes out every line still queued for a terminal or a pipe.
#[must_use = "dropping the log stops writing to a terminal or a pipe"]
pub struct Log {
    _writer_thread: Option<WorkerGuard>,
}

/// Installs the global subscriber. Fails only when `--log-file` cannot be opened for appending.
pub fn init(config: &Config) -> Result<Log, LogFileError> {
    let (writer, colour, guard) = match &config.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| LogFileError {
                    path: path.clone(),
                    error,
                })?;
            (BoxMakeWriter::new(Mutex::new(file)), false, None)
        }
        None if stderr_is_a_file() => (BoxMakeWriter::new(io::stderr), false, None),
        None => {
            let colour = io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let (writer, guard) = NonBlockingBuilder::default()
                .lossy(false)
                .buffered_lines_limit(QUEUED_LINES)
                .thread_name("glance-shim-log")
                .finish(io::stderr());
            (BoxMakeWriter::new(writer), colour, Some(guard))
        }
    };
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colour)
        .with_target(false);
    let layer = match config.log_format {
        // The library's text line, its fields written by the library's `debug_fn` rather than its
        // default field formatter, which styles every field's name for a terminal even with colour
        // off: the same line in a tenth fewer instructions per request (bench/README.md).
        LogFormat::Text => lines
            .fmt_fields(
                format::debug_fn(|w, field, value| match field.name() {
                    "message" => write!(w, "{value:?}"),
                    name => write!(w, "{name}={value:?}"),
                })
                .delimited(" "),
            )
            .boxed(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
    Ok(Log {
        _writer_thread: guard,
    })
}

/// True when stderr is a regular file (`2>>shim.log`), which takes writes as `--log-file` does.
fn stderr_is_a_file() -> bool {
    io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file())
}

/// A warning that is logged at once, then at most every ten seconds with a count of the ones it
/// held back, so a flood cannot fill the log.
#[derive(Debug, Default)]
pub struct RateLimited {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn warn(&self, peer: impl fmt::Display, what: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < Self::EVERY)
        {
            state.1 += 1;
            return;
        }
        let held_back = std::mem::take(&mut state.1);
        state.0 = Some(now);
        drop(state);
        if held_back > 0 {
            tracing::warn!(client = %peer, held_back, "{what} ({held_back} more like it in the last 10 s not logged)");
        } else {
            tracing::warn!(client = %peer, "{what}");
        }
    }
}
