//! Accepting and serving client connections: the accept loop (which backs off instead of dying),
//! the optional TLS handshake, HTTP/1.1 serving with hyper, and the bounded graceful drain on
//! shutdown, after which the requests still in flight are cut off. The shim's parts are put together
//! here too: the registry (with what the capture directory holds), the upstream's connector and the
//! proxy.
//!
//! What happens to each request is `proxy`'s business; this module only hands requests to it.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::capture::Capture;
use crate::config::{Config, Front, Scheme};
use crate::error::StartError;
use crate::exchange::Client;
use crate::front::Packets;
use crate::inflight::{self, Kept, Registry, Rules};
use crate::keepalive::{Clock, Expired};
use crate::listener::{Conn, Listener};
use crate::logging::RateLimited;
use crate::proxy::Proxy;
use crate::tls::Stream;
use crate::upstream::{Connector, Health, MAX_BUFFER};

/// A bound, not yet running, shim.
pub struct Server {
    listener: Listener,
    proxy: Arc<Proxy>,
    config: Arc<Config>,
    /// Set when clients must speak TLS (`--tls-cert`/`--tls-key`).
    tls: Option<TlsAcceptor>,
    /// Connections closed, the client's and the upstream's, counted for [`give_back_memory`].
    closed: Arc<AtomicUsize>,
}

/// How a unix socket's client is named in warnings.
const UNIX: &str = "unix socket";

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After `--drain`, how long the requests cut off get to send their last bytes and close.
const CUT_OFF_GRACE: Duration = Duration::from_millis(500);

impl Server {
    /// Builds the shim around an already bound listener; `inspected` when the inspector will show
    /// its requests. Fails, with a line naming the flag and file, when a TLS file or the capture
    /// directory cannot be used.
    pub fn new(listener: Listener, config: Config, inspected: bool) -> Result<Server, StartError> {
        let tls = match &config.tls {
            Some(files) => Some(TlsAcceptor::from(crate::tls::server_config(
                &files.cert,
                &files.key,
            )?)),
            None => None,
        };
        let upstream_tls = match config.upstream.scheme {
            Scheme::Http => None,
            Scheme::Https if config.upstream_insecure => {
                Some(crate::tls::client_config(crate::tls::Trust::Insecure)?)
            }
            Scheme::Https => Some(crate::tls::client_config(crate::tls::Trust::Verify {
                extra_ca: config.upstream_ca.as_deref(),
            })?),
        };
        let health = Arc::new(Health::default());
        let closed = Arc::new(AtomicUsize::new(0));
        let connector = Connector::new(
            &config.upstream,
            config.wait_upstream,
            health.clone(),
            upstream_tls,
            closed.clone(),
        )?;
        let (capture, history) = match &config.capture {
            Some(c) => {
                let (capture, loaded) = Capture::open(c)?;
                (Some(capture), Some(loaded))
            }
            None => (None, None),
        };
        // The copies are kept for the inspector, and made for the capture: without an inspector,
        // none are kept once written.
        let inspect = config.inspect.as_ref().filter(|_| inspected);
        let kept = match (inspect, &config.capture) {
            (None, None) => None,
            (Some(i), capture) => {
                let body = i.body.max(capture.as_ref().map_or(0, |c| c.body));
                Some(Kept::new(i.keep, body, i.memory))
            }
            (None, Some(c)) => Some(Kept::new(0, c.body, c.memory)),
        };
        let registry =
            Arc::new(Registry::new(kept, capture).with_front_timeout(config.front_timeout.clone()));
        if let (Some(loaded), Some(c)) = (history, &config.capture) {
            for warning in &loaded.warnings {
                warn!(dir = %c.dir.display(), "capture file {warning}");
            }
            let read = loaded.records.len();
            let (kept, bad) = registry.restore(loaded.records);
            for why in &bad {
                warn!(dir = %c.dir.display(), "a captured request cannot be read back: {why}");
            }
            if read > 0 {
                info!(
                    dir = %c.dir.display(),
                    read,
                    shown = kept,
                    "read {read} captured requests from {}; the inspector shows the last {kept}",
                    c.dir.display()
                );
            }
        }
        let proxy = Proxy::new(&config, connector, registry, health);
        Ok(Server {
            listener,
            proxy: Arc::new(proxy),
            config: Arc::new(config),
            tls,
            closed,
        })
    }

