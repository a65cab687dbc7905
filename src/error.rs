//! The shim's errors: what keeps it from starting ([`StartError`], with the exit status each earns),
//! and the answers it gives a request itself ([`ProxyError`]: which failure, which status, which
//! [`Outcome`], and the OpenStack-style JSON body, `{"message", "code", "title"}`, that tells the
//! developer what happened and what to do).
//!
//! `proxy` classifies failures into a [`ProxyError`]; nothing here does I/O.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::config::{HostPort, Listen};
use crate::exchange::Outcome;
use crate::upstream::ConnectError;

/// What keeps the shim from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS file given by a flag cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `--log-file` cannot be opened.
    #[error(transparent)]
    LogFile(#[from] crate::logging::LogFileError),
    /// The listening address cannot be bound.
    #[error("cannot listen on {addr}{hint}")]
    Bind {
        addr: Listen,
        hint: &'static str,
        #[source]
        error: std::io::Error,
    },
    /// A unix socket a server still accepts on: taking it would cut that server off.
    #[error(
        "cannot listen on {}: a server accepts connections there; stop it first{}",
        path.display(),
        unit.map(|u| format!(" (sudo systemctl stop {u})")).unwrap_or_default()
    )]
    SocketInUse {
        path: PathBuf,
        unit: Option<&'static str>,
    },
    #[error(
        "cannot serve the inspector on {addr} (--inspect): {error}{}",
        bind_hint(error)
    )]
    Inspect {
        addr: HostPort,
        #[source]
        error: std::io::Error,
    },
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
}

fn bind_hint(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        " (choose another address with --inspect ADDR, or --inspect off)"
    } else {
        ""
    }
}

impl StartError {
    /// 2 when a flag's value cannot be used, as for every usage error; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Tls(_)
            | StartError::LogFile(_)
            | StartError::Inspect { .. }
            | StartError::Capture(_)
            | StartError::SocketInUse { .. } => 2,
            StartError::Bind { .. } | StartError::Runtime(_) => 1,
        }
    }

    pub fn bind(addr: &Listen, error: std::io::Error) -> StartError {
        let hint = match (addr, error.kind()) {
            (Listen::Tcp(_), std::io::ErrorKind::AddrInUse) => {
                " (something already listens there: devstack@g-api's uWSGI, or another glance-shim?)"
            }
            (Listen::Unix(_), std::io::ErrorKind::NotFound) => {
                " (its directory does not exist; DevStack makes /var/run/uwsgi)"
            }
            (Listen::Unix(_), std::io::ErrorKind::PermissionDenied) => {
                " (run glance-shim as the user DevStack runs uWSGI as, or with sudo)"
            }
            _ => "",
        };
        StartError::Bind {
            addr: addr.clone(),
            hint,
            error,
        }
    }
}

