//! Unix signals: SIGTERM/SIGINT start the drain, a second SIGINT ends it at once, SIGUSR1 prints the
//! in-flight table.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::inflight::Registry;

/// Exit status after a second SIGINT cut the drain short (128 + SIGINT, as shells report it).
pub const FORCED_EXIT: u8 = 130;

/// Listens for SIGTERM and SIGINT; the receiver counts them: 1 at the first SIGTERM or SIGINT (the
/// drain starts), 2 at a SIGINT after it (exit at once).
pub fn shutdown_signals() -> watch::Receiver<u8> {
    let (tx, rx) = watch::channel(0u8);
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install SIGTERM/SIGINT handlers; stop glance-shim with SIGKILL");
        return rx;
    };
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(
            signal = %name,
            "{name} received; press Ctrl-C again to exit at once"
        );
        tx.send_replace(1);
        int.recv().await;
        warn!("second SIGINT: exiting now, without waiting for requests in flight");
        tx.send_replace(2);
        // The receivers wait on the count, not on the end of the sender.
        std::future::pending::<()>().await;
    });
    rx
}

/// Completes once `signals` has counted `n`; never when the handlers could not be installed.
pub async fn counted(mut signals: watch::Receiver<u8>, n: u8) {
    if signals.wait_for(|&c| c >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
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
