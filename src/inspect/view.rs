//! Records as the inspector's JSON: a summary of each request for the lists and the event stream,
//! and one request whole, with its heads and kept bodies.
//!
//! Everything is read from the [`Exchange`] when it is rendered. Secrets are masked, by `mask`'s
//! rules, before anything leaves the process: header values as in the log, and in JSON bodies the
//! fields that name a secret. A body that is not JSON, or was not kept whole, is never sent: only
//! its size and type are, because its secrets could not be found.
//!
//! The filter box's grammar ([`Filter`]) is here too, once: the page sends what is typed in it, and
//! each summary says whether it is shown; HAR exports and `glance-shim har` read it the same way.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::copies::{Head, KeptBody};
use crate::exchange::{Continue, Exchange, Mark, Outcome, Phase, Waiting, millis};
use crate::mask;

/// What every view needs to know besides the record.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub now: Instant,
    /// `--stall-after`: a request waiting on glance this long is shown as probably paused.
    pub stall_after: Option<Duration>,
    /// How clients reach the shim (`X-Forwarded-Proto`), to show the fields glance got.
    pub proto: &'static str,
    /// How long Apache in front waits on a request (`--takeover`), when known.
    pub front_limit: Option<Duration>,
}

impl Context {
    pub fn now(stall_after: Option<Duration>, proto: &'static str) -> Context {
        Context {
            now: Instant::now(),
            stall_after,
            proto,
            front_limit: None,
        }
    }

    /// The same, knowing how long Apache in front waits on a request.
    pub fn with_front_limit(self, front_limit: Option<Duration>) -> Context {
        Context {
            front_limit,
            ..self
        }
    }

    /// The same settings, as of now.
    pub fn renewed(self) -> Context {
        Context {
            now: Instant::now(),
            ..self
        }
    }
}

/// One request, in a line of the list.
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    pub serial: u64,
    pub id: &'a str,
    pub id_from: &'static str,
    pub method: &'a str,
    pub target: &'a str,
    pub client: &'a str,
    pub host: Option<Cow<'a, str>>,
    pub arrived_at: String,
    pub age_ms: f64,
    pub in_flight: bool,
    pub phase: &'static str,
    pub waiting_on: &'static str,
    pub idle_ms: f64,
    pub stalled: bool,
    /// For a request in flight waiting on glance, with `--takeover`: how long until Apache in front
    /// gives up on it (0 once it has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apache_gives_up_in_ms: Option<f64>,
    pub status: Option<u16>,
    pub upstream_id: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub timings: Timings,
    pub outcome: Option<&'static str>,
    pub ended_in: Option<&'static str>,
    pub error: Option<&'a str>,
    pub expect_100: Option<&'static str>,
    /// Read back from a capture directory (`--capture`) when the shim started.
    pub from_disk: bool,
    /// A replay: the serial number and id of the request it sends again.
    pub replay_of: Option<u64>,
    pub replay_of_id: Option<&'a str>,
    /// Whether the filter the reader gave (`?filter=`) shows this request; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shown: Option<bool>,
}

/// When each moment came, in milliseconds after arrival.
#[derive(Debug, Serialize)]
pub struct Timings {
    pub request_body_done_ms: Option<f64>,
    pub sent_upstream_ms: Option<f64>,
    pub upstream_headers_ms: Option<f64>,
    pub first_response_byte_ms: Option<f64>,
    pub done_ms: Option<f64>,
}

pub fn summary<'a>(e: &'a Exchange, cx: &Context) -> Summary<'a> {
    let at = |m| e.at(m).map(millis);
    let done = e.at(Mark::Done);
    let in_flight = done.is_none();
    let phase = e.phase();
    let waiting = e.waiting();
    let idle = if in_flight {
        e.idle(cx.now)
    } else {
        Duration::ZERO
    };
    let stalled = in_flight
        && waiting == Waiting::Upstream
        && !matches!(phase, Phase::Answering | Phase::Done)
        && cx.stall_after.is_some_and(|after| idle >= after);
    let outcome = e.outcome().filter(|_| !in_flight);
    Summary {
        serial: e.serial,
        id: &e.id,
        id_from: e.id_from.as_str(),
        method: e.method.as_str(),
        target: &e.target,
        client: &e.client.text,
        host: e
            .copies
            .request_head
            .as_ref()
            .and_then(|h| h.get("host"))
            .map(String::from_utf8_lossy),
        arrived_at: rfc3339(e.arrived_at),
        age_ms: millis(done.unwrap_or_else(|| cx.now.saturating_duration_since(e.arrived))),
        in_flight,
        phase: phase.as_str(),
        waiting_on: match waiting {
            Waiting::Upstream => "upstream",
            Waiting::Client => "client",
        },
        idle_ms: millis(idle),
        stalled,
        apache_gives_up_in_ms: cx
            .front_limit
            .filter(|_| in_flight && waiting == Waiting::Upstream)
            .map(|limit| millis(limit.saturating_sub(idle))),
        status: e.status(),
        upstream_id: e.upstream_id(),
        bytes_in: e.bytes_in(),
        bytes_out: e.bytes_out(),
        timings: Timings {
            request_body_done_ms: at(Mark::RequestBodyDone),
            sent_upstream_ms: at(Mark::SentUpstream),
            upstream_headers_ms: at(Mark::UpstreamHeaders),
            first_response_byte_ms: at(Mark::FirstResponseByte),
            done_ms: at(Mark::Done),
        },
        outcome: outcome.map(|o| o.as_str()),
        ended_in: outcome
            .filter(|o| *o != Outcome::Completed)
            .map(|_| e.ended_in().as_str()),
        error: e.error(),
        expect_100: e.expect().map(Continue::as_str),
        from_disk: e.from_disk,
        replay_of: e.replay_of.as_ref().map(|r| r.serial),
        replay_of_id: e.replay_of.as_ref().map(|r| r.id.as_str()),
        shown: None,
    }
}

