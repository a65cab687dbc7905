//! The `glance-shim` binary: flags → configuration → logging → bind → serve until a signal; each way
//! of failing to start has its exit status (see `StartError::exit_code`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use glance_shim::cli::{self, Parsed};
use glance_shim::config::Config;
use glance_shim::error::StartError;
use glance_shim::listener::Listener;
use glance_shim::{inspect, logging, server, signals};

fn main() -> ExitCode {
    let config = match cli::parse(std::env::args_os()) {
        Parsed::Run(config) => *config,
        Parsed::Replay(args) => {
            return match glance_shim::inspect::client::replay(&args) {
                Ok(code) => code,
                Err(err) => {
                    eprintln!("glance-shim replay: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Parsed::Har(args) => {
            return match glance_shim::inspect::client::har(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("glance-shim har: {err}");
                    ExitCode::FAILURE
                }
            };
        }
        Parsed::Print(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(line) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match run(config) {
        Ok(code) => code,
        Err(err) => {
            let code = err.exit_code();
            eprintln!("glance-shim: {:#}", anyhow::Error::from(err));
            ExitCode::from(code)
        }
    }
}

fn run(config: Config) -> Result<ExitCode, StartError> {
    // Dropped last: writes out every line still queued, the cut-off requests' among them.
    let _log = logging::init(&config)?;
    // One thread, like one nginx worker: a debugging proxy's load fits on one core, and on a small
    // machine the client, the shim and glance compete for cores, where cross-thread wake-ups only
    // add context switches (measured in bench/README.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let mut registry = None;
    let code = runtime.block_on(async {
        // Before the port is bound: once a client (or a supervisor) can connect, SIGTERM and SIGINT
        // start the drain. Registered after, one sent in between was lost when the shell had
        // started the shim in the background with SIGINT ignored, and the shim never stopped.
        let signals = signals::shutdown_signals();
        let listener = Listener::bind(&config)?;
        let inspector = match &config.inspect {
            Some(inspect) => inspect::bind(inspect)?,
            None => None,
        };
        let server = server::Server::new(listener, config, inspector.is_some())?;
        registry = Some(server.registry());
        // Removed when this block ends, however the shim stops short of being killed.
        let mut _key_file = None;
        let mut url = None;
        let config = server.config();
        if let (Some(listener), Some(inspect)) = (inspector, &config.inspect) {
            let listen = server.local();
            let started = inspect::start(listener, &config, inspect, listen, server.proxy());
            let (address, key_file) = started.map_err(|error| StartError::Inspect {
                addr: inspect.addr.clone(),
                error,
            })?;
            (url, _key_file) = (Some(address), key_file);
        }
        let registry = server.registry();
        signals::spawn_table_on_usr1(registry.clone());
        tokio::select! {
            () = server.run(signals::counted(signals.clone(), 1), url.as_deref()) => Ok(ExitCode::SUCCESS),
            () = signals::counted(signals, 2) => {
                registry.cut_off_all("glance-shim was stopped by a second SIGINT");
                Ok(ExitCode::from(signals::FORCED_EXIT))
            }
        }
    });
    // Connections still open are dropped with the runtime, not waited for; each of their requests
    // gets its completion line as it is dropped, and is handed to the capture, which then writes
    // what it holds.
    runtime.shutdown_timeout(Duration::from_millis(100));
    if let Some(registry) = registry {
        registry.close();
    }
    code
}
