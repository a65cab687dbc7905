//! Records as HAR 1.2 (<http://www.softwareishard.com/blog/har-12-spec/>), the archive format browsers'
//! developer tools, mitmproxy and HTTP Toolkit read and write.
//!
//! Each entry is read from the request's [`Exchange`] when the archive is made, like the inspector's
//! views, and masked the same way: header values as in the log, JSON fields that name a secret. What
//! HAR has no field for travels in `_` fields: the id glance logs (`_request_id`), glance's own
//! (`_upstream_request_id`), the shim's `_outcome`, and `_truncated` on a body kept only in part.
//!
//! A body is never dropped silently:
//! - its `size` is the real one, whatever was kept;
//! - a JSON body kept whole is carried masked;
//! - any other kept bytes are carried as they are (base64 when they are not UTF-8), unless they
//!   contain a word that names a secret, which could not be masked in them: then they are left out
//!   and a `comment` says so;
//! - a body kept only in part carries its kept start, `_truncated: true` and a `comment`.

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine as _;
use serde::Serialize;

use super::view::{self, Context, Summary};
use crate::copies::{Head, KeptBody};
use crate::exchange::{Exchange, Mark};
use crate::mask::{self, MASKED};

/// A whole archive.
#[derive(Debug, Serialize)]
pub struct Har {
    pub log: Log,
}

