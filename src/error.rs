//! The answers the shim gives itself: which failure, which status, and the OpenStack-style JSON body
//! (`{"message", "code", "title"}`) that tells the developer what happened and what to do.
//!
//! `proxy` classifies failures into a [`ProxyError`]; nothing here does I/O.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::upstream::ConnectError;

/// A request the shim answers itself instead of relaying the upstream's answer.
#[derive(Debug)]
pub enum ProxyError {
    /// The upstream could not be reached at all (502).
    Unreachable(ConnectError),
    /// The upstream took the request and closed the connection without answering (502).
    ClosedEarly(String),
    /// The upstream's answer was not valid HTTP/1.1 (502).
    InvalidResponse(String),
    /// Some other failure talking to the upstream (502).
    Upstream(String),
    /// `--upstream-timeout` ran out with nothing moving (504).
    Timeout(Duration),
    /// The client's upload broke off before it was complete (400; the client is usually gone).
    ClientBody(String),
    /// A request the shim will not forward as it is (400).
    BadRequest(String),
    /// The request target is longer than `--max-uri-bytes` (414).
    UriTooLong { len: usize, max: usize },
    /// CONNECT: the shim forwards only to its upstream, never tunnels (405).
    Connect,
    /// The request already went through this shim: listen and upstream point at each other (508).
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
            ProxyError::ClientBody(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
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

    /// A short reason for the completion line: the full explanation goes to the client, and the log
    /// explains an outage once (see `upstream::Health`), not in every request's line.
    pub fn summary(&self, upstream: &str) -> String {
        match self {
            ProxyError::Unreachable(e) => e.to_string(),
            ProxyError::ClosedEarly(e) => {
                format!("the upstream closed the connection without answering: {e}")
            }
            ProxyError::InvalidResponse(e) => format!("invalid response from the upstream: {e}"),
            ProxyError::Upstream(e) => e.clone(),
            ProxyError::Timeout(d) => format!(
                "no progress from the upstream for {:.1} s (--upstream-timeout)",
                d.as_secs_f64()
            ),
            ProxyError::ClientBody(e) => format!("the client's body broke off: {e}"),
            ProxyError::BadRequest(why) => why.clone(),
            ProxyError::UriTooLong { len, max } => {
                format!("request target of {len} bytes, over {max}")
            }
            ProxyError::Connect => "CONNECT refused".into(),
            ProxyError::Loop => {
                format!("loop: the request came back through glance-shim ({upstream})")
            }
        }
    }

    /// The response the client gets: JSON in the shape glance's own errors have.
    pub fn response(&self, upstream: &str, request_id: &str) -> (Response<Bytes>, String) {
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
        (res, message)
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
        let (res, message) = err.response("127.0.0.1:60999", "req-x");
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
