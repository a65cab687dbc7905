//! The connection to the upstream glance-api: a connector that knows the one address it may reach,
//! speaks TLS to an https upstream, holds requests while the upstream is down (`--wait-upstream`), and
//! says once, not per request, when the upstream goes away and comes back; and hyper-util's client,
//! whose pool keeps HTTP/1.1 connections alive on it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Upstream;
use crate::tls::{Stream, TlsError};

/// How long one TCP connect may take before it counts as failed. Loopback refuses or accepts at once;
/// this only bounds a remote upstream whose SYNs go unanswered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the upstream could not be reached.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens there (connection refused), even after waiting `waited`.
    #[error("nothing listens on {addr} (connection refused){}",
        waited.map(|w| format!(", still after waiting {:.1} s", w.as_secs_f64())).unwrap_or_default())]
    Refused {
        addr: String,
        waited: Option<Duration>,
    },
    /// No answer to the connect within [`CONNECT_TIMEOUT`].
    #[error("{addr} did not accept a connection within {} s", CONNECT_TIMEOUT.as_secs())]
    TimedOut { addr: String },
    /// Any other connect failure.
    #[error("cannot connect to {addr}: {reason}")]
    Io { addr: String, reason: String },
    /// The TLS handshake with an https upstream failed; `untrusted` when its certificate was refused.
    #[error("{message}")]
    Tls {
        addr: String,
        message: String,
        untrusted: bool,
    },
}

/// What the shim has learnt about its upstream: whether it is down (so an outage is logged once when
/// it starts and once when it ends, not once per request), and whether it answers
/// `Expect: 100-continue` (uWSGI never does: bodies then go to it without waiting).
#[derive(Debug, Default)]
pub struct Health {
    down: AtomicBool,
    ignores_expect: AtomicBool,
}

impl Health {
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// True once the upstream let an `Expect: 100-continue` go unanswered.
    pub fn ignores_expect(&self) -> bool {
        self.ignores_expect.load(Ordering::Relaxed)
    }

    /// The upstream said nothing to an `Expect: 100-continue`: later bodies are not held back for it.
    pub fn upstream_ignores_expect(&self) {
        if !self.ignores_expect.swap(true, Ordering::Relaxed) {
            info!(
                "the upstream does not answer Expect: 100-continue (uWSGI never does); request bodies \
                 go to it at once from now on"
            );
        }
    }

    /// The upstream answered an `Expect: 100-continue`.
    pub fn upstream_answers_expect(&self) {
        self.ignores_expect.store(false, Ordering::Relaxed);
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
            // Perhaps another server now (the debugger restarted glance under gunicorn, say).
            self.upstream_answers_expect();
        }
    }
}

/// Connects to the configured upstream.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    /// The upstream's `HOST:PORT`, what is connected to and what messages name.
    display: String,
    wait: Option<Duration>,
    health: Arc<Health>,
    /// For an https upstream: the client configuration and the name its certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// Counts the connections to the upstream that have closed (see `server`'s memory give-back).
    closed: Arc<AtomicUsize>,
}

