//! The connection to the upstream glance-api: a connector that knows the one address it may reach,
//! holds requests while the upstream is down (`--wait-upstream`), and says once, not per request, when
//! the upstream goes away and comes back; plus the pooled HTTP/1.1 client built on it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::body::RequestBody;
use crate::config::{HostPort, Upstream};

/// How long one TCP connect may take before it counts as failed. Loopback refuses or accepts at once;
/// this only bounds a remote upstream whose SYNs go unanswered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the upstream could not be reached.
#[derive(Clone, Debug)]
pub enum ConnectError {
    /// Nothing listens there (connection refused), even after waiting `waited`.
    Refused { addr: String, waited: Option<Duration> },
    /// No answer to the connect within [`CONNECT_TIMEOUT`].
    TimedOut { addr: String },
    /// The upstream host name did not resolve.
    Resolve { addr: String, reason: String },
    /// Any other connect failure.
    Io { addr: String, reason: String },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused { addr, waited: None } => {
                write!(f, "nothing listens on {addr} (connection refused)")
            }
            ConnectError::Refused { addr, waited: Some(w) } => write!(
                f,
                "nothing listens on {addr} (connection refused), still after waiting {:.1} s",
                w.as_secs_f64()
            ),
            ConnectError::TimedOut { addr } => write!(
                f,
                "{addr} did not accept a connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
            ConnectError::Resolve { addr, reason } => write!(f, "cannot resolve {addr}: {reason}"),
            ConnectError::Io { addr, reason } => write!(f, "cannot connect to {addr}: {reason}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Whether the upstream is known to be down, so an outage is logged once when it starts and once
/// when it ends instead of once per request.
#[derive(Debug, Default)]
pub struct Health {
    down: AtomicBool,
}

impl Health {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn went_down(&self, addr: &str, wait: Option<Duration>) {
        if !self.down.swap(true, Ordering::Relaxed) {
            match wait {
                None => warn!(
                    "nothing listens on the upstream {addr}: is the debug glance-api running? Requests \
                     get 502 until it is back (--wait-upstream would hold them instead); this is logged \
                     once per outage"
                ),
                Some(w) => warn!(
                    "nothing listens on the upstream {addr}: is the debug glance-api running? Holding \
                     requests for up to {:.1} s each while waiting for it; this is logged once per outage",
                    w.as_secs_f64()
                ),
            }
        }
    }

    fn came_back(&self, addr: &str) {
        if self.down.swap(false, Ordering::Relaxed) {
            info!("the upstream {addr} accepts connections again");
        }
    }
}

/// Connects to the configured upstream, whatever URI the client pool asks for.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

#[derive(Debug)]
struct ConnectorInner {
    addr: HostPort,
    /// `addr` as text, for messages.
    display: String,
    /// Pre-resolved when the upstream is an IP literal (the usual case): no lookup per connect.
    fixed: Option<SocketAddr>,
    wait: Option<Duration>,
    health: Arc<Health>,
}

impl Connector {
    pub fn new(upstream: &Upstream, wait: Option<Duration>, health: Arc<Health>) -> Connector {
        let fixed = match &upstream.addr.host {
            crate::config::Host::Ip(ip) => Some(SocketAddr::new(*ip, upstream.addr.port)),
            crate::config::Host::Name(_) => None,
        };
        Connector {
            inner: Arc::new(ConnectorInner {
                addr: upstream.addr.clone(),
                display: upstream.addr.to_string(),
                fixed,
                wait,
                health,
            }),
        }
    }
}

impl ConnectorInner {
    async fn connect_once(&self) -> Result<TcpStream, ConnectError> {
        let addrs = match self.fixed {
            Some(a) => vec![a],
            None => {
                let host = self.addr.to_string();
                tokio::net::lookup_host(host)
                    .await
                    .map_err(|e| ConnectError::Resolve { addr: self.display.clone(), reason: e.to_string() })?
                    .collect()
            }
        };
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = Some(ConnectError::Refused { addr: self.display.clone(), waited: None });
                }
                Ok(Err(e)) => {
                    last = Some(ConnectError::Io { addr: self.display.clone(), reason: e.to_string() })
                }
                Err(_) => last = Some(ConnectError::TimedOut { addr: self.display.clone() }),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Resolve {
            addr: self.display.clone(),
            reason: "the name has no addresses".into(),
        }))
    }

    /// Connects, retrying a refused connection until the `--wait-upstream` deadline.
    async fn connect(&self) -> Result<TcpStream, ConnectError> {
        let started = Instant::now();
        let deadline = self.wait.map(|w| started + w);
        let mut backoff = Duration::from_millis(25);
        loop {
            match self.connect_once().await {
                Ok(stream) => {
                    // Small requests and responses must not wait for Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    self.health.came_back(&self.display);
                    return Ok(stream);
                }
                Err(ConnectError::Refused { addr, .. }) => {
                    self.health.went_down(&self.display, self.wait);
                    let Some(deadline) = deadline else {
                        return Err(ConnectError::Refused { addr, waited: None });
                    };
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(ConnectError::Refused { addr, waited: Some(now - started) });
                    }
                    tokio::time::sleep_until((now + backoff).min(deadline)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(other) => return Err(other),
            }
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.connect().await.map(TokioIo::new) })
    }
}

/// The pooled client every request goes through.
pub type UpstreamClient = Client<Connector, RequestBody>;

/// Builds the client: HTTP/1.1 only, keep-alive pooling, header case kept as the peers wrote it, `Host`
/// never added (the client's is forwarded), and retries only for requests that were never written to a
/// reused connection (hyper's `retry_canceled_requests`), which is always safe.
pub fn client(connector: Connector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .http1_preserve_header_case(true)
        .set_host(false)
        .retry_canceled_requests(true)
        .build(connector)
}