    /// The proxy, which the inspector's replays go through.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.clone()
    }

    /// Where clients connect, for the log and the inspector: `127.0.0.1:9292`, or
    /// `unix:/var/run/uwsgi/keystone-api.socket`.
    pub fn local(&self) -> String {
        self.listener.local()
    }

    /// The in-flight registry, for the SIGUSR1 table.
    pub fn registry(&self) -> Arc<Registry> {
        self.proxy.registry.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests finish for
    /// up to `--drain`. `inspector` is the inspector's address, for the start-up line.
    pub async fn run(self, shutdown: impl Future<Output = ()>, inspector: Option<&str>) {
        let Server {
            listener,
            proxy,
            config,
            tls,
            closed,
        } = self;
        let local = listener.local();
        info!(
            listen = %local,
            uwsgi = config.front == Front::Uwsgi,
            upstream = %config.upstream,
            tls = tls.is_some(),
            takeover = config.takeover.as_ref().map(|p| display(p.display())),
            inspector = inspector.map(display),
            "listening"
        );
        if let Some(front) = &config.front_timeout {
            info!(
                apache_timeout_s = front.limit.as_secs(),
                site = %front.site.display(),
                "Apache ({}) gives up on a request the debug server holds for {} s ({}): a \
                 breakpoint held longer ends in Apache's {} to its client",
                front.site.display(),
                front.limit.as_secs(),
                front.directive,
                front.status
            );
        }
        if config.upstream_insecure {
            warn!(
                "--upstream-insecure: the upstream's TLS certificate is not checked; anyone who can \
                 answer on {} sees every request and token",
                config.upstream.addr
            );
        }
        if listener.is_exposed() {
            warn!(
                listen = %local,
                "listening on a non-loopback address: anyone who can reach {local} reaches glance-api \
                 through this shim"
            );
        }
        tokio::spawn(inflight::watchdog(
            proxy.registry.clone(),
            Rules {
                stall_after: config.stall_after,
                upstream_timeout: config.upstream_timeout,
            },
        ));

        let limits = &config.limits;
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .preserve_header_case(true)
            // Responses are relayed as they come: no Date added where the upstream sent none.
            .auto_date_header(false)
            .keep_alive(true)
            // hyper answers 431 past these.
            .max_header_size(limits.max_header_bytes)
            // Never below the head limit, or a large head would be refused before it.
            .max_buf_size(MAX_BUFFER.max(limits.max_header_bytes))
            .max_headers(limits.max_headers)
            // Its header-read timer also runs on idle connections; `keepalive` times both apart.
            .header_read_timeout(None);
        // The uwsgi protocol carries one request per connection: the answer ends at its close.
        let http = match config.front {
            Front::Http => http,
            Front::Uwsgi => {
                let mut one = http;
                one.keep_alive(false);
                one
            }
        };
        let packets =
            (config.front == Front::Uwsgi).then(|| Arc::new(Packets::new(limits.header_timeout)));
        let (header_timeout, idle_timeout) = (limits.header_timeout, limits.idle_timeout);
        let graceful = GracefulShutdown::new();
        let handshake_failures = Arc::new(RateLimited::default());
        let slow_heads = Arc::new(RateLimited::default());
        let over_limit = Arc::new(RateLimited::default());
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        tokio::spawn(give_back_memory(
            slots.clone(),
            limits.max_connections,
            closed.clone(),
        ));

        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            let conn = match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(5);
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait and try again, never give up serving.
                    error!(error = %e, "accept failed; retrying in {} ms", backoff.as_millis());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Past --max-connections: say so and close; the connections already open carry on.
                let why = format!(
                    "--max-connections ({}) reached: refusing a connection",
                    limits.max_connections
                );
                match conn {
                    Conn::Tcp(stream, peer) => {
                        over_limit.warn(peer, &why);
                        tokio::spawn(refuse(stream));
                    }
                    Conn::Unix(stream) => {
                        over_limit.warn(UNIX, &why);
                        tokio::spawn(refuse(stream));
                    }
                }
                continue;
            };
            let proxy = proxy.clone();
            let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
            let (handshake_failures, slow_heads) = (handshake_failures.clone(), slow_heads.clone());
            let packets = packets.clone();
            let closed = Closed(closed.clone());
            tokio::spawn(async move {
                let _slot = slot; // held for the life of the connection
                let _closed = closed; // counts the connection closed when it is
                let (io, mut client): (Stream, _) = match conn {
                    Conn::Tcp(stream, peer) => {
                        let _ = stream.set_nodelay(true);
                        let io: Stream = match tls {
                            None => Box::new(stream),
                            Some(acceptor) => {
                                match accept_tls(acceptor, stream, peer, &handshake_failures).await
                                {
                                    Some(tls) => Box::new(tls),
                                    None => return,
                                }
                            }
                        };
                        (io, Client::new(peer))
                    }
                    Conn::Unix(stream) => (Box::new(stream), Client::unix()),
                };
                let peer = client.text.clone();
                let (mut io, mut ahead) = (io, Bytes::new());
                if let Some(packets) = &packets {
                    match packets.read(&mut io, &client).await {
                        Some((head, request_client)) => (ahead, client) = (head, request_client),
                        None => return,
                    }
                }
                let clock = Clock::new();
                let service = {
                    let clock = clock.clone();
                    service_fn(move |req| {
                        let serving = clock.serve();
                        let (proxy, client) = (proxy.clone(), client.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                proxy.handle(client, serving, req).await,
                            )
                        }
                    })
                };
                let io = TokioIo::new(ClientIo {
                    ahead,
                    stream: io,
                    clock: clock.clone(),
                });
                let conn = watcher.watch(http.serve_connection(io, service));
                tokio::select! {
                    ended = conn => if let Err(e) = ended {
                        debug!(client = %peer, error = %crate::error::chain(&e), "connection ended with an error");
                    },
                    expired = clock.expired(header_timeout, idle_timeout) => match expired {
                        Expired::Head => slow_heads.warn(&peer, &format!("closed a connection: {expired} ({} s)", header_timeout.as_secs_f64())),
                        Expired::Idle => debug!(client = %peer, "closed a connection: {expired}"),
                    },
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
        let drained = graceful.shutdown();
        tokio::pin!(drained);
        if tokio::time::timeout(config.drain, &mut drained)
            .await
            .is_err()
        {
            let table = proxy.registry.table(std::time::Instant::now());
            warn!("drain time (--drain) is over; exiting with {table}");
            proxy
                .registry
                .cut_off_all("glance-shim shut down before the request finished (--drain ran out)");
            // Requests cut off before glance answered get a 503, the others an aborted connection;
            // whatever is still open after this is dropped with the runtime.
            let _ = tokio::time::timeout(CUT_OFF_GRACE, &mut drained).await;
        } else {
            info!("all connections closed; exiting");
        }
    }
}

/// Connections closed since memory was last given back, past which it is given back.
const BURST: usize = 16;

/// Counts a client connection closed when dropped, however its task ended.
struct Closed(Arc<AtomicUsize>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Gives back to the system the memory that connections left, checking every second: once
/// [`BURST`] of them, the client's and the upstream's, have closed since the last time, and no
/// client is connected.
///
/// glibc keeps the heap's freed pages in the process unless asked. After 64 connections at once
/// (nova's, or `wrk -c64`), their buffers stayed resident, interleaved with the requests the
/// inspector keeps, and a 1 GiB transfer after the burst peaked at 14.4 MiB instead of 11.6 to 11.9
/// (bench/README.md). The libraries close what they no longer need (hyper-util its idle upstream
/// connections, within 10 s); none hands the freed pages back. `malloc_trim` takes about a
/// millisecond of the serving thread, when no client is connected to wait for it. Shown by
/// `the_memory_a_burst_of_connections_left_is_given_back` in tests/hardening.rs.
async fn give_back_memory(
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    closed: Arc<AtomicUsize>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if slots.available_permits() < max || closed.load(Ordering::Relaxed) < BURST {
            continue;
        }
        let connections = closed.swap(0, Ordering::Relaxed);
        let started = Instant::now();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns the allocator's own free pages to the system; it touches
        // no memory in use.
        unsafe {
            libc::malloc_trim(0);
        }
        debug!(
            connections,
            took_us = started.elapsed().as_micros() as u64,
            "gave back the memory {connections} closed connections left"
        );
    }
}

/// Answers a connection over `--max-connections` with a 503 and closes it, without reading it.
async fn refuse(stream: impl AsyncWrite + Unpin) {
    let answer = answer_raw(
        stream,
        StatusCode::SERVICE_UNAVAILABLE,
        "Retry-After: 1\r\n",
        "glance-shim has --max-connections connections open; retry later",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// Answers a connection hyper is not serving with a JSON error, and closes it. `extra` is further
/// header lines, each ending in CRLF.
async fn answer_raw(
    mut stream: impl AsyncWrite + Unpin,
    status: StatusCode,
    extra: &str,
    message: &str,
) {
    let title = status.canonical_reason().unwrap_or("Error");
    let body = serde_json::json!({"message": message, "code": status.as_u16(), "title": title})
        .to_string();
    let answer = format!(
        "HTTP/1.1 {} {title}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n{body}",
        status.as_u16(),
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A client connection as hyper sees it: reads also drive its phase clock. `ahead` is read first:
/// on the uwsgi front, the request's HTTP head made from its packet (and the body bytes read with it).
struct ClientIo {
    ahead: Bytes,
    stream: Stream,
    clock: Arc<Clock>,
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead.split_to(n));
            this.clock.read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.clock.read();
        }
        read
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The TLS handshake with a client. A client that speaks plain HTTP to the TLS port gets a plain
/// HTTP 400 that says so; any failure is logged through `failures` and ends the connection.
async fn accept_tls(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    failures: &RateLimited,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None, // closed, failed or silent: nothing to answer
    }
    // Every TLS connection starts with a handshake record (content type 22).
    if first[0] != 0x16 {
        failures.warn(peer, "plain HTTP sent to the TLS port");
        if first[0].is_ascii_alphabetic() {
            let message = "this port of glance-shim speaks TLS: use https://";
            answer_raw(stream, StatusCode::BAD_REQUEST, "", message).await;
        }
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            failures.warn(peer, &format!("TLS handshake failed: {e}"));
            None
        }
        Err(_) => {
            failures.warn(peer, "TLS handshake not completed within 10 s");
            None
        }
    }
}
