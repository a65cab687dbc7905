//! The connection to the upstream glance-api: a connector that knows the one address it may reach,
//! speaks TLS to an https upstream, holds requests while the upstream is down (`--wait-upstream`), and
//! says once, not per request, when the upstream goes away and comes back; and the keep-alive pool of
//! HTTP/1.1 connections built on it.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::RequestBody;
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
}

impl Connector {
    /// `tls` is the client configuration for an https upstream (see `tls::client_config`).
    pub fn new(
        upstream: &Upstream,
        wait: Option<Duration>,
        health: Arc<Health>,
        tls: Option<Arc<rustls::ClientConfig>>,
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

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upstream connections kept idle at most; more than glance ever needs, few enough to bound memory.
const MAX_IDLE: usize = 256;

/// Idle connections kept for the whole [`IDLE_TIMEOUT`]. Those past them that stay unused for a
/// [`QUIET`] are what a burst left (64 after `wrk -c64`): each holds hyper's buffers, about 40 KiB.
const KEEP_WARM: usize = 8;

/// How long connections past [`KEEP_WARM`] may stay idle, and how often the pool looks.
const QUIET: Duration = Duration::from_secs(1);

/// Keep-alive connections to the upstream, and the sending of requests on them.
///
/// A connection goes back to the pool only when its response ended cleanly (see [`Lease`]), so one
/// whose response broke off, had bad framing or said `Connection: close` is never reused. A request
/// is sent again only when hyper hands it back unwritten from a pooled connection that turned out to
/// be closed: a request that may have reached glance is never sent twice.
///
/// Written here rather than taken from hyper-util (`client::legacy::Client` with this connector):
/// that client cost 5.7% of small-request req/s at c16 (median of 16 interleaved pairs of 5 s
/// `bench/cost.sh` runs, 2026-11-26; 4.4% at c64 over 6 pairs), 3-6% more CPU per request, and
/// 6,800 instructions per request (`bench/callgrind.sh`: 65,422 against 58,607): pool-key hashing,
/// a task per request to return the connection, the absolute-URI rewrite.
#[derive(Debug)]
pub struct Pool<B = RequestBody> {
    connector: Connector,
    /// Idle connections, most recently used last, with when they went idle.
    idle: Mutex<Vec<(SendRequest<B>, Instant)>>,
    http: http1::Builder,
    max_idle: usize,
    idle_timeout: Duration,
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub fn new(connector: Connector) -> Arc<Pool<B>> {
        Pool::with_limits(connector, MAX_IDLE, IDLE_TIMEOUT)
    }

    fn with_limits(connector: Connector, max_idle: usize, idle_timeout: Duration) -> Arc<Pool<B>> {
        let mut http = http1::Builder::new();
        http.preserve_header_case(true);
        Arc::new(Pool {
            connector,
            idle: Mutex::new(Vec::new()),
            http,
            max_idle,
            idle_timeout,
        })
    }

    fn idle(&self) -> MutexGuard<'_, Vec<(SendRequest<B>, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes idle connections as [`Pool::reap`] says, every [`QUIET`], for the life of the pool;
    /// once a burst's connections are closed (and their tasks have freed their buffers, by the next
    /// look), gives the memory back to the system.
    pub async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(QUIET);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = 0;
        loop {
            tick.tick().await;
            if closed >= KEEP_WARM {
                give_back_memory(closed);
            }
            closed = self.reap(Instant::now());
        }
    }

    /// Closes the idle connections that are closed already or idle past the idle timeout, and those
    /// past the [`KEEP_WARM`] most recently used that have been idle for a [`QUIET`]: what a burst
    /// left. Returns how many were closed.
    fn reap(&self, now: Instant) -> usize {
        let timeout = self.idle_timeout;
        let mut idle = self.idle();
        let before = idle.len();
        idle.retain(|(sender, since)| !sender.is_closed() && now - *since < timeout);
        // Oldest first: the ones a burst left are at the front.
        let surplus = idle.len().saturating_sub(KEEP_WARM);
        let left = idle[..surplus]
            .iter()
            .take_while(|(_, since)| now - *since >= QUIET)
            .count();
        idle.drain(..left);
        before - idle.len()
    }

    /// The most recently used idle connection that is still open (the likeliest to still be alive).
    fn checkout(&self) -> Option<SendRequest<B>> {
        let mut idle = self.idle();
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// A new connection; its task runs until it closes.
    async fn open(&self) -> Result<SendRequest<B>, UpstreamError> {
        let io = self.connector.inner.connect().await?;
        let (sender, conn) = self.http.handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (its target goes as it is) and returns the response head with the lease on its
    /// connection. `connected` is called once a connection has taken the request.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<B>,
        connected: impl Fn(),
    ) -> Result<(Response<Incoming>, Lease<B>), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.open().await?, false),
            };
            if reused && sender.ready().await.is_err() {
                continue; // closed while idle; nothing was sent on it
            }
            connected();
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let lease = Lease {
                        pool: self.clone(),
                        sender: Some(sender),
                    };
                    return Ok((res, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }
}

/// Returns the heap's free pages to the system after `closed` connections were closed. glibc keeps
/// freed memory in the process unless asked: after `wrk -c64`, RSS stayed at 12.5 MiB, and closing the
/// burst's connections alone changed nothing; closing them and trimming brought it to 9.7 MiB (the
/// inspector's 1,000 records kept). The trim takes about 0.8 ms of the serving thread, once per burst.
fn give_back_memory(closed: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only returns free memory of the allocator's own to the system.
        unsafe { libc::malloc_trim(0) };
        debug!(
            closed,
            took_us = started.elapsed().as_micros() as u64,
            "idle upstream connections left by a burst closed, and their memory given back"
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = closed;
}

/// Why a request could not be exchanged with the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made.
    #[error("{0}")]
    Connect(#[from] ConnectError),
    /// The connection failed while sending the request or reading the response head.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// The right to reuse the connection a response came on. Released into the pool when the response
/// body has ended cleanly; dropped otherwise, which closes the connection once hyper is done with it.
#[derive(Debug)]
pub struct Lease<B = RequestBody> {
    pool: Arc<Pool<B>>,
    sender: Option<SendRequest<B>>,
}

impl<B> Lease<B> {
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take()
            && !sender.is_closed()
        {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.pool.max_idle {
                idle.push((sender, Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::Empty;

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

    fn pool(upstream: &Upstream, max_idle: usize) -> Arc<Pool<Empty<Bytes>>> {
        let connector = Connector::new(upstream, None, Arc::default(), None).unwrap();
        Pool::with_limits(connector, max_idle, Duration::from_secs(30))
    }

    /// Sends a request and, as a response body ending cleanly does, returns its connection.
    async fn roundtrip(pool: &Arc<Pool<Empty<Bytes>>>) {
        let (res, lease) = pool.send(Request::new(Empty::new()), || {}).await.unwrap();
        assert_eq!(res.status(), 204);
        lease.release();
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let (upstream, connections) = upstream().await;
        let pool = pool(&upstream, 4);
        for _ in 0..5 {
            roundtrip(&pool).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_whose_lease_is_dropped_is_not_reused() {
        let (upstream, connections) = upstream().await;
        let pool = pool(&upstream, 4);
        let (_res, lease) = pool.send(Request::new(Empty::new()), || {}).await.unwrap();
        drop(lease); // the response broke off, or said Connection: close
        roundtrip(&pool).await;
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires() {
        let (upstream, connections) = upstream().await;
        let pool = pool(&upstream, 4);
        roundtrip(&pool).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        roundtrip(&pool).await;
        assert_eq!(
            connections.load(Ordering::SeqCst),
            2,
            "a new one after 30 s idle"
        );
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept_the_most_recent_taken_first() {
        let (upstream, connections) = upstream().await;
        let pool = pool(&upstream, 2);
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(
                pool.send(Request::new(Empty::new()), || {})
                    .await
                    .unwrap()
                    .1,
            );
        }
        assert_eq!(connections.load(Ordering::SeqCst), 3);
        for lease in leases {
            lease.release();
        }
        assert_eq!(pool.idle().len(), 2, "the third is closed, not kept");
        let newest = pool.idle().last().map(|(_, since)| *since).unwrap();
        assert!(pool.idle().iter().all(|(_, since)| *since <= newest));
        roundtrip(&pool).await;
        assert_eq!(
            pool.idle().last().map(|(_, since)| *since > newest),
            Some(true)
        );
        assert_eq!(connections.load(Ordering::SeqCst), 3, "no new connection");
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_burst_left_is_closed_after_a_quiet_second_but_a_few_stay_warm() {
        let (upstream, connections) = upstream().await;
        let pool = pool(&upstream, 64);
        let burst = KEEP_WARM + 4;
        let mut leases = Vec::new();
        for _ in 0..burst {
            leases.push(
                pool.send(Request::new(Empty::new()), || {})
                    .await
                    .unwrap()
                    .1,
            );
        }
        assert_eq!(connections.load(Ordering::SeqCst), burst);
        for lease in leases {
            lease.release();
        }
        assert_eq!(pool.reap(Instant::now()), 0, "not yet quiet");
        tokio::time::advance(QUIET / 2).await;
        roundtrip(&pool).await; // one in use meanwhile
        tokio::time::advance(QUIET / 2).await;
        assert_eq!(pool.reap(Instant::now()), 4);
        assert_eq!(pool.idle().len(), KEEP_WARM);
        let newest = pool.idle().last().map(|(_, since)| *since).unwrap();
        assert_eq!(newest, Instant::now() - QUIET / 2, "the one used is kept");
        tokio::time::advance(QUIET * 5).await;
        assert_eq!(pool.reap(Instant::now()), 0, "the warm ones stay");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            pool.reap(Instant::now()),
            KEEP_WARM,
            "until the idle timeout"
        );
        roundtrip(&pool).await;
        assert_eq!(connections.load(Ordering::SeqCst), burst + 1);
    }

    #[tokio::test]
    async fn connected_is_called_once_a_connection_takes_the_request() {
        let (upstream, _) = upstream().await;
        let pool = pool(&upstream, 4);
        let calls = AtomicUsize::new(0);
        let (_, lease) = pool
            .send(Request::new(Empty::new()), || {
                calls.fetch_add(1, Ordering::SeqCst);
            })
            .await
            .unwrap();
        lease.release();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
