//! Records as the inspector's JSON: a summary of each request for the lists and the event stream,
//! and one request whole, with its heads and kept bodies.
//!
//! Everything is read from the [`Exchange`] when it is rendered. Secrets are masked here, before
//! anything leaves the process: header values as in the log (`headers::is_secret`), and in JSON
//! bodies the values of fields whose names contain `password`, `token`, `secret` or `credential`
//! (everything under such a field). A body that is not JSON, or was not kept whole, is never sent:
//! only its size and type are, because its secrets could not be found.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::exchange::{Continue, Exchange, Mark, Outcome, Phase, Waiting, millis};
use crate::headers::{MASKED, is_secret_name};
use crate::kept::{Head, KeptBody};

/// What every view needs to know besides the record.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    pub now: Instant,
    /// `--stall-after`: a request waiting on glance this long is shown as probably paused.
    pub stall_after: Option<Duration>,
    /// How clients reach the shim (`X-Forwarded-Proto`), to show the fields glance got.
    pub proto: &'static str,
}

impl Context {
    pub fn now(stall_after: Option<Duration>, proto: &'static str) -> Context {
        Context {
            now: Instant::now(),
            stall_after,
            proto,
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
    }
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
        .map(|(name, value)| (Cow::Borrowed(name), shown(name, value)))
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
            let value = shown(name.as_str(), value.as_bytes()).into_owned();
            (Cow::Owned(name.as_str().to_owned()), Cow::Owned(value))
        })
        .collect()
}

/// A field's value as served: masked when it is a secret.
fn shown<'a>(name: &str, value: &'a [u8]) -> Cow<'a, str> {
    if is_secret_name(name) {
        Cow::Borrowed(MASKED)
    } else {
        crate::correlation::printable(value)
    }
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
    let is_json = content_type
        .as_deref()
        .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
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
                mask_json(&mut json, false);
                mask_values(&mut json, secrets);
                view.json = Some(json);
                return view;
            }
            Err(e) => format!("says it is JSON but does not parse: {e}"),
        },
    });
    view
}

/// What of a kept body may leave the process (in an archive, or a capture file on disk).
#[derive(Debug, PartialEq, Eq)]
pub enum Safe<'a> {
    /// The bytes as they were.
    Bytes(&'a [u8]),
    /// A JSON body kept whole, re-serialised with its secret values masked.
    Masked(Vec<u8>),
    /// Bytes that name a secret which could not be masked in them (not JSON, or cut): left out.
    Withheld,
}

/// The rule for [`Safe`]: a JSON body kept whole is masked field by field (and left as it was when
/// nothing in it is secret); any other bytes are left out if they contain, in any case, `password`,
/// `token`, `secret` or `credential`, and are kept as they are otherwise.
pub fn safe<'a>(content_type: Option<&str>, kept: &'a KeptBody, secrets: &[String]) -> Safe<'a> {
    if plain(kept, secrets) {
        return Safe::Bytes(&kept.bytes);
    }
    let is_json = content_type.is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    if kept.complete
        && is_json
        && let Ok(mut json) = serde_json::from_slice::<Value>(&kept.bytes)
    {
        let before = json.clone();
        mask_json(&mut json, false);
        mask_values(&mut json, secrets);
        return match json == before {
            true => Safe::Bytes(&kept.bytes),
            false => Safe::Masked(json.to_string().into_bytes()),
        };
    }
    match names_a_secret(&kept.bytes) || holds_a_value(&kept.bytes, secrets) {
        true => Safe::Withheld,
        false => Safe::Bytes(&kept.bytes),
    }
}

/// True when [`safe`] has nothing to mask in `kept`, without parsing it: no word that names a
/// secret, no secret's value, and no `\u` escape that could spell one. Most bodies are this, and
/// the caller can skip finding their content type.
pub fn plain(kept: &KeptBody, secrets: &[String]) -> bool {
    static ESCAPE: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\\u"));
    !names_a_secret(&kept.bytes)
        && ESCAPE.find(&kept.bytes).is_none()
        && !holds_a_value(&kept.bytes, secrets)
}

/// True when `bytes` contain one of the secret values (see [`secret_values`]).
fn holds_a_value(bytes: &[u8], secrets: &[String]) -> bool {
    secrets
        .iter()
        .any(|s| memchr::memmem::find(bytes, s.as_bytes()).is_some())
}

