//! Where log lines go and what they look like: tracing-subscriber's own text format
//! (`TIMESTAMP LEVEL message key=value ...`, colour only on a terminal) or its JSON format (one flat
//! object per line), filtered `RUST_LOG`-style.
//!
//! Where a line is written decides how:
//! - **A regular file** (`--log-file`, or stderr redirected to one) is written by the thread that
//!   serves requests, as nginx writes its access log: a file does not stop taking writes the way a
//!   paused terminal does, and handing each line to another thread would cost a lone request a
//!   thread wake-up per line (measured in bench/README.md). The lines it logs while it works are
//!   written together, with one `write(2)`, when it is about to wait for the network ([`FileLines`]).
//! - **A terminal or a pipe** (a paused `less`, a full pipe) can stop taking writes, so its lines go
//!   through tracing-appender's non-blocking writer: a thread of its own writes them. It is lossless:
//!   no line is ever dropped; past [`QUEUED_LINES`] waiting lines the proxy waits with them.
//!
//! What each line says is decided where it is logged (`exchange` for a request's lines, `server`,
//! `upstream`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::io::{self, IsTerminal};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
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

/// The running log: dropping it writes out every line still waiting, for a file or for a terminal
/// or a pipe.
#[must_use = "dropping the log stops writing to a terminal or a pipe"]
pub struct Log {
    _writer_thread: Option<WorkerGuard>,
    file: Option<Arc<FileLines>>,
}

impl Log {
    /// The lines for a regular file, which the serving runtime writes out before it waits.
    pub fn file_lines(&self) -> Option<Arc<FileLines>> {
        self.file.clone()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Some(lines) = &self.file {
            lines.write_out();
        }
    }
}

/// How long a line may wait while the serving thread stays busy without waiting for the network.
pub const WRITE_WITHIN: Duration = Duration::from_millis(100);

/// Bytes of waiting lines past which they are written at once.
const GATHER: usize = 64 << 10;

/// A regular file's lines. The serving thread gathers the lines it logs while it works, and they
/// are written with one `write(2)` when it is about to wait for the network (the runtime's park
/// hook, see `main`), once they pass [`GATHER`] bytes, and once [`WRITE_WITHIN`] has passed since
/// the first of them. A line logged outside the runtime (the capture's writer thread, the last
/// lines at exit) is written at once, with those waiting.
///
/// The request a developer holds at a breakpoint leaves the shim waiting, so its arrival line is
/// in the file as soon as the request is on its way to glance; a lone request's arrival line is
/// written after the request went upstream, not before; and under load a turn of the runtime that
/// serves many requests writes their lines with one call instead of two per request. tokio's
/// park hook is the library's way to do work "when the executor is idle"; tracing-subscriber's
/// writers have no such mode. Shown by `a_file_gets_the_lines_when_the_runtime_waits` below and
/// `a_held_request_is_in_the_log_file_while_glance_holds_it` in tests/shim.rs.
pub struct FileLines {
    file: File,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    since: Option<Instant>,
}

impl FileLines {
    fn new(file: File) -> FileLines {
        FileLines {
            file,
            waiting: Mutex::default(),
        }
    }

    /// Writes the waiting lines out.
    pub fn write_out(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        Self::write_waiting(&self.file, &mut waiting);
    }

    fn write_waiting(mut file: &File, waiting: &mut Waiting) {
        if !waiting.bytes.is_empty() {
            // Nowhere to report a log that cannot be written; the next line tries again.
            let _ = file.write_all(&waiting.bytes);
            waiting.bytes.clear();
        }
        waiting.since = None;
    }
}

impl io::Write for &FileLines {
    /// tracing-subscriber hands each formatted line over in one call.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.bytes.extend_from_slice(line);
        let since = *waiting.since.get_or_insert_with(Instant::now);
        let in_runtime = tokio::runtime::Handle::try_current().is_ok();
        if !in_runtime || waiting.bytes.len() >= GATHER || since.elapsed() >= WRITE_WITHIN {
            FileLines::write_waiting(&self.file, &mut waiting);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out();
        Ok(())
    }
}

/// Writes out, every [`WRITE_WITHIN`], the lines of a runtime that has stayed busy since they were
/// logged. A runtime that waits writes them before it does.
pub async fn write_out_regularly(lines: Arc<FileLines>) {
    let mut tick = tokio::time::interval(WRITE_WITHIN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        lines.write_out();
    }
}

/// Installs the global subscriber. Fails only when `--log-file` cannot be opened for appending.
pub fn init(config: &Config) -> Result<Log, LogFileError> {
    let file = match &config.log_file {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| LogFileError {
                    path: path.clone(),
                    error,
                })?,
        ),
        None => stderr_file(),
    };
    let file = file.map(|f| Arc::new(FileLines::new(f)));
    let (writer, colour, guard) = match &file {
        Some(lines) => (BoxMakeWriter::new(lines.clone()), false, None),
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
        file,
    })
}

/// stderr, when it is a regular file (`2>>shim.log`), which takes writes as `--log-file` does.
fn stderr_file() -> Option<File> {
    let file = File::from(io::stderr().as_fd().try_clone_to_owned().ok()?);
    file.metadata().ok()?.is_file().then_some(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(tag: &str) -> (Arc<FileLines>, PathBuf) {
        let path =
            std::env::temp_dir().join(format!("glance-shim-{tag}-{}.log", std::process::id()));
        let file = File::create(&path).unwrap();
        (Arc::new(FileLines::new(file)), path)
    }

    fn text(path: &PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_file_gets_the_lines_when_the_runtime_waits() {
        let (file, path) = lines("park");
        let on_park = file.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .on_thread_park(move || on_park.write_out())
            .build()
            .unwrap();
        runtime.block_on(async {
            (&*file).write_all(b"one\n").unwrap();
            (&*file).write_all(b"two\n").unwrap();
            assert_eq!(text(&path), "", "the runtime is still working");
            // Waiting for anything parks the runtime.
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(text(&path), "one\ntwo\n");
        });
        // Outside the runtime (another thread, the last lines at exit): at once.
        (&*file).write_all(b"three\n").unwrap();
        assert_eq!(text(&path), "one\ntwo\nthree\n");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn lines_of_a_runtime_that_never_waits_are_written_within_write_within() {
        let (file, path) = lines("busy");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            (&*file).write_all(b"first\n").unwrap();
            assert_eq!(text(&path), "");
            // Busy past WRITE_WITHIN: the next line takes the waiting one out with it.
            std::thread::sleep(WRITE_WITHIN);
            (&*file).write_all(b"second\n").unwrap();
            assert_eq!(text(&path), "first\nsecond\n");
            // And the regular write-out takes a line out with no other line after it.
            (&*file).write_all(b"third\n").unwrap();
            let ticker = tokio::spawn(write_out_regularly(file.clone()));
            tokio::time::sleep(WRITE_WITHIN * 2).await;
            ticker.abort();
            assert_eq!(text(&path), "first\nsecond\nthird\n");
        });
        let _ = std::fs::remove_file(path);
    }
}
