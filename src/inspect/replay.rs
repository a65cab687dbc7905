//! Replay: a kept request sent again to the upstream through the proxy's own path
//! (`POST /api/replay`), as it was or edited, with a new request id.
//!
//! What a replay sends comes from the request's record:
//! - its method, target and fields as they arrived (the proxy then adds `Via` and `X-Forwarded-*`
//!   as for any request), without the request id (a new one is made) or the framing fields;
//! - its token as it arrived, which is held in memory only, or a fresh one (`token`);
//! - its body, only if it was kept whole and as sent. A body cut at `--inspect-body`, or masked when
//!   it was captured, is refused with the reason: never sent in part.
//!
//! An edit replaces the method, the target, the fields or the body. A field whose value is
//! `<masked>` (as the page shows secrets) keeps the original's value, which never left the shim.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use serde::Deserialize;

use crate::exchange::Exchange;
use crate::headers::is_hop_by_hop;
use crate::mask::MASKED;

/// What the page or `glance-shim replay` asks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    /// The request to send again: its serial number or its request id.
    pub of: String,
    pub method: Option<String>,
    /// A path and query (origin-form): a replay goes to the upstream and nowhere else.
    pub target: Option<String>,
    /// `[name, value]` pairs replacing the original's fields.
    pub headers: Option<Vec<(String, String)>>,
    /// A body replacing the original's (text).
    pub body: Option<String>,
    /// A fresh token for `X-Auth-Token`.
    pub token: Option<String>,
}

/// Why a replay was not sent.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

/// Fields that belong to one message, or that the proxy sets itself; the hop-by-hop fields go too.
const DROPPED: [&str; 3] = ["content-length", "x-openstack-request-id", "expect"];

/// The request to send for `ask`, made from the record `e`.
pub fn build(e: &Exchange, ask: &Ask) -> Result<Request<Option<Bytes>>, Refused> {
    if e.outcome().is_none() {
        return Err(refuse(
            StatusCode::CONFLICT,
            "it is still in flight: replay it once it has ended",
        ));
    }
    let method = match &ask.method {
        Some(m) => Method::from_bytes(m.trim().as_bytes())
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, format!("'{m}' is not a method")))?,
        None => e.method.clone(),
    };
    if method == Method::CONNECT {
        return Err(refuse(StatusCode::BAD_REQUEST, "CONNECT is not replayed"));
    }
    let target = ask.target.as_deref().map_or(e.target.as_str(), str::trim);
    if !target.starts_with('/') {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "'{target}' is not a path: a replay goes to the upstream and nowhere else, so \
                 give a path and query (/v2/images?limit=2)"
            ),
        ));
    }
    let original = e.copies.request_head.as_ref();
    let original_value = |name: &str| original.and_then(|h| h.get(name)).map(<[u8]>::to_vec);
    let fields: Vec<(String, Vec<u8>)> = match &ask.headers {
        Some(edited) => edited
            .iter()
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
            .collect(),
        None => original
            .map(|h| {
                h.fields()
                    .map(|(n, v)| (n.to_owned(), v.to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        if DROPPED.contains(&name.as_str()) || is_hop_by_hop(&name) || name.is_empty() {
            continue;
        }
        // A secret shown as <masked> keeps the value that arrived, which never left the shim.
        let value = match value == MASKED.as_bytes() {
            true => original_value(&name).unwrap_or(value),
            false => value,
        };
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("'{name}' is not a field name"),
            )
        })?;
        let v = HeaderValue::from_bytes(&value).map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("the value of {name} is not a field value"),
            )
        })?;
        headers.append(n, v);
    }
    if let Some(token) = ask
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let v = HeaderValue::from_str(token)
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "the token is not a field value"))?;
        headers.insert("x-auth-token", v);
    }
    if let Some((name, _)) = headers
        .iter()
        .find(|(_, v)| v.as_bytes() == MASKED.as_bytes())
    {
        let why = match (e.from_disk, name.as_str()) {
            (true, "x-auth-token") => "it was read back from disk, where its token was not kept: \
                 give a fresh one (openstack token issue -f value -c id)"
                .to_owned(),
            (true, n) => format!(
                "it was read back from disk, where the value of {n} was not kept: edit the \
                 fields to give it"
            ),
            (false, n) => format!("the value of {n} was not kept: edit the fields to give it"),
        };
        return Err(refuse(StatusCode::CONFLICT, why));
    }
    let body = match &ask.body {
        Some(text) => Some(Bytes::from(text.clone().into_bytes())),
        None => original_body(e)?,
    }
    .filter(|b| !b.is_empty());
    if let Some(b) = &body {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = target.parse().map_err(|_| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("'{target}' is not a request target"),
        )
    })?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The original body, if it was kept whole and as sent.
fn original_body(e: &Exchange) -> Result<Option<Bytes>, Refused> {
    let size = e.bytes_in();
    match e.copies.request_body() {
        Some(k) if k.complete && !k.masked => Ok(Some(Bytes::copy_from_slice(&k.bytes))),
        Some(k) if k.masked => Err(refuse(
            StatusCode::CONFLICT,
            "its body's secret values were masked when it was captured: edit the body to \
             replay it",
        )),
        Some(k) => Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "its {} body was streamed, not kept (only its first {} were): raise --inspect-body, \
                 or --capture-body with --capture, to replay requests of this size",
                bytesize::ByteSize(size).display().iec(),
                bytesize::ByteSize(k.bytes.len() as u64).display().iec(),
            ),
        )),
        None if size == 0 => Ok(None),
        None => Err(refuse(
            StatusCode::CONFLICT,
            format!(
                "its {} body was not kept (the inspector's memory, --inspect-memory, was full)",
                bytesize::ByteSize(size).display().iec()
            ),
        )),
    }
}
