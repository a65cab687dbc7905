//! Accepting and serving client connections: binding, the accept loop (which backs off instead of
//! dying), HTTP/1.1 serving with hyper, and the bounded graceful drain on shutdown.
//!
//! What happens to each request is `proxy`'s business; this module only hands requests to it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::inflight::{self, Registry};
use crate::proxy::{Client, Proxy};
use crate::upstream::{Connector, Health, Pool};

/// A bound, not yet running, shim.
pub struct Server {
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: Arc<Config>,
}

/// Binds `config.listen` (backlog 1024, so a burst of connections is queued rather than refused).
pub fn bind_listener(config: &Config) -> io::Result<TcpListener> {
    let addrs = config.listen.resolve()?;
    let mut last = io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "the address resolved to nothing",
    );
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(1024)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl Server {
    /// Builds the shim around an already bound listener (tests bind 127.0.0.1:0).
    pub fn new(listener: TcpListener, config: Config) -> Server {
        let health = Arc::new(Health::default());
        let connector = Connector::new(&config.upstream, config.wait_upstream, health);
        let registry = Arc::new(Registry::default());
        let proxy = Proxy::new(&config, Pool::new(connector), registry);
        Server {
            listener,
            proxy: Arc::new(proxy),
            config: Arc::new(config),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The in-flight registry, for the SIGUSR1 table.
    pub fn registry(&self) -> Arc<Registry> {
        self.proxy.registry.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish for
    /// up to `--drain`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            proxy,
            config,
        } = self;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(
            listen = %local,
            upstream = %config.upstream,
            "listening"
        );
        if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
            warn!(
                listen = %local,
                "listening on a non-loopback address: anyone who can reach {local} reaches glance-api \
                 through this shim"
            );
        }
        if let Some(stall_after) = config.stall_after {
            tokio::spawn(inflight::watchdog(proxy.registry.clone(), stall_after));
        }

        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .preserve_header_case(true)
            // Responses are relayed as they come: no Date added where the upstream sent none.
            .auto_date_header(false)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();

        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(5);
                    pair
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait and try again, never give up serving.
                    error!(error = %e, "accept failed; retrying in {} ms", backoff.as_millis());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = proxy.clone();
            let client = Client::new(peer);
            let service = service_fn(move |req| {
                let (proxy, client) = (proxy.clone(), client.clone());
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(client, req).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(client = %peer, error = %crate::body::error_chain(&e), "connection ended with an error");
                }
            });
        }

        drop(listener);
        let in_flight = proxy.registry.len();
        info!(
            in_flight,
            "shutting down: no new connections; letting {in_flight} request(s) in flight finish for up to {:.1} s",
            config.drain.as_secs_f64()
        );
        if tokio::time::timeout(config.drain, graceful.shutdown())
            .await
            .is_err()
        {
            let table = proxy.registry.table(std::time::Instant::now());
            warn!("drain time (--drain) is over; exiting with {table}");
        } else {
            info!("all connections closed; exiting");
        }
    }
}
