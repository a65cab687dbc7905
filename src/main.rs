//! The `glance-shim` binary: flags → configuration → logging → bind → serve until a signal.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use glance_shim::cli::{self, Parsed};
use glance_shim::{logging, server, signals};

fn main() -> ExitCode {
    let config = match cli::parse(std::env::args_os()) {
        Parsed::Run(config) => *config,
        Parsed::Print(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        Parsed::Usage(line) => {
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = logging::init(&config) {
        eprintln!("glance-shim: {msg}");
        return ExitCode::from(2);
    }
    // One thread, like one nginx worker: a debugging proxy's load fits on one core, and on a small
    // machine the client, the shim and glance compete for cores, where cross-thread wake-ups only
    // add context switches (measured in bench/README.md).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("glance-shim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        tokio::spawn(logging::flusher());
        let listener = match server::bind_listener(&config) {
            Ok(l) => l,
            Err(e) => {
                let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                    " (something already listens there: devstack@g-api's uWSGI, or another glance-shim?)"
                } else {
                    ""
                };
                eprintln!("glance-shim: cannot listen on {}: {e}{hint}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let server = match server::Server::new(listener, config) {
            Ok(s) => s,
            Err(msg) => {
                eprintln!("glance-shim: {msg}");
                return ExitCode::from(2);
            }
        };
        signals::spawn_table_on_usr1(server.registry());
        server.run(signals::shutdown_requested()).await;
        ExitCode::SUCCESS
    });
    // Connections still open after the drain are abandoned, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    logging::flush();
    code
}
