//! The proxy itself, one request at a time, in named phases: arrive (the record, its id, the arrival
//! line) → check and prepare the upstream request → forward it and wait for the response head (unless
//! the request is cut off) → relay the head at once and stream the body, or answer for the upstream.
//!
//! Each phase writes what happened into the request's [`Exchange`]; the completion line is written
//! when the response body lets go of the record (see `exchange`). Connections are `server`'s
//! business, header rules `headers`', ids `correlation`'s.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Incoming};

use crate::body::{ContinueGate, ContinueSignal, Inbound, RequestBody, ResponseBody};
use crate::config::Config;
use crate::correlation::{self, X_OPENSTACK_REQUEST_ID};
use crate::error::ProxyError;
use crate::exchange::{Client, Continue, Exchange, Mark, Outcome, ReplayOf};
use crate::inflight::{ExchangeGuard, Registry};
use crate::keepalive::Serving;
use crate::upstream::{Connector, Health};
use crate::{headers, mask, upstream};

/// What every request needs, shared by all connections.
pub struct Proxy {
    client: hyper_util::client::legacy::Client<Connector, RequestBody>,
    pub registry: Arc<Registry>,
    health: Arc<Health>,
    /// The upstream address as text, for messages.
    upstream_display: String,
    /// ... and as the authority the client picks its connections by.
    upstream_authority: http::uri::Authority,
    /// How clients reach the shim: goes into `X-Forwarded-Proto`.
    client_proto: &'static str,
    log_headers: bool,
    /// Longer request targets are answered 414.
    max_uri_bytes: usize,
    /// `--upstream-timeout`, for the 504's message (the watchdog applies it).
    upstream_timeout: Option<Duration>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        connector: Connector,
        registry: Arc<Registry>,
        health: Arc<Health>,
    ) -> Proxy {
        let upstream_display = config.upstream.addr.to_string();
        Proxy {
            client: upstream::client(connector),
            registry,
            health,
            upstream_authority: upstream_display
                .parse()
                .unwrap_or_else(|_| http::uri::Authority::from_static("upstream")),
            upstream_display,
            client_proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            log_headers: config.log_headers,
            max_uri_bytes: config.limits.max_uri_bytes,
            upstream_timeout: config.upstream_timeout,
        }
    }

    /// Handles one request from `client`; never fails: every failure becomes a response.
    pub async fn handle(
        self: Arc<Self>,
        client: Arc<Client>,
        serving: Serving,
        req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        self.serve(client, serving, req.map(Inbound::Client), None)
            .await
    }

    /// Sends a request again, as a replay of `of`, through the same path as a client's request: a
    /// new id, the log, the inspector, the stall notices, the upstream. Returns the new request's
    /// serial number and id once it is registered; the response is read to its end meanwhile.
    pub async fn replay(
        self: &Arc<Self>,
        client: Arc<Client>,
        req: Request<Option<Bytes>>,
        of: ReplayOf,
    ) -> (u64, String) {
        let (opened, told) = tokio::sync::oneshot::channel();
        let proxy = self.clone();
        tokio::spawn(async move {
            let serving = crate::keepalive::Clock::new().serve();
            let req = req.map(Inbound::Replay);
            let res = proxy.serve(client, serving, req, Some((of, opened))).await;
            // Read to its end, as a client would: that ends the request, and keeps its body's copy.
            let mut body = res.into_body();
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    break;
                }
            }
        });
        told.await.unwrap_or_default()
    }

    async fn serve(
        self: Arc<Self>,
        client: Arc<Client>,
        serving: Serving,
        req: Request<Inbound>,
        replay: Option<(ReplayOf, tokio::sync::oneshot::Sender<(u64, String)>)>,
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
        // As it arrived: a refused request is shown too, and what glance got is derived from it.
        let copies = self.registry.copies(&parts.headers, body.is_end_stream());
        let mut exchange = Exchange::new(
            self.registry.next_serial(),
            assigned,
            parts.method.clone(),
            target,
            client.clone(),
            copies,
        );
        let (replay_of, opened) = replay.unzip();
        exchange.replay_of = replay_of;
        let guard = self.registry.open(exchange, serving);
        let exchange = guard.exchange().clone();
        if let Some(opened) = opened {
            let _ = opened.send((exchange.serial, exchange.id.clone()));
        }
        if body.is_end_stream() {
            exchange.request_body_done();
        }
        exchange.log_arrival(self.log_headers.then(|| mask::for_log(&parts.headers)));

        if let Err(err) = self.prepare(&mut parts, &client) {
            return self.answer(err, guard);
        }
        parts.version = Version::HTTP_11;
        let expects_continue = headers::expects_continue(&parts.headers) && !body.is_end_stream();
        let (gate, held_back) = if !expects_continue {
            (None, None)
        } else if self.health.ignores_expect() {
            exchange.set_expect(Continue::AtOnce);
            (None, None)
        } else {
            let signal = Arc::new(ContinueSignal::default());
            let gate = ContinueGate::new(signal.clone(), self.health.clone());
            (Some(gate), Some(signal))
        };
        let body = RequestBody::new(body, exchange.clone(), gate, &self.registry);
        let mut req = Request::from_parts(parts, body);
        if expects_continue {
            let (signal, health) = (held_back.clone(), self.health.clone());
            hyper::ext::on_informational(&mut req, move |res| {
                if res.status() == http::StatusCode::CONTINUE {
                    health.upstream_answers_expect();
                    if let Some(signal) = &signal {
                        signal.go();
                    }
                }
            });
        }

        // The client picks its connection by the absolute form; the path goes on as it came.
        let path = req.uri().path_and_query().cloned();
        match path.map(|p| upstream::absolute(&self.upstream_authority, p)) {
            Some(Ok(uri)) => *req.uri_mut() = uri,
            _ => {
                let why = format!("the request target {} cannot be forwarded", exchange.target);
                return self.answer(ProxyError::BadRequest(why), guard);
            }
        }
        let mut connection = hyper_util::client::legacy::connect::capture_connection(&mut req);
        let sent = self.client.request(req);
        tokio::pin!(sent);
        let mut connected = false;
        let response = loop {
            tokio::select! {
                response = &mut sent => break response,
                // The request has a connection: it is on its way to glance.
                _ = connection.wait_for_connection_metadata(), if !connected => {
                    connected = true;
                    exchange.mark(Mark::SentUpstream);
                }
                outcome = exchange.cut_off_wait() => {
                let err = match outcome {
                    Outcome::TimedOut => {
                        ProxyError::Timeout(self.upstream_timeout.unwrap_or_default())
                    }
                    _ => ProxyError::Drained,
                };
                    return self.answer(err, guard);
                }
            }
        };
        // Marked here when the connection came in the same turn as the response.
        if connection.connection_metadata().is_some() {
            exchange.mark(Mark::SentUpstream);
        }
        match response {
            Ok(res) => self.relay(res, guard, held_back),
            Err(err) => {
                let err = match exchange.outcome() {
                    // The client's upload broke off, and the upstream exchange with it.
                    Some(Outcome::ClientGone) => {
                        ProxyError::ClientBody(exchange.error().unwrap_or_default().to_owned())
                    }
                    _ => crate::error::classify_upstream(&err),
                };
                self.answer(err, guard)
            }
        }
    }

    /// Checks the request and turns its head into the upstream request's. The path and query go on
    /// exactly as they came, in origin-form.
    fn prepare(&self, parts: &mut http::request::Parts, client: &Client) -> Result<(), ProxyError> {
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
            let path = parts.uri.path_and_query().cloned();
            parts.uri = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        }

        headers::for_upstream(&mut parts.headers, &client.ip, self.client_proto);
        Ok(())
    }

    /// Relays the upstream's response head at once (hop-by-hop fields out, everything else as it
    /// came); its body streams after it.
    fn relay(
        &self,
        res: Response<Incoming>,
        guard: ExchangeGuard,
        held_back: Option<Arc<ContinueSignal>>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = res.into_parts();
        let exchange = guard.exchange();
        // The version belongs to each hop: the shim speaks HTTP/1.1 to its client (hyper answers an
        // HTTP/1.0 client in 1.0) whatever the upstream spoke.
        parts.version = Version::HTTP_11;
        let _ = headers::remove_hop_by_hop(&mut parts.headers);
        let upstream_id = parts
            .headers
            .get(&X_OPENSTACK_REQUEST_ID)
            .map(|v| correlation::printable(v.as_bytes()).into_owned());
        exchange.upstream_answered(parts.status, upstream_id);
        self.registry.answered(exchange, &parts.headers);
        // glance answered before it asked for a body held back for its 100 Continue: the client is
        // never asked for it.
        let held_back = held_back.filter(|signal| signal.answered());
        if held_back.is_some() {
            exchange.set_expect(Continue::NotSent);
        }
        Response::from_parts(parts, ResponseBody::relay(body, guard, held_back))
    }

    /// Answers for the upstream with an OpenStack-style JSON error.
    fn answer(&self, err: ProxyError, guard: ExchangeGuard) -> Response<ResponseBody> {
        let exchange = guard.exchange();
        let res = err.response(&self.upstream_display, &exchange.id);
        exchange.shim_answers(res.status());
        exchange.end(err.outcome(), Some(err.to_string()));
        let (mut parts, bytes): (_, Bytes) = res.into_parts();
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        self.registry.answered(exchange, &parts.headers);
        Response::from_parts(parts, ResponseBody::own(bytes, guard))
    }
}