/// The values of a request's secret header fields (its token, say), and of their words: masked
/// wherever else they appear, in bodies too (an upstream that echoes a request's headers back).
/// Values shorter than 8 bytes are too short to look for safely, and too short to be a token.
pub fn secret_values(e: &Exchange) -> Vec<String> {
    let mut out = Vec::new();
    let heads = [e.copies.request_head.as_ref(), e.copies.response_head.get()];
    for (name, value) in heads.into_iter().flatten().flat_map(Head::fields) {
        if is_secret_name(name) {
            secret_words(value, &mut out);
        }
    }
    out
}

/// Adds a secret field's value, and its words, to `out` (see [`secret_values`]).
pub fn secret_words(value: &[u8], out: &mut Vec<String>) {
    let value = String::from_utf8_lossy(value);
    let value = value.trim();
    let words = value.split([' ', ';', ',', '=']);
    for v in std::iter::once(value).chain(words) {
        if v.len() >= 8 && v != MASKED && !out.iter().any(|o| o == v) {
            out.push(v.to_owned());
        }
    }
}

/// Masks every occurrence of `secrets` in the strings of `v`.
pub fn mask_values(v: &mut Value, secrets: &[String]) {
    if secrets.is_empty() {
        return;
    }
    match v {
        Value::String(s) => {
            for secret in secrets {
                if s.contains(secret.as_str()) {
                    *s = s.replace(secret.as_str(), MASKED);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| mask_values(i, secrets)),
        Value::Object(map) => map.values_mut().for_each(|i| mask_values(i, secrets)),
        _ => {}
    }
}

/// True when `bytes` contain, in any case, a word that names a secret.
fn names_a_secret(bytes: &[u8]) -> bool {
    use memchr::memmem::Finder;
    static WORDS: LazyLock<[Finder<'static>; 4]> =
        LazyLock::new(|| [b"password", &b"token"[..], b"secret", b"credential"].map(Finder::new));
    thread_local! {
        static LOWER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut lower = LOWER.take();
    lower.clear();
    lower.extend(bytes.iter().map(u8::to_ascii_lowercase));
    let named = WORDS.iter().any(|word| word.find(&lower).is_some());
    if lower.capacity() <= 1 << 20 {
        LOWER.set(lower);
    }
    named
}

/// True for a JSON field name whose value is a secret.
pub(super) fn secret_field(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "token", "secret", "credential"]
        .iter()
        .any(|word| name.contains(word))
}

/// Masks every secret value in `v`: under a field whose name says secret, or set by a JSON-patch
/// operation whose path does; `under_secret` masks every value.
pub fn mask_json(v: &mut Value, under_secret: bool) {
    match v {
        Value::Object(map) => {
            // A JSON-patch operation (glance's PATCH): its `path` names the field its `value` sets.
            let patches_secret = map.contains_key("op")
                && map
                    .get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| secret_field(p.rsplit('/').next().unwrap_or(p)));
            for (name, value) in map.iter_mut() {
                let secret = secret_field(name) || (patches_secret && name == "value");
                mask_json(value, under_secret || secret);
            }
        }
        Value::Array(items) => {
            for item in items {
                mask_json(item, under_secret);
            }
        }
        Value::Null => {}
        scalar => {
            if under_secret {
                *scalar = Value::String(MASKED.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_secret_word_is_found_in_any_case_anywhere() {
        assert!(names_a_secret(b"{\"auth\": {\"PassWord\": \"x\""));
        assert!(names_a_secret(b"x-auth-token"));
        assert!(names_a_secret(b"credential"));
        assert!(!names_a_secret(b"tok"));
        assert!(!names_a_secret(b"{\"name\": \"cirros\"}"));
    }

    #[test]
    fn secrets_in_json_are_masked_at_any_depth() {
        let mut v = json!({
            "auth": {"identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": "s3cret"}}}},
            "application_credential": {"id": "abc", "secret": "s4"},
            "os_token": "s5",
            "Client_Secret": 42,
            "items": [{"token": "s6"}, {"name": "ok"}],
            "name": "cirros",
            "none": null,
            "patch": [{"op": "add", "path": "/db_password", "value": "s7"},
                      {"op": "replace", "path": "/name", "value": "new"}]
        });
        mask_json(&mut v, false);
        let text = v.to_string();
        for s in ["s3cret", "s4", "s5", "42", "s6", "s7", "admin", "abc"] {
            assert!(!text.contains(s), "{s} leaked: {text}");
        }
        assert_eq!(v["name"], "cirros");
        assert_eq!(v["items"][1]["name"], "ok");
        assert_eq!(v["auth"]["identity"]["methods"][0], "password");
        assert_eq!(v["none"], Value::Null);
        assert_eq!(v["patch"][1]["value"], "new");
    }
}