#[derive(Debug, Serialize)]
pub struct Log {
    pub version: &'static str,
    pub creator: Creator,
    pub entries: Vec<Entry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Creator {
    pub name: &'static str,
    pub version: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub started_date_time: String,
    /// Milliseconds from arrival to the end (or to now, for a request still in flight): the sum of
    /// the timings.
    pub time: f64,
    pub request: Request,
    pub response: Response,
    pub cache: Empty,
    pub timings: Timings,
    #[serde(rename = "_serial")]
    pub serial: u64,
    /// The id glance logs for the request.
    #[serde(rename = "_request_id")]
    pub request_id: String,
    /// Where that id came from: `client` or `shim`.
    #[serde(rename = "_request_id_from")]
    pub request_id_from: &'static str,
    /// The `x-openstack-request-id` glance answered with.
    #[serde(rename = "_upstream_request_id")]
    pub upstream_request_id: Option<String>,
    /// How it ended (the log's `outcome`); `null` while it is in flight.
    #[serde(rename = "_outcome")]
    pub outcome: Option<&'static str>,
    #[serde(rename = "_in_flight")]
    pub in_flight: bool,
    #[serde(rename = "_client")]
    pub client: String,
    /// Read back from a capture directory rather than seen by the shim that wrote the archive.
    #[serde(rename = "_from_disk", skip_serializing_if = "std::ops::Not::not")]
    pub from_disk: bool,
    /// A replay: the id of the request it sent again.
    #[serde(rename = "_replay_of", skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<String>,
    #[serde(rename = "_error", skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Empty {}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub method: String,
    pub url: String,
    pub http_version: &'static str,
    pub cookies: [(); 0],
    pub headers: Vec<Pair>,
    pub query_string: Vec<Pair>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_data: Option<PostData>,
    pub headers_size: i64,
    pub body_size: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// 0 when the client got no response.
    pub status: u16,
    pub status_text: String,
    pub http_version: &'static str,
    pub cookies: [(); 0],
    pub headers: Vec<Pair>,
    pub content: Content,
    #[serde(rename = "redirectURL")]
    pub redirect_url: String,
    pub headers_size: i64,
    pub body_size: i64,
    /// Why there is no response (with `status` 0), as mitmproxy writes it.
    #[serde(rename = "_error", skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Pair {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostData {
    pub mime_type: String,
    pub text: String,
    /// `base64` when `text` holds bytes that are not UTF-8 (HAR's `postData` has no `encoding`).
    #[serde(rename = "_encoding", skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
    #[serde(flatten)]
    pub kept: Kept,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    pub size: i64,
    pub mime_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
    #[serde(flatten)]
    pub kept: Kept,
}

/// What a body carries of what was kept.
#[derive(Debug, Default, Serialize)]
pub struct Kept {
    /// Only the start of the body is carried (or none of it).
    #[serde(rename = "_truncated", skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Bytes of the body the shim kept.
    #[serde(rename = "_kept")]
    pub kept: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Milliseconds. `send`: arrival until the request was handed to glance and its body received;
/// `wait`: from then until glance's response head (the time glance took, a breakpoint included);
/// `receive`: from then until the end. What HAR's other timings measure is not known per request.
#[derive(Debug, Serialize)]
pub struct Timings {
    pub blocked: f64,
    pub dns: f64,
    pub connect: f64,
    pub ssl: f64,
    pub send: f64,
    pub wait: f64,
    pub receive: f64,
}

/// An archive of `records` (oldest first, as HAR lists them).
pub fn archive(records: &[std::sync::Arc<Exchange>], cx: &Context, comment: Option<String>) -> Har {
    Har {
        log: Log {
            version: "1.2",
            creator: Creator {
                name: "glance-shim",
                version: env!("CARGO_PKG_VERSION"),
            },
            entries: records.iter().map(|e| entry(e, cx)).collect(),
            comment,
        },
    }
}

/// One request as a HAR entry.
pub fn entry(e: &Exchange, cx: &Context) -> Entry {
    let summary = view::summary(e, cx);
    let end = e
        .at(Mark::Done)
        .unwrap_or_else(|| cx.now.saturating_duration_since(e.arrived));
    let timings = timings(e, end);
    let request_head = e.copies.request_head.as_ref();
    let response_head = e.copies.response_head.get();
    let secrets = view::secret_values(e);
    let request = request(e, &summary, request_head, cx, &secrets);
    let response = match response_head {
        Some(head) => Response {
            status: summary.status.unwrap_or(0),
            status_text: http::StatusCode::from_u16(summary.status.unwrap_or(0))
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .to_owned(),
            http_version: "HTTP/1.1",
            cookies: [],
            headers: pairs(view::fields(head)),
            redirect_url: head
                .get("location")
                .map(|v| crate::correlation::printable(v).into_owned())
                .unwrap_or_default(),
            content: {
                let b = body(
                    Some(head),
                    e.copies.response_body.get(),
                    e.bytes_out(),
                    summary.in_flight,
                    &secrets,
                );
                Content {
                    size: i64::try_from(e.bytes_out()).unwrap_or(i64::MAX),
                    mime_type: b.mime_type,
                    text: b.text,
                    encoding: b.encoding,
                    kept: b.kept,
                }
            },
            headers_size: -1,
            body_size: i64::try_from(e.bytes_out()).unwrap_or(i64::MAX),
            error: None,
        },
        None => Response {
            status: 0,
            status_text: String::new(),
            http_version: "HTTP/1.1",
            cookies: [],
            headers: Vec::new(),
            content: Content {
                size: 0,
                mime_type: "x-unknown".to_owned(),
                text: None,
                encoding: None,
                kept: Kept::default(),
            },
            redirect_url: String::new(),
            headers_size: -1,
            body_size: -1,
            error: Some(match (summary.in_flight, summary.error) {
                (true, _) => format!("no response yet: still in flight ({})", summary.phase),
                (false, Some(error)) => error.to_owned(),
                (false, None) => format!(
                    "no response: {}",
                    summary.outcome.unwrap_or("it ended without one")
                ),
            }),
        },
    };
    Entry {
        started_date_time: summary.arrived_at.clone(),
        time: ms(end),
        request,
        response,
        cache: Empty {},
        timings,
        serial: e.serial,
        request_id: e.id.clone(),
        request_id_from: e.id_from.as_str(),
        upstream_request_id: e.upstream_id().map(str::to_owned),
        outcome: summary.outcome,
        in_flight: summary.in_flight,
        client: e.client.text.to_string(),
        from_disk: e.from_disk,
        replay_of: e.replay_of.as_ref().map(|r| r.id.clone()),
        error: e.error().map(str::to_owned),
    }
}

fn request(
    e: &Exchange,
    summary: &Summary<'_>,
    head: Option<&Head>,
    cx: &Context,
    secrets: &[String],
) -> Request {
    let host = summary.host.as_deref().unwrap_or("localhost");
    let target = mask::target(&e.target);
    let url = if target.starts_with('/') {
        format!("{}://{host}{target}", cx.proto)
    } else {
        target.clone().into_owned()
    };
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let query_string = form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| Pair {
            name: name.into_owned(),
            value: value.into_owned(),
        })
        .collect();
    let post_data = (e.bytes_in() > 0 || head.is_some_and(|h| h.get("content-length").is_some()))
        .then(|| {
            let b = body(
                head,
                e.copies.request_body(),
                e.bytes_in(),
                summary.in_flight,
                secrets,
            );
            PostData {
                mime_type: b.mime_type,
                text: b.text.unwrap_or_default(),
                encoding: b.encoding,
                kept: b.kept,
            }
        });
    Request {
        method: e.method.as_str().to_owned(),
        url,
        http_version: "HTTP/1.1",
        cookies: [],
        headers: head
            .map(|h| pairs(view::sent_fields(e, h, cx)))
            .unwrap_or_default(),
        query_string,
        post_data,
        headers_size: -1,
        body_size: i64::try_from(e.bytes_in()).unwrap_or(i64::MAX),
    }
}

fn pairs(fields: Vec<(Cow<'_, str>, Cow<'_, str>)>) -> Vec<Pair> {
    fields
        .into_iter()
        .map(|(name, value)| Pair {
            name: name.into_owned(),
            value: value.into_owned(),
        })
        .collect()
}

fn timings(e: &Exchange, end: Duration) -> Timings {
    let body_done = e.at(Mark::RequestBodyDone).unwrap_or(end);
    let send_end = e
        .at(Mark::SentUpstream)
        .map_or(end, |sent| sent.max(body_done))
        .min(end);
    let wait_end = e
        .at(Mark::UpstreamHeaders)
        .map_or(end, |headers| headers.max(send_end))
        .min(end);
    Timings {
        blocked: -1.0,
        dns: -1.0,
        connect: -1.0,
        ssl: -1.0,
        send: ms(send_end),
        wait: ms(wait_end) - ms(send_end),
        receive: ms(end) - ms(wait_end),
    }
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

struct Body {
    mime_type: String,
    text: Option<String>,
    encoding: Option<&'static str>,
    kept: Kept,
}

/// What an archive carries of a body of `size` bytes of which `kept` was kept.
fn body(
    head: Option<&Head>,
    kept: Option<&KeptBody>,
    size: u64,
    in_flight: bool,
    secrets: &[String],
) -> Body {
    let mime_type = head
        .and_then(|h| h.get("content-type"))
        .map(|v| crate::correlation::printable(v).trim().to_owned())
        .unwrap_or_else(|| "x-unknown".to_owned());
    let mut out = Body {
        mime_type,
        text: None,
        encoding: None,
        kept: Kept::default(),
    };
    let Some(k) = kept else {
        if size > 0 || in_flight {
            out.kept.truncated = size > 0;
            out.kept.comment = Some(match in_flight {
                true => "still moving: what is kept of it is known when it ends".to_owned(),
                false => "not kept: the inspector's memory (--inspect-memory) was full".to_owned(),
            });
        }
        return out;
    };
    out.kept.kept = k.bytes.len();
    if k.bytes.is_empty() && k.complete {
        return out;
    }
    let mut notes = Vec::new();
    if k.masked {
        notes.push(format!(
            "secret values were masked ({MASKED}) when it was captured"
        ));
    }
    if !k.complete {
        out.kept.truncated = true;
        notes.push(match k.short {
            Some(why) => format!(
                "only the first {} of {size} bytes were kept: {why}",
                k.bytes.len()
            ),
            None => format!(
                "only the first {} of {size} bytes were kept (--inspect-body)",
                k.bytes.len()
            ),
        });
    }
    match view::safe(head, k, secrets) {
        mask::Safe::Bytes(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => out.text = Some(text.to_owned()),
            Err(_) => {
                out.text = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
                out.encoding = Some("base64");
            }
        },
        mask::Safe::Masked(json) => {
            out.text = Some(String::from_utf8_lossy(&json).into_owned());
            notes.push(format!(
                "secret values masked ({MASKED}); the body is re-serialised"
            ));
        }
        mask::Safe::Withheld => {
            out.kept.truncated = true;
            notes.push(format!(
                "the {} kept bytes are left out: they name a password, token, secret or \
                 credential that could not be masked in them",
                k.bytes.len()
            ));
        }
    }
    if !notes.is_empty() {
        out.kept.comment = Some(notes.join("; "));
    }
    out
}
