//! The inspector: a page that shows every request live, and the JSON API it reads, on their own
//! loopback port (`--inspect`, by default 127.0.0.1:9293).
//!
//! It reads the records the registry holds (`inflight`, `events`) and nothing else; nothing below it
//! knows it exists. Its one write
//! is a replay (`POST /api/replay`), which needs the per-run key the start-up line's address carries.
//! What it serves is guarded:
//! - a request whose `Host` (or `Origin`) names anything but localhost or the inspector's own address
//!   is refused, so a web page elsewhere cannot read it through DNS rebinding;
//! - no CORS header is ever sent;
//! - the Content-Security-Policy allows only the page's own script and style (by hash) and requests to
//!   its own origin;
//! - secrets are masked before they leave the process (see `view`).
//!
//! - `view`: records as JSON. `stream`: the event stream. `har`: HAR 1.2. `replay`: a kept request
//!   made again. `client`: what `glance-shim har` and `glance-shim replay` ask with. `page.html`: the
//!   page, one document with its CSS and plain JavaScript, embedded at build time.

pub mod client;
pub mod har;
pub mod key;
pub mod replay;
mod stream;
pub mod view;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::{Config, Inspect};
use crate::error::StartError;
use crate::exchange::Exchange;
use crate::inflight::Registry;

/// The page: one document, its style and script inline.
const PAGE: &str = include_str!("page.html");

/// The largest replay description read (an edited body is in it).
const REPLAY_ASK_MAX: usize = 16 << 20;

/// Connections the inspector serves at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

/// Binds the inspector's address. The default address only earns a warning when it is taken (the
/// shim proxies without its inspector); an address the user gave is a start-up error.
pub fn bind(inspect: &Inspect) -> Result<Option<TcpListener>, StartError> {
    match inspect.addr.bind(64) {
        Ok(listener) => Ok(Some(listener)),
        Err(error) if !inspect.explicit => {
            warn!(
                inspect = %inspect.addr,
                error = %error,
                "the inspector cannot listen on {} ({error}); proxying without it (choose another \
                 address with --inspect ADDR, or turn it off with --inspect off)",
                inspect.addr
            );
            Ok(None)
        }
        Err(error) => Err(StartError::Inspect {
            addr: inspect.addr.clone(),
            error,
        }),
    }
}

/// Serves the inspector on `listener` for as long as the shim runs, replaying through `proxy` (whose
/// own listener is at `listen`). Returns the page's address, for the start-up line, and the key
/// file written for `glance-shim replay` (removed when dropped).
pub fn start(
    listener: TcpListener,
    config: &Config,
    inspect: &Inspect,
    listen: String,
    proxy: Arc<crate::proxy::Proxy>,
) -> std::io::Result<(String, Option<key::KeyFile>)> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        warn!(
            inspect = %addr,
            "the inspector listens on a non-loopback address: anyone who can reach {addr} sees every \
             request through this shim (secrets masked)"
        );
    }
    let key = key::new();
    let key_file = match key::write_file(addr.port(), &key) {
        Ok(file) => {
            debug!(file = %file.path.display(), "the inspector's key, for glance-shim replay");
            Some(file)
        }
        Err(e) => {
            debug!(error = %e, "the inspector's key was not written for glance-shim replay");
            None
        }
    };
    let url = url(addr, &key);
    let inspector = Inspector::new(config, inspect, listen, proxy, key);
    tokio::spawn(Arc::new(inspector).serve(listener));
    Ok((url, key_file))
}

/// The page's address, with the per-run key that lets it replay requests (as Jupyter prints its
/// token): whoever can read the start-up line may replay; a page elsewhere cannot.
pub fn url(addr: SocketAddr, key: &str) -> String {
    format!("http://{addr}/?key={key}")
}

