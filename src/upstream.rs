//! The connection to the upstream glance-api: a connector that knows the one address it may reach,
//! holds requests while the upstream is down (`--wait-upstream`), and says once, not per request, when
//! the upstream goes away and comes back; and the keep-alive pool of HTTP/1.1 connections built on it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::RequestBody;
use crate::config::{HostPort, Upstream};

/// How long one TCP connect may take before it counts as failed. Loopback refuses or accepts at once;
/// this only bounds a remote upstream whose SYNs go unanswered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the upstream could not be reached.
#[derive(Clone, Debug)]
pub enum ConnectError {
    /// Nothing listens there (connection refused), even after waiting `waited`.
    Refused {
        addr: String,
        waited: Option<Duration>,
    },
    /// No answer to the connect within [`CONNECT_TIMEOUT`].
    TimedOut { addr: String },
    /// The upstream host name did not resolve.
    Resolve { addr: String, reason: String },
    /// Any other connect failure.
    Io { addr: String, reason: String },
    /// The TLS handshake with an https upstream failed; `untrusted` when its certificate was refused.
    Tls {
        addr: String,
        message: String,
        untrusted: bool,
    },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused { addr, waited: None } => {
                write!(f, "nothing listens on {addr} (connection refused)")
            }
            ConnectError::Refused {
                addr,
                waited: Some(w),
            } => write!(
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
            ConnectError::Tls { message, .. } => f.write_str(message),
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

/// Connects to the configured upstream.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    addr: HostPort,
    /// `addr` as text, for messages.
    display: String,
    /// Pre-resolved when the upstream is an IP literal (the usual case): no lookup per connect.
    fixed: Option<SocketAddr>,
    wait: Option<Duration>,
    health: Arc<Health>,
    /// For an https upstream: the client configuration and the name its certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Connector {
    /// `tls` is the client configuration for an https upstream (see `tls::client_config`).
    pub fn new(
        upstream: &Upstream,
        wait: Option<Duration>,
        health: Arc<Health>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Connector, String> {
        let fixed = match &upstream.addr.host {
            crate::config::Host::Ip(ip) => Some(SocketAddr::new(*ip, upstream.addr.port)),
            crate::config::Host::Name(_) => None,
        };
        let tls = match tls {
            Some(config) => Some((
                tokio_rustls::TlsConnector::from(config),
                crate::tls::server_name(&upstream.addr.host)?,
            )),
            None => None,
        };
        Ok(Connector {
            inner: Arc::new(ConnectorInner {
                addr: upstream.addr.clone(),
                display: upstream.addr.to_string(),
                fixed,
                wait,
                health,
                tls,
            }),
        })
    }
}

impl std::fmt::Debug for ConnectorInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorInner")
            .field("addr", &self.display)
            .field("wait", &self.wait)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
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
                    .map_err(|e| ConnectError::Resolve {
                        addr: self.display.clone(),
                        reason: e.to_string(),
                    })?
                    .collect()
            }
        };
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    last = Some(ConnectError::Refused {
                        addr: self.display.clone(),
                        waited: None,
                    });
                }
                Ok(Err(e)) => {
                    last = Some(ConnectError::Io {
                        addr: self.display.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    last = Some(ConnectError::TimedOut {
                        addr: self.display.clone(),
                    })
                }
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
                        return Err(ConnectError::Refused {
                            addr,
                            waited: Some(now - started),
                        });
                    }
                    tokio::time::sleep_until((now + backoff).min(deadline)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(other) => return Err(other),
            }
        }
    }
}

/// Why a request could not be exchanged with the upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made.
    Connect(ConnectError),
    /// The connection failed while sending the request or reading the response head.
    Http(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => e.fmt(f),
            UpstreamError::Http(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Connect(e) => Some(e),
            UpstreamError::Http(e) => Some(e),
        }
    }
}

type Sender = SendRequest<RequestBody>;

/// Keep-alive connections to the upstream.
///
/// A connection goes back to the pool only when a response ended cleanly on it (see [`Lease`]), so a
/// connection whose response broke off, had bad framing or said `Connection: close` is never reused.
/// A request is retried only when hyper hands it back unwritten from a pooled connection that turned
/// out to be closed: a request that may have reached glance is never sent twice.
#[derive(Debug)]
pub struct Pool {
    connector: Connector,
    /// Idle connections, most recently used last, with when they went idle.
    idle: Mutex<Vec<(Sender, Instant)>>,
    http: http1::Builder,
}

/// How long an idle upstream connection is kept: after a burst, the pool shrinks back.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upstream connections kept idle at most; more than glance ever needs, few enough to bound memory.
const MAX_IDLE: usize = 256;

impl Pool {
    pub fn new(connector: Connector) -> Arc<Pool> {
        let mut http = http1::Builder::new();
        http.preserve_header_case(true);
        Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            http,
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes idle connections unused for [`IDLE_TIMEOUT`]; runs for the life of the pool.
    pub async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            self.idle().retain(|(sender, since)| {
                !sender.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT
            });
        }
    }

    /// The most recently used idle connection that is still open (the likeliest to still be alive).
    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle();
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    async fn open(&self) -> Result<Sender, UpstreamError> {
        let inner = &self.connector.inner;
        let stream = inner.connect().await.map_err(UpstreamError::Connect)?;
        let Some((tls, name)) = &inner.tls else {
            return self.handshake(TokioIo::new(stream)).await;
        };
        let failed = |message: String, untrusted: bool| {
            UpstreamError::Connect(ConnectError::Tls {
                addr: inner.display.clone(),
                message,
                untrusted,
            })
        };
        let name_text = match name {
            rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
            rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name.clone(), stream))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let (untrusted, message) = crate::tls::describe_upstream_failure(&e, &name_text);
                return Err(failed(message, untrusted));
            }
            Err(_) => {
                let message = format!(
                    "the TLS handshake with the upstream ({name_text}) did not finish within {} s",
                    CONNECT_TIMEOUT.as_secs()
                );
                return Err(failed(message, false));
            }
        };
        self.handshake(TokioIo::new(stream)).await
    }

    /// HTTP/1.1 over an open connection; the connection's task runs until it closes.
    async fn handshake<I>(&self, io: I) -> Result<Sender, UpstreamError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = self.http.handshake(io).await.map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` and returns the response head with the lease on its connection.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.open().await?, false),
            };
            if reused && sender.ready().await.is_err() {
                continue; // closed while idle; nothing was sent on it
            }
            match sender.try_send_request(req).await {
                Ok(res) => {
                    return Ok((
                        res,
                        Lease {
                            pool: self.clone(),
                            sender: Some(sender),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }
}

/// The right to reuse the connection a response came on. Released into the pool when the response
/// body has ended cleanly; dropped otherwise, which closes the connection once hyper is done with it.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    sender: Option<Sender>,
}

impl Lease {
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take()
            && !sender.is_closed()
        {
            let mut idle = self.pool.idle();
            if idle.len() < MAX_IDLE {
                idle.push((sender, Instant::now()));
            }
        }
    }
}