impl Connector {
    /// `tls` is the client configuration for an https upstream (see `tls::client_config`); `closed`
    /// is counted up as each connection closes.
    pub fn new(
        upstream: &Upstream,
        wait: Option<Duration>,
        health: Arc<Health>,
        tls: Option<Arc<rustls::ClientConfig>>,
        closed: Arc<AtomicUsize>,
    ) -> Result<Connector, TlsError> {
        let tls = match tls {
            Some(config) => Some((
                tokio_rustls::TlsConnector::from(config),
                crate::tls::server_name(&upstream.addr.host)?,
            )),
            None => None,
        };
        Ok(Connector {
            inner: Arc::new(ConnectorInner {
                display: upstream.addr.to_string(),
                wait,
                health,
                tls,
                closed,
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
        // An IP literal (the usual case) is parsed, not looked up; a name is resolved each time.
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.display.as_str())).await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(ConnectError::Refused {
                    addr: self.display.clone(),
                    waited: None,
                })
            }
            Ok(Err(e)) => Err(ConnectError::Io {
                addr: self.display.clone(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ConnectError::TimedOut {
                addr: self.display.clone(),
            }),
        }
    }

    /// Connects, retrying a refused connection until the `--wait-upstream` deadline.
    async fn connect_tcp(&self) -> Result<TcpStream, ConnectError> {
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

    /// A connection ready for HTTP: TCP, and the TLS handshake for an https upstream.
    async fn connect(&self) -> Result<TokioIo<Stream>, ConnectError> {
        let stream = self.connect_tcp().await?;
        let Some((tls, name)) = &self.tls else {
            return Ok(TokioIo::new(Box::new(stream)));
        };
        let name_text = match name {
            rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
            rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        };
        let failed = |message: String, untrusted: bool| ConnectError::Tls {
            addr: self.display.clone(),
            message,
            untrusted,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name.clone(), stream)).await {
            Ok(Ok(stream)) => Ok(TokioIo::new(Box::new(stream))),
            Ok(Err(e)) => {
                let (untrusted, message) = crate::tls::describe_upstream_failure(&e, &name_text);
                Err(failed(message, untrusted))
            }
            Err(_) => Err(failed(
                format!(
                    "the TLS handshake with the upstream ({name_text}) did not finish within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
                false,
            )),
        }
    }
}

/// How long an idle upstream connection is kept (hyper-util looks this often, so up to twice as long).
/// A lone request after a longer pause connects again, which on loopback costs a tenth of a
/// millisecond; what a burst opened is closed soon after it, and its memory given back (`server`).
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle upstream connections kept at most: as many as a burst keeps busy (nginx's `keepalive 64`).
/// Fewer, and a burst closes and opens connections all the time: at 64 connections, 8 kept idle
/// halved the shim's req/s (bench/README.md).
const MAX_IDLE: usize = 64;

/// How large hyper may let a connection's read buffer grow, and how much body it queues to write
/// before it waits for the socket, on both sides of the shim: below hyper's default of about
/// 400 KiB. A multi-GB transfer after a burst of connections peaks about 1 MiB lower, for a few
/// percent of its speed: a `read` and a `write` per 256 KiB instead of per 400 (bench/README.md).
/// A response head larger than this is refused as hyper refuses one larger than its default (a 502).
pub const MAX_BUFFER: usize = 256 * 1024;

/// The client that sends requests to the upstream, over `connector`'s connections.
///
/// Its pool reuses a connection only once its response has ended cleanly, so one whose response
/// broke off, had bad framing or said `Connection: close` is never reused. Requests go as they
/// are: `Host` is never added, and header names keep the case they came in.
///
/// No request is ever sent twice: one that may have reached glance must not be repeated (a POST,
/// a PUT of image data). A pooled connection the upstream has closed is seen as closed, and not
/// used, once its task has read the close; the one request that takes it in the instant between
/// gets a 502.
pub fn client<B>(connector: Connector) -> Client<Connector, B>
where
    B: Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        .http1_preserve_header_case(true)
        .http1_max_buf_size(MAX_BUFFER)
        .set_host(false)
        .retry_canceled_requests(false)
        .build(connector)
}

/// The absolute form of a request for the upstream, which the client needs to pick a connection:
/// `path` is kept byte for byte, and goes on the wire in origin-form again.
pub fn absolute(
    authority: &http::uri::Authority,
    path: http::uri::PathAndQuery,
) -> Result<Uri, http::uri::InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts)
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    /// Connects to the upstream, whatever the URI names: the connector knows the one address it may
    /// reach.
    fn call(&mut self, _: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let io = inner.connect().await?;
            Ok(UpstreamIo {
                io,
                closed: inner.closed.clone(),
            })
        })
    }
}

/// A connection to the upstream, as hyper-util's client uses it.
pub struct UpstreamIo {
    io: TokioIo<Stream>,
    closed: Arc<AtomicUsize>,
}

impl Drop for UpstreamIo {
    fn drop(&mut self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt as _, Empty};

    use super::*;

    /// An upstream that answers every request 204 and counts its connections.
    async fn upstream() -> (Upstream, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Upstream::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(|_req| async {
                        let mut res = Response::new(Empty::<Bytes>::new());
                        *res.status_mut() = http::StatusCode::NO_CONTENT;
                        Ok::<_, std::convert::Infallible>(res)
                    }),
                ));
            }
        });
        (addr, connections)
    }

    fn request(upstream: &Upstream) -> Request<Empty<Bytes>> {
        let authority = upstream.addr.to_string().parse().unwrap();
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = absolute(&authority, "/v2/images".parse().unwrap()).unwrap();
        req
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let (upstream, connections) = upstream().await;
        let connector =
            Connector::new(&upstream, None, Arc::default(), None, Arc::default()).unwrap();
        let client = client::<Empty<Bytes>>(connector);
        for _ in 0..5 {
            let res = client.request(request(&upstream)).await.unwrap();
            assert_eq!(res.status(), 204);
            res.into_body().collect().await.unwrap();
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }
}