/// What the inspector serves from.
pub struct Inspector {
    registry: Arc<Registry>,
    /// Where replays are sent from.
    proxy: Arc<crate::proxy::Proxy>,
    /// The per-run key every write needs (`x-glance-shim-key`).
    key: String,
    shim: ShimInfo,
    stall_after: Option<Duration>,
    /// How long Apache in front waits on a request (`--takeover`), when known.
    front_limit: Option<Duration>,
    /// How clients reach the shim, for the fields glance got.
    proto: &'static str,
    /// Host names (without port) that requests may carry, besides the address a connection came in
    /// on.
    hosts: [&'static str; 3],
    csp: HeaderValue,
}

/// The shim's settings, as the page shows them.
#[derive(Debug, Serialize)]
struct ShimInfo {
    listen: String,
    upstream: String,
    stall_after_ms: Option<f64>,
    keep: usize,
    body_max: usize,
    memory_max: usize,
}

impl Inspector {
    pub fn new(
        config: &Config,
        inspect: &Inspect,
        listen: String,
        proxy: Arc<crate::proxy::Proxy>,
        key: String,
    ) -> Inspector {
        Inspector {
            registry: proxy.registry.clone(),
            proxy,
            key,
            shim: ShimInfo {
                listen,
                upstream: config.upstream.to_string(),
                stall_after_ms: config.stall_after.map(crate::exchange::millis),
                keep: inspect.keep,
                body_max: inspect.body,
                memory_max: inspect.memory,
            },
            stall_after: config.stall_after,
            front_limit: config.front_timeout.as_ref().map(|f| f.limit),
            proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            hosts: ["localhost", "127.0.0.1", "[::1]"],
            csp: HeaderValue::from_str(&content_security_policy(PAGE))
                .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
        }
    }

    fn context(&self) -> view::Context {
        view::Context::now(self.stall_after, self.proto).with_front_limit(self.front_limit)
    }

