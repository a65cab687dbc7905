//! The proxy itself, one request at a time: arrive (id, registry, arrival line) → check → prepare the
//! upstream request → forward and wait (with optional idle timeout) → relay the response or answer for
//! the upstream. The completion line is written by the response body when it ends (see `body`).
//!
//! Connection handling lives in `server`; header rules in `headers`; the ids in `correlation`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use tracing::{info, warn};

use crate::body::{Completion, RequestBody, ResponseBody, error_chain};
use crate::config::Config;
use crate::correlation::{self, X_OPENSTACK_REQUEST_ID};
use crate::error::ProxyError;
use crate::headers::{self, Forwarded};
use crate::inflight::{Entry, Guard, Registry, Waiting};
use crate::upstream::{Lease, Pool, UpstreamError};

/// What the requests of one client connection share, rendered once when it is accepted.
#[derive(Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// `addr` as text, for the log.
    pub text: Box<str>,
    /// The client's IP as it is appended to `X-Forwarded-For`.
    pub ip: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Arc<Client> {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Arc::new(Client {
            addr,
            text: addr.to_string().into_boxed_str(),
            ip,
        })
    }
}

/// What every request needs, shared by all connections.
pub struct Proxy {
    pub pool: Arc<Pool>,
    pub registry: Arc<Registry>,
    /// The upstream address as text, for messages.
    upstream_display: String,
    /// How clients reach the shim: goes into `X-Forwarded-Proto`.
    client_proto: &'static str,
    log_headers: bool,
    upstream_timeout: Option<Duration>,
    /// Longer request targets are answered 414.
    max_uri_bytes: usize,
}

impl Proxy {
    pub fn new(config: &Config, pool: Arc<Pool>, registry: Arc<Registry>) -> Proxy {
        Proxy {
            pool,
            registry,
            upstream_display: config.upstream.addr.to_string(),
            client_proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            log_headers: config.log_headers,
            upstream_timeout: config.upstream_timeout,
            max_uri_bytes: config.limits.max_uri_bytes,
        }
    }

    /// Handles one request from `client`; never fails: every failure becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = req.into_parts();
        let assigned = correlation::assign(&mut parts.headers);
        let target = match parts.uri.authority() {
            // Absolute-form (`GET http://host/path`): show what the client wrote.
            Some(_) => parts.uri.to_string(),
            None => parts
                .uri
                .path_and_query()
                .map_or("/", PathAndQuery::as_str)
                .to_owned(),
        };
        let guard = self.registry.register(
            assigned.id.clone(),
            parts.method.clone(),
            target,
            client.addr,
        );
        let entry = &guard.entry;
        let logged_headers = self.log_headers.then(|| headers::for_log(&parts.headers));
        // Logged before anything is sent upstream, and out within a millisecond (see `logging`): when a
        // breakpoint holds this request, this line is in the log.
        info!(
            id = entry.id.as_str(),
            method = entry.method.as_str(),
            path = entry.target.as_str(),
            client = &*client.text,
            id_from = if assigned.from_client {
                "client"
            } else {
                "shim"
            },
            headers = logged_headers,
            "arrived"
        );
        if let Some(why) = &assigned.replaced {
            warn!(
                id = entry.id.as_str(),
                original = assigned.original.as_deref().unwrap_or(""),
                "{why}; sent glance-shim's id {} instead",
                entry.id
            );
        }

        let upstream_req = match self.prepare(&mut parts, &client) {
            Ok(uri) => {
                parts.uri = uri;
                parts.version = Version::HTTP_11;
                Request::from_parts(parts, RequestBody::new(body, entry.clone()))
            }
            Err(err) => return self.answer(err, guard),
        };