/// [`summary`], saying whether `filter` shows it, when there is one.
pub fn filtered<'a>(e: &'a Exchange, cx: &Context, filter: Option<&Filter>) -> Summary<'a> {
    let mut s = summary(e, cx);
    s.shown = filter.map(|f| f.matches(&s));
    s
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One request whole.
#[derive(Debug, Serialize)]
pub struct Detail<'a> {
    #[serde(flatten)]
    pub summary: Summary<'a>,
    pub request: Message<'a>,
    pub response: Option<Message<'a>>,
}

/// A head and its body.
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    /// `[name, value]` pairs in order; secret values masked. For a request, the fields glance got
    /// (or, for one the shim refused, the fields as they came).
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    pub body: BodyView,
}

#[derive(Debug, Serialize)]
pub struct BodyView {
    /// Bytes moved so far.
    pub size: u64,
    pub content_type: Option<String>,
    /// Bytes of it kept.
    pub kept: usize,
    /// The kept bytes are the whole body.
    pub complete: bool,
    /// The body parsed, secrets masked: only for a JSON body kept whole.
    pub json: Option<Value>,
    /// Why there is no `json`.
    pub note: Option<String>,
}

pub fn detail<'a>(e: &'a Exchange, cx: &Context) -> Detail<'a> {
    let summary = summary(e, cx);
    let in_flight = summary.in_flight;
    let secrets = secret_values(e);
    let request = Message {
        headers: e
            .copies
            .request_head
            .as_ref()
            .map(|head| sent_fields(e, head, cx))
            .unwrap_or_default(),
        body: body_view(
            e.bytes_in(),
            e.copies.request_head.as_ref(),
            e.copies.request_body(),
            in_flight,
            &secrets,
        ),
    };
    let response = e.copies.response_head.get().map(|head| Message {
        headers: fields(head),
        body: body_view(
            e.bytes_out(),
            Some(head),
            e.copies.response_body.get(),
            in_flight,
            &secrets,
        ),
    });
    Detail {
        summary,
        request,
        response,
    }
}

pub(crate) fn fields(head: &Head) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    head.fields()
        .map(|(name, value)| (Cow::Borrowed(name), mask::shown(name, value)))
        .collect()
}

/// The fields glance got, made from the copy of those that arrived the way the proxy made them.
pub(super) fn sent_fields<'a>(
    e: &Exchange,
    head: &'a Head,
    cx: &Context,
) -> Vec<(Cow<'a, str>, Cow<'a, str>)> {
    if e.outcome() == Some(Outcome::Refused) {
        return fields(head); // never forwarded
    }
    let mut map = head.to_map();
    crate::headers::for_upstream(&mut map, &e.client.ip, cx.proto);
    map.iter()
        .map(|(name, value)| {
            let value = mask::shown(name.as_str(), value.as_bytes()).into_owned();
            (Cow::Owned(name.as_str().to_owned()), Cow::Owned(value))
        })
        .collect()
}

fn body_view(
    size: u64,
    head: Option<&Head>,
    kept: Option<&KeptBody>,
    in_flight: bool,
    secrets: &[String],
) -> BodyView {
    let content_type = head
        .and_then(|h| h.get("content-type"))
        .map(|v| String::from_utf8_lossy(v).trim().to_owned());
    let is_json = content_type.as_deref().is_some_and(mask::is_json);
    let mut view = BodyView {
        size,
        content_type,
        kept: kept.map_or(0, |k| k.bytes.len()),
        complete: kept.is_some_and(|k| k.complete),
        json: None,
        note: None,
    };
    view.note = Some(match kept {
        None if size == 0 && !in_flight => "no body".to_owned(),
        None if in_flight => "still moving".to_owned(),
        None => "not kept (the inspector was off or its memory full)".to_owned(),
        Some(k) if k.bytes.is_empty() && k.complete => "no body".to_owned(),
        Some(k) if !k.complete => match k.short {
            Some(why) => format!("only the first {} bytes were kept: {why}", k.bytes.len()),
            None => format!(
                "only the first {} bytes were kept (--inspect-body); a body is shown only when kept whole",
                k.bytes.len()
            ),
        },
        Some(_) if !is_json => "not JSON: shown as its size and type".to_owned(),
        Some(k) => match serde_json::from_slice::<Value>(&k.bytes) {
            Ok(mut json) => {
                mask::mask_json(&mut json, secrets);
                view.json = Some(json);
                return view;
            }
            Err(e) => format!("says it is JSON but does not parse: {e}"),
        },
    });
    view
}