    /// Serves the inspector on `listener` for as long as the shim runs.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .keep_alive(true);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "the inspector's accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // The address this connection came in on is the inspector's own (it may listen on all).
            let own: Arc<str> = match stream.local_addr() {
                Ok(addr) => host_literal(addr.ip()).into(),
                Err(_) => "localhost".into(),
            };
            let inspector = self.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let (inspector, own) = (inspector.clone(), own.clone());
                    async move { Ok::<_, Infallible>(inspector.handle(req, &own, peer).await) }
                });
                if let Err(e) = http.serve_connection(TokioIo::new(stream), service).await {
                    debug!(client = %peer, error = %e, "an inspector connection ended with an error");
                }
            });
        }
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        own: &str,
        peer: SocketAddr,
    ) -> Response<Out> {
        let head = req.method() == Method::HEAD;
        let mut res = self.route(req, own, peer).await;
        let h = res.headers_mut();
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        if head {
            *res.body_mut() = Out::empty();
        }
        res
    }

    async fn route(
        self: &Arc<Self>,
        req: Request<Incoming>,
        own: &str,
        peer: SocketAddr,
    ) -> Response<Out> {
        if let Err(why) = self.check_origin(&req, own) {
            return error(StatusCode::FORBIDDEN, &why);
        }
        let writes = req.uri().path() == "/api/replay";
        let allowed = match writes {
            true => req.method() == Method::POST,
            false => req.method() == Method::GET || req.method() == Method::HEAD,
        };
        if !allowed {
            let (allow, why) = match writes {
                true => ("POST", "a replay is a POST"),
                false => ("GET, HEAD", "the inspector only shows here: GET and HEAD"),
            };
            let mut res = error(StatusCode::METHOD_NOT_ALLOWED, why);
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            return res;
        }
        if writes {
            return self.replay(req, peer).await;
        }
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        match path {
            "/" | "/index.html" => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            ),
            "/api/requests" => {
                let inspector = self.clone();
                let filter = filter(query);
                off_thread(move || serde_json::to_vec(&inspector.list(filter.as_ref()))).await
            }
            "/api/har" => {
                let filter = filter(query).unwrap_or_default();
                let inspector = self.clone();
                let mut res = off_thread(move || serde_json::to_vec(&inspector.har(&filter))).await;
                if res.status() == StatusCode::OK {
                    let name = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                        .to_string()
                        .replace([':', '-'], "");
                    let disposition = format!("attachment; filename=\"glance-shim-{name}.har\"");
                    if let Ok(v) = HeaderValue::from_str(&disposition) {
                        res.headers_mut().insert(header::CONTENT_DISPOSITION, v);
                    }
                }
                res
            }
            "/api/events" => {
                let since = req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .or_else(|| param(query, "since").and_then(|v| v.parse().ok()));
                let reader = stream::Reader {
                    since,
                    filter: filter(query),
                    cx: self.context(),
                };
                let rx = stream::events(self.registry.clone(), reader);
                let mut res = Response::new(Out::Stream(rx));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                res
            }
            _ => match path.strip_prefix("/api/requests/") {
                Some(key) => match self.find(key) {
                    Some(e) => {
                        let cx = self.context();
                        off_thread(move || serde_json::to_vec(&view::detail(&e, &cx))).await
                    }
                    None => error(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "no request {key} is kept (it may have been pushed out: --inspect-keep)"
                        ),
                    ),
                },
                None => error(
                    StatusCode::NOT_FOUND,
                    "nothing here: try / or /api/requests",
                ),
            },
        }
    }

    /// Refuses a request that names another host: `Host` must be localhost or `own`, the address the
    /// connection came in on (any port: an SSH tunnel changes it), and so must `Origin` when there is
    /// one. A page served from any other name (DNS rebinding) is refused, whatever that name resolves
    /// to.
    fn check_origin(&self, req: &Request<Incoming>, own: &str) -> Result<(), String> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .ok_or("a request to the inspector needs a Host header")?;
        if !self.allowed(host, own) {
            return Err(format!(
                "the inspector answers only requests for localhost or its own address, not '{}'",
                crate::correlation::printable(host.as_bytes())
            ));
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let ok = origin
                .strip_prefix("http://")
                .is_some_and(|rest| self.allowed(rest, own));
            if !ok {
                return Err(format!(
                    "the inspector answers only its own pages, not pages from '{}'",
                    crate::correlation::printable(origin.as_bytes())
                ));
            }
        }
        Ok(())
    }

    fn allowed(&self, host_port: &str, own: &str) -> bool {
        let host = strip_port(host_port);
        host.eq_ignore_ascii_case(own) || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    fn list(&self, filter: Option<&view::Filter>) -> List<'_, impl Serialize> {
        // The number first: whatever changes after it comes through the event stream opened with it.
        let seq = self.registry.events().last();
        let cx = self.context();
        let in_flight = self.registry.snapshot();
        let mut recent = self.registry.finished();
        recent.reverse();
        List {
            seq,
            now: view::rfc3339(std::time::SystemTime::now()),
            shim: &self.shim,
            memory_used: self.registry.kept().map_or(0, |k| k.memory_used()),
            in_flight: Summaries(in_flight, cx, filter),
            recent: Summaries(recent, cx, filter),
        }
    }

    /// The requests in flight and kept that `filter` matches, oldest first, as HAR.
    fn har(&self, filter: &view::Filter) -> har::Har {
        let cx = self.context();
        let mut all = self.registry.finished();
        all.extend(self.registry.snapshot());
        all.retain(|e| filter.matches(&view::summary(e, &cx)));
        let comment = format!(
            "glance-shim {} in front of {}: {} requests",
            self.shim.listen,
            self.shim.upstream,
            all.len()
        );
        har::archive(&all, &cx, Some(comment))
    }

    /// `POST /api/replay`: checks the key and the body, then sends the request again through the
    /// proxy. Answers 202 with the new request's serial number and id, once it is registered.
    async fn replay(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Out> {
        let given = req
            .headers()
            .get("x-glance-shim-key")
            .map_or(&b""[..], HeaderValue::as_bytes);
        // In constant time: the key is the only thing standing between a local process and a replay.
        let matches = given.len() == self.key.len()
            && given
                .iter()
                .zip(self.key.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !matches {
            return error(
                StatusCode::FORBIDDEN,
                "a replay needs the inspector's key (x-glance-shim-key): open the inspector from the \
                 address in glance-shim's start-up line, which carries it",
            );
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.trim().starts_with("application/json"));
        if !json {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "a replay is asked for in JSON (Content-Type: application/json)",
            );
        }
        let body = match http_body_util::Limited::new(req.into_body(), REPLAY_ASK_MAX)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the replay's description could not be read whole: {e}"),
                );
            }
        };
        let ask: replay::Ask = match serde_json::from_slice(&body) {
            Ok(ask) => ask,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("not a replay: {e}")),
        };
        let Some(original) = self.find(&ask.of) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no request {} is kept (it may have been pushed out: --inspect-keep)",
                    ask.of
                ),
            );
        };
        let req = match replay::build(&original, &ask) {
            Ok(req) => req,
            Err(refused) => {
                return error(
                    refused.status,
                    &format!(
                        "request {} is not replayed: {}",
                        original.id, refused.message
                    ),
                );
            }
        };
        let of = crate::exchange::ReplayOf {
            serial: original.serial,
            id: original.id.clone(),
        };
        let (serial, id) = self
            .proxy
            .replay(crate::exchange::Client::new(peer), req, of)
            .await;
        let body = serde_json::json!({"serial": serial, "id": id, "replay_of": original.serial});
        respond(
            StatusCode::ACCEPTED,
            "application/json",
            Bytes::from(body.to_string()),
        )
    }

    /// A request by serial number, or the newest with this request id.
    fn find(&self, key: &str) -> Option<Arc<Exchange>> {
        if let Ok(serial) = key.parse::<u64>() {
            return self.registry.find(serial);
        }
        let mut all = self.registry.snapshot();
        all.extend(self.registry.finished());
        all.into_iter()
            .filter(|e| e.id == key)
            .max_by_key(|e| e.serial)
    }
}

