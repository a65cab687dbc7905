//! Unix signals: SIGTERM/SIGINT start the drain, a second SIGINT exits at once, SIGUSR1 prints the
//! in-flight table.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::inflight::Registry;

/// Exit status after a second SIGINT cut the drain short (128 + SIGINT, as shells report it).
pub const FORCED_EXIT: i32 = 130;

/// Completes at the first SIGTERM or SIGINT; from then on a further SIGINT exits the process at once.
pub async fn shutdown_requested() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install SIGTERM/SIGINT handlers; stop glance-shim with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(
        signal = name,
        "{name} received; press Ctrl-C again to exit at once"
    );
    tokio::spawn(async move {
        int.recv().await;
        warn!("second SIGINT: exiting now, without waiting for requests in flight");
        crate::logging::flush();
        std::process::exit(FORCED_EXIT);
    });
}

/// Prints the in-flight table each time SIGUSR1 arrives.
pub fn spawn_table_on_usr1(registry: Arc<Registry>) {
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        warn!("cannot install a SIGUSR1 handler; the in-flight table is unavailable");
        return;
    };
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            info!("SIGUSR1: {}", registry.table(std::time::Instant::now()));
        }
    });
}