/// The values of a request's secret header fields, to be masked wherever else they appear.
pub fn secret_values(e: &Exchange) -> Vec<String> {
    let heads = [e.copies.request_head.as_ref(), e.copies.response_head.get()];
    mask::secret_values(heads.into_iter().flatten().flat_map(Head::fields))
}

/// What of a kept body may leave the process, by `mask`'s rules; `head` gives its content type.
pub fn safe<'a>(head: Option<&Head>, kept: &'a KeptBody, secrets: &[String]) -> mask::Safe<'a> {
    let content_type = head.and_then(|h| h.get("content-type"));
    let content_type = content_type.map(String::from_utf8_lossy);
    mask::body(content_type.as_deref(), &kept.bytes, kept.complete, secrets)
}

/// A filter as the page's filter box reads it: words separated by spaces, each of which must be
/// found (ignoring case) in the method, target, status, id, glance's id or outcome; or, as
/// `field:text`, in that field (`method`, `path`, `status`, `id`, `upstream_id`, `outcome`, `phase`,
/// `serial`).
#[derive(Debug, Default)]
pub struct Filter(Vec<(Option<&'static str>, String)>);

impl Filter {
    pub fn parse(q: &str) -> Filter {
        Filter(
            q.to_lowercase()
                .split_whitespace()
                .map(|term| {
                    let field = term.split_once(':').and_then(|(f, v)| {
                        let field = match f {
                            "method" => "method",
                            "path" | "target" => "target",
                            "status" => "status",
                            "id" => "id",
                            "upstream_id" | "upstream" => "upstream_id",
                            "outcome" => "outcome",
                            "phase" => "phase",
                            "serial" => "serial",
                            _ => return None,
                        };
                        Some((field, v))
                    });
                    match field {
                        Some((f, v)) => (Some(f), v.to_owned()),
                        None => (None, term.to_owned()),
                    }
                })
                .collect(),
        )
    }

    /// True when nothing was typed: every request is shown.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, s: &Summary<'_>) -> bool {
        let field = |name: &str| -> String {
            match name {
                "method" => s.method.to_owned(),
                "target" => s.target.to_owned(),
                "status" => s.status.map(|v| v.to_string()).unwrap_or_default(),
                "id" => s.id.to_owned(),
                "upstream_id" => s.upstream_id.unwrap_or("").to_owned(),
                "outcome" => s.outcome.unwrap_or("").to_owned(),
                "phase" => s.phase.to_owned(),
                _ => s.serial.to_string(),
            }
        };
        self.0.iter().all(|(f, v)| {
            let hay = match f {
                Some(f) => field(f),
                None => ["method", "target", "status", "id", "upstream_id", "outcome"]
                    .map(field)
                    .join(" "),
            };
            hay.to_lowercase().contains(v.as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_reads_words_and_fields() {
        let f = Filter::parse("status:404 IMAGES");
        assert_eq!(
            f.0,
            vec![
                (Some("status"), "404".to_owned()),
                (None, "images".to_owned())
            ]
        );
        // An unknown field is a plain word.
        assert_eq!(
            Filter::parse("foo:bar").0,
            vec![(None, "foo:bar".to_owned())]
        );
        assert!(Filter::parse("  ").is_empty());
    }

    #[test]
    fn a_summary_says_whether_the_filter_shows_it() {
        let e = crate::exchange::for_test(3, http::Method::PATCH, "/v2/images/abc");
        e.upstream_answered(http::StatusCode::NOT_FOUND, Some("req-glance".into()));
        let cx = Context::now(None, "http");
        let shown = |q: &str| filtered(&e, &cx, Some(&Filter::parse(q))).shown;
        assert_eq!(filtered(&e, &cx, None).shown, None);
        for q in [
            "",
            "status:404",
            "method:pat images",
            "upstream:GLANCE",
            "serial:3",
            "404 abc",
        ] {
            assert_eq!(shown(q), Some(true), "{q}");
        }
        for q in [
            "status:5",
            "method:get",
            "images/xyz",
            "outcome:completed",
            "phase:done",
        ] {
            assert_eq!(shown(q), Some(false), "{q}");
        }
    }
}