        let (res, lease, headers_after) = match self.send(upstream_req, entry).await {
            Ok(sent) => sent,
            Err(err) => return self.answer(err, guard),
        };
        // Read the first body frame before relaying the head: a body that is broken from its first
        // byte (bad chunk framing, the upstream gone) then gets a 502 instead of a head and an abort.
        let (parts, mut body) = res.into_parts();
        let first = if body.is_end_stream() {
            None
        } else {
            let frame = body.frame();
            let frame = match self.upstream_timeout {
                None => frame.await,
                Some(limit) => match tokio::time::timeout(limit, frame).await {
                    Ok(frame) => frame,
                    Err(_) => return self.answer(ProxyError::Timeout(limit), guard),
                },
            };
            match frame {
                None => None,
                Some(Ok(frame)) => Some(frame),
                Some(Err(e)) => {
                    let why = error_chain(&e);
                    let err = if e.is_incomplete_message() {
                        ProxyError::ClosedEarly(why)
                    } else {
                        ProxyError::InvalidResponse(why)
                    };
                    return self.answer(err, guard); // the lease is dropped: never reused
                }
            }
        };
        self.relay(parts, body, first, lease, headers_after, guard)
    }

    /// Checks the request and turns its headers into the upstream request's; returns the upstream URI.
    fn prepare(
        &self,
        parts: &mut http::request::Parts,
        client: &Client,
    ) -> Result<Uri, ProxyError> {
        if parts.method == Method::CONNECT {
            return Err(ProxyError::Connect);
        }
        let target_len = parts.uri.path_and_query().map_or(0, |p| p.as_str().len())
            + parts.uri.authority().map_or(0, |a| a.as_str().len());
        if target_len > self.max_uri_bytes {
            return Err(ProxyError::UriTooLong {
                len: target_len,
                max: self.max_uri_bytes,
            });
        }
        if headers::has_our_via(&parts.headers) {
            return Err(ProxyError::Loop);
        }
        headers::check_host(&parts.headers, parts.version == Version::HTTP_11).map_err(|p| {
            ProxyError::BadRequest(match p {
                headers::HostProblem::Missing => "an HTTP/1.1 request needs a Host header".into(),
                headers::HostProblem::Repeated(n) => {
                    format!("the request has {n} Host headers; one is allowed")
                }
            })
        })?;
        if let Some(authority) = parts.uri.authority() {
            // Absolute-form is only for proxies; accept it when it names the host the request is for,
            // and never let it steer the shim anywhere but its upstream.
            let host = parts.headers.get(header::HOST).map(HeaderValue::as_bytes);
            if host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
                return Err(ProxyError::BadRequest(format!(
                    "the request target names {authority}, but glance-shim only forwards to its upstream; \
                     send the path alone (origin-form)"
                )));
            }
        }

        // A chunked request body must stay chunked; hyper would otherwise send no body at all for a
        // GET or HEAD with unknown length.
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        headers::remove_hop_by_hop(&mut parts.headers);
        // The shim answers `100 Continue` itself (hyper does when the body is first read), so the
        // upstream must not wait for a 100 it will never see sent on: uWSGI never sends one.
        parts.headers.remove(header::EXPECT);
        if chunked && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let host = parts.headers.get(header::HOST).cloned();
        headers::add_forwarding(
            &mut parts.headers,
            &Forwarded {
                client_ip: &client.ip,
                proto: self.client_proto,
                host: host.as_ref(),
            },
        );

        // Origin-form, exactly as the client wrote it: hyper writes the URI as given.
        if parts.uri.authority().is_none() {
            return Ok(std::mem::take(&mut parts.uri));
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Ok(Uri::from(path))
    }

    /// Sends the request and waits for the response headers, for as long as it takes unless
    /// `--upstream-timeout` is set; then for as long as the upstream keeps making progress.
    async fn send(
        &self,
        req: Request<RequestBody>,
        entry: &Arc<Entry>,
    ) -> Result<(Response<Incoming>, Lease, Duration), ProxyError> {
        let fut = self.pool.send(req);
        let result = match self.upstream_timeout {
            None => fut.await,
            Some(limit) => {
                tokio::pin!(fut);
                loop {
                    let idle = entry.idle(std::time::Instant::now());
                    if idle >= limit && entry.waiting() == Waiting::Upstream {
                        return Err(ProxyError::Timeout(limit));
                    }
                    // Not idle for long enough yet, or waiting on the client's upload (not the
                    // upstream's fault): look again when the limit could next be reached.
                    let wait = if idle >= limit { limit } else { limit - idle };
                    tokio::select! {
                        r = &mut fut => break r,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        let headers_after = entry.started.elapsed();
        result
            .map(|(res, lease)| (res, lease, headers_after))
            .map_err(|e| classify(&e, entry))
    }

    /// Relays the upstream's response: hop-by-hop fields out, everything else as it came.
    fn relay(
        &self,
        mut parts: http::response::Parts,
        body: Incoming,
        first: Option<hyper::body::Frame<Bytes>>,
        lease: Lease,
        headers_after: Duration,
        guard: Guard,
    ) -> Response<ResponseBody> {
        // A connection the upstream will close is not worth returning to the pool.
        let reusable = parts.version == Version::HTTP_11 && !headers::says_close(&parts.headers);
        // The version belongs to each hop: the shim speaks HTTP/1.1 to its client (hyper answers an
        // HTTP/1.0 client in 1.0) whatever the upstream spoke.
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        let upstream_id = parts
            .headers
            .get(&X_OPENSTACK_REQUEST_ID)
            .map(|v| correlation::printable(v.as_bytes()));
        guard
            .entry
            .resumed(guard.entry.idle(std::time::Instant::now()));
        guard.entry.progress(Waiting::Upstream);
        let completion = Completion {
            guard,
            status: parts.status,
            upstream_headers: Some(headers_after),
            upstream_id,
            error: None,
        };
        let lease = reusable.then_some(lease);
        Response::from_parts(
            parts,
            ResponseBody::upstream(body, first, completion, lease, self.upstream_timeout),
        )
    }

    /// Answers for the upstream with an OpenStack-style JSON error.
    fn answer(&self, err: ProxyError, guard: Guard) -> Response<ResponseBody> {
        let (res, _) = err.response(&self.upstream_display, &guard.entry.id);
        let (parts, bytes): (_, Bytes) = res.into_parts();
        let completion = Completion {
            guard,
            status: parts.status,
            upstream_headers: None,
            upstream_id: None,
            error: Some(err.summary(&self.upstream_display)),
        };
        let mut res = Response::from_parts(parts, ResponseBody::full(bytes, Some(completion)));
        let len = HeaderValue::from(res.body().size_hint().exact().unwrap_or(0));
        res.headers_mut().insert(header::CONTENT_LENGTH, len);
        res
    }
}

/// Sorts a failed upstream exchange into what the client should be told.
fn classify(err: &UpstreamError, entry: &Entry) -> ProxyError {
    let err = match err {
        UpstreamError::Connect(connect) => return ProxyError::Unreachable(connect.clone()),
        UpstreamError::Http(e) => e,
    };
    let chain = error_chain(err);
    if entry.client_body_failed.load(Ordering::Relaxed) {
        return ProxyError::ClientBody(chain);
    }
    if err.is_incomplete_message() || err.is_canceled() {
        return ProxyError::ClosedEarly(chain);
    }
    if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        return ProxyError::InvalidResponse(chain);
    }
    if let Some(io) = find_source::<std::io::Error>(err)
        && matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        )
    {
        return ProxyError::ClosedEarly(chain);
    }
    ProxyError::Upstream(chain)
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}