#[derive(Serialize)]
struct List<'a, S: Serialize> {
    seq: u64,
    now: String,
    shim: &'a ShimInfo,
    /// Bytes of heads and bodies kept now (at most `shim.memory_max`).
    memory_used: usize,
    in_flight: S,
    recent: S,
}

/// Records rendered as summaries when serialized, each saying whether the filter shows it.
struct Summaries<'f>(Vec<Arc<Exchange>>, view::Context, Option<&'f view::Filter>);

impl Serialize for Summaries<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| view::filtered(e, &self.1, self.2)))
    }
}

/// The `filter` a reader gave, as the page's filter box holds it; `None` when it gave none (or an
/// empty one).
fn filter(query: &str) -> Option<view::Filter> {
    let filter = view::Filter::parse(&param_decoded(query, "filter")?);
    (!filter.is_empty()).then_some(filter)
}

fn host_literal(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// `host` without its `:port`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The value of `name` in a query string, decoded (`+` is a space, `%XX` a byte).
fn param_decoded(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The policy for `page`: nothing but its one inline script and style (by hash) and requests to its
/// own origin.
fn content_security_policy(page: &str) -> String {
    let hash = |open: &str, close: &str| {
        let text = page
            .split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map_or("", |(inner, _)| inner);
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("<script>", "</script>"),
        hash("<style>", "</style>"),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Out> {
    let mut res = Response::new(Out::full(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// JSON rendered on a blocking thread: the list of 1,000 kept requests is half a megabyte, and the
/// proxy's one thread must not stop for it (measured: 2-7 ms).
async fn off_thread(
    render: impl FnOnce() -> serde_json::Result<Vec<u8>> + Send + 'static,
) -> Response<Out> {
    match tokio::task::spawn_blocking(render).await {
        Ok(Ok(body)) => respond(StatusCode::OK, "application/json", Bytes::from(body)),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Out> {
    let body = serde_json::json!({"message": message, "code": status.as_u16()}).to_string();
    respond(status, "application/json", Bytes::from(body))
}

/// The inspector's response bodies: whole, or an event stream fed by its task.
pub enum Out {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Out {
    fn full(b: Bytes) -> Out {
        Out::Full(Some(b))
    }

    fn empty() -> Out {
        Out::Full(None)
    }
}

impl Body for Out {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            Out::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Out::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Out::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Out::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Out::Full(None) => SizeHint::with_exact(0),
            Out::Stream(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_part_of_the_host() {
        assert_eq!(strip_port("localhost:9293"), "localhost");
        assert_eq!(strip_port("[::1]:9293"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("127.0.0.1"), "127.0.0.1");
        assert_eq!(strip_port("evil.example:80"), "evil.example");
    }

    #[test]
    fn the_policy_names_the_pages_script_and_style() {
        let csp = content_security_policy(PAGE);
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{csp}"
        );
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(PAGE.matches("<script>").count(), 1, "one inline script");
        assert_eq!(PAGE.matches("<style>").count(), 1, "one inline style");
        assert!(
            !PAGE.contains("<script "),
            "no script with attributes (src=...)"
        );
        let digest = ring::digest::digest(&ring::digest::SHA256, b"");
        let empty = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        assert!(
            !csp.contains(&empty),
            "an empty hash means a missing element: {csp}"
        );
    }
}
