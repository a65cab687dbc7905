//! Where log lines go and what they look like: readable text on stderr (colour only on a terminal) or
//! one JSON object per line, optionally appended to a file, filtered `RUST_LOG`-style.
//!
//! What each line says is decided where it is written (`proxy`, `body`, `inflight`, `upstream`).

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. Fails (with a message naming the flag) only when `--log-file`
/// cannot be opened for appending.
pub fn init(config: &Config) -> Result<(), String> {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);

    match &config.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            let writer = Arc::new(file);
            match config.log_format {
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).init(),
                LogFormat::Json => builder.json().flatten_event(true).with_writer(writer).init(),
            }
        }
        None => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            match config.log_format {
                LogFormat::Text => builder.with_ansi(colour).with_writer(std::io::stderr).init(),
                LogFormat::Json => builder.json().flatten_event(true).with_writer(std::io::stderr).init(),
            }
        }
    }
    Ok(())
}