/// An error and its causes on one line: hyper's `Display` shows only the outermost level.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The first error of type `T` in `err`'s chain of causes.
pub fn find_source<'a, T: std::error::Error + 'static>(
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

/// Sorts a failed exchange with the upstream: a broken or refused connection, or an answer that is not
/// HTTP/1.1.
pub fn classify_upstream(err: &(dyn std::error::Error + 'static)) -> ProxyError {
    let why = chain(err);
    if let Some(connect) = find_source::<ConnectError>(err) {
        return ProxyError::Unreachable(connect.clone());
    }
    if let Some(e) = find_source::<hyper::Error>(err) {
        if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
            return ProxyError::InvalidResponse(why);
        }
        if e.is_incomplete_message() || e.is_canceled() {
            return ProxyError::ClosedEarly(why);
        }
    }
    match find_source::<std::io::Error>(err).map(std::io::Error::kind) {
        Some(std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput) => {
            ProxyError::InvalidResponse(why)
        }
        Some(
            std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof,
        ) => ProxyError::ClosedEarly(why),
        _ => ProxyError::Upstream(why),
    }
}

/// A request the shim answers itself instead of relaying the upstream's answer. Its `Display` is the
/// short reason for the completion line: the full explanation, [`ProxyError::message`], goes to the
/// client, and the log explains an outage once (see `upstream::Health`), not in every request's line.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached at all (502).
    #[error("{0}")]
    Unreachable(ConnectError),
    /// The upstream took the request and closed the connection without answering (502).
    #[error("the upstream closed the connection without answering: {0}")]
    ClosedEarly(String),
    /// The upstream's answer was not valid HTTP/1.1 (502).
    #[error("invalid response from the upstream: {0}")]
    InvalidResponse(String),
    /// Some other failure talking to the upstream (502).
    #[error("{0}")]
    Upstream(String),
    /// `--upstream-timeout` ran out with nothing moving (504).
    #[error("no progress from the upstream for {:.1} s (--upstream-timeout)", .0.as_secs_f64())]
    Timeout(Duration),
    /// The shim shut down before the upstream answered (503).
    #[error("glance-shim shut down before the upstream answered")]
    Drained,
    /// The client's upload broke off before it was complete (400; the client is usually gone).
    #[error("the client's body broke off: {0}")]
    ClientBody(String),
    /// A request the shim will not forward as it is (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request target is longer than `--max-uri-bytes` (414).
    #[error("request target of {len} bytes, over {max}")]
    UriTooLong { len: usize, max: usize },
    /// CONNECT: the shim forwards only to its upstream, never tunnels (405).
    #[error("CONNECT refused")]
    Connect,
    /// The request already went through this shim: listen and upstream point at each other (508).
    #[error("loop: the request came back through glance-shim")]
    Loop,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unreachable(_)
            | ProxyError::ClosedEarly(_)
            | ProxyError::InvalidResponse(_)
            | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Drained => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientBody(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
        }
    }

    /// How the request ended, for its record.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::Unreachable(_) => Outcome::UpstreamUnreachable,
            ProxyError::ClosedEarly(_) | ProxyError::Upstream(_) => Outcome::UpstreamBrokeOff,
            ProxyError::InvalidResponse(_) => Outcome::UpstreamInvalid,
            ProxyError::Timeout(_) => Outcome::TimedOut,
            ProxyError::Drained => Outcome::Drained,
            ProxyError::ClientBody(_) => Outcome::ClientGone,
            ProxyError::BadRequest(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::Connect
            | ProxyError::Loop => Outcome::Refused,
        }
    }

    /// What went wrong and what to do about it, for the client and the log.
    pub fn message(&self, upstream: &str) -> String {
        match self {
            ProxyError::Unreachable(ConnectError::Refused { waited, .. }) => {
                let waited = match waited {
                    Some(w) => format!(" (still, after waiting {:.1} s)", w.as_secs_f64()),
                    None => String::new(),
                };
                format!(
                    "glance-shim could not reach the upstream glance-api: nothing listens on \
                     {upstream}{waited}. Is the debug glance-api running? Start it (or restart the \
                     debugger) and retry; glance-shim --wait-upstream 30s holds requests while it restarts."
                )
            }
            ProxyError::Unreachable(ConnectError::Tls { message, untrusted: true, .. }) => format!(
                "glance-shim could not reach the upstream glance-api at {upstream}: {message}. Give \
                 glance-shim the CA that signed it with --upstream-ca (DevStack's tls-proxy keeps it in \
                 /opt/stack/data/ca-bundle.pem), or --upstream-insecure for a throwaway setup."
            ),
            ProxyError::Unreachable(e) => format!(
                "glance-shim could not reach the upstream glance-api at {upstream}: {e}. Check that \
                 --upstream names the address the debug glance-api listens on."
            ),
            ProxyError::ClosedEarly(e) => format!(
                "the upstream glance-api at {upstream} closed the connection without answering ({e}). \
                 Did it crash or restart? Its own log says why."
            ),
            ProxyError::InvalidResponse(e) => format!(
                "the upstream at {upstream} answered with something that is not valid HTTP/1.1 ({e}). \
                 Is --upstream pointing at glance-api?"
            ),
            ProxyError::Upstream(e) => {
                format!("glance-shim failed while talking to the upstream at {upstream}: {e}")
            }
            ProxyError::Timeout(d) => format!(
                "the upstream at {upstream} made no progress for {:.1} s (--upstream-timeout). Leave \
                 --upstream-timeout unset to wait at a breakpoint for as long as it takes.",
                d.as_secs_f64()
            ),
            ProxyError::Drained => format!(
                "glance-shim shut down before the upstream at {upstream} answered (--drain ran out). \
                 Start glance-shim again and retry."
            ),
            ProxyError::ClientBody(e) => {
                format!("the request body from the client broke off before it was complete: {e}")
            }
            ProxyError::BadRequest(why) => why.clone(),
            ProxyError::UriTooLong { len, max } => format!(
                "the request target is {len} bytes long; glance-shim forwards at most {max} \
                 (--max-uri-bytes)"
            ),
            ProxyError::Connect => {
                "glance-shim forwards requests to its upstream glance-api only; CONNECT tunnels are refused."
                    .into()
            }
            ProxyError::Loop => format!(
                "this request has already passed through glance-shim: --listen and --upstream \
                 ({upstream}) lead back to each other. Point --upstream at the debug glance-api."
            ),
        }
    }

    /// The response the client gets: JSON in the shape glance's own errors have.
    pub fn response(&self, upstream: &str, request_id: &str) -> Response<Bytes> {
        let status = self.status();
        let message = self.message(upstream);
        let body = serde_json::json!({
            "message": message,
            "code": status.as_u16(),
            "title": status.canonical_reason().unwrap_or("Error"),
            "request_id": request_id,
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut res = Response::new(Bytes::from(bytes));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(id) = HeaderValue::from_str(request_id) {
            h.insert(crate::correlation::X_OPENSTACK_REQUEST_ID.clone(), id);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if status.is_client_error() {
            // After a request the shim refused, what follows on the connection cannot be trusted to
            // be framed as the client meant (a body not read, a second request smuggled in): close.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_is_a_502_that_says_what_to_do() {
        let err = ProxyError::Unreachable(ConnectError::Refused {
            addr: "127.0.0.1:60999".into(),
            waited: None,
        });
        let res = err.response("127.0.0.1:60999", "req-x");
        let message = err.message("127.0.0.1:60999");
        assert_eq!(res.status(), 502);
        assert_eq!(res.headers()["content-type"], "application/json");
        assert_eq!(res.headers()["x-openstack-request-id"], "req-x");
        let body: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(body["code"], 502);
        assert_eq!(body["title"], "Bad Gateway");
        assert_eq!(body["message"], message.as_str());
        let m = body["message"].as_str().unwrap();
        assert!(
            m.contains("127.0.0.1:60999") && m.contains("nothing listens"),
            "{m}"
        );
        assert!(m.contains("Is the debug glance-api running?"), "{m}");
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(ProxyError::Loop.status(), 508);
        assert_eq!(ProxyError::Connect.status(), 405);
        assert_eq!(ProxyError::BadRequest("x".into()).status(), 400);
        assert_eq!(ProxyError::ClosedEarly("x".into()).status(), 502);
    }
}
