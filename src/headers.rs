//! Header policy as pure functions: what an intermediary removes, adds and refuses. (Which fields are
//! secrets, and how they are masked, is `mask`'s.)
//!
//! Everything follows RFC 9110 §7.6 (hop-by-hop fields, Via) and what glance reads; `proxy` decides when
//! to call these, and nothing here does I/O.

use bytes::{BufMut, BytesMut};
use http::HeaderValue;
use http::header::{self, Entry, HeaderMap, HeaderName};

/// The `Via` entry this proxy adds (and recognises coming back, which means a loop).
pub const VIA_SELF: &str = "1.1 glance-shim";

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// True for a field that describes one connection, never the message: RFC 9110 §7.6.1 plus the
/// legacy `Keep-Alive`/`Proxy-Connection` and the proxy-auth pair, which belong to the hop they were
/// sent on.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Removes every hop-by-hop field: the fixed set, and each name listed in `Connection`. Returns
/// whether a `Transfer-Encoding` was among them.
///
/// The fields are found in one pass over the names the message has (most have none of them, or
/// only `Connection`): removing each of the nine names in turn was nine hash lookups, 1,380
/// instructions of a small request's 55,800 (`bench/callgrind.sh`).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let mut names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n.as_str()))
        .cloned()
        .collect();
    if names.is_empty() {
        return false;
    }
    if names.contains(&header::CONNECTION) {
        // `keep-alive` and `close` name no field (or the Keep-Alive field, removed anyway).
        let listed = list_items(headers, &header::CONNECTION)
            .filter(|t| !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
            .filter_map(|t| HeaderName::from_bytes(t).ok());
        names.extend(listed.collect::<Vec<_>>());
    }
    for name in &names {
        headers.remove(name);
    }
    names.contains(&header::TRANSFER_ENCODING)
}

/// The comma-separated items of every `name` field, trimmed, as bytes: a value with bytes that are not
/// ASCII (obs-text) must not hide the items around them.
fn list_items<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}

/// True when the request waits for a `100 Continue` before it sends its body (RFC 9110 §10.1.1).
pub fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// True when one of the `Via` entries is ours: the request has been through this shim before.
pub fn has_our_via(headers: &HeaderMap) -> bool {
    list_items(headers, &header::VIA).any(|entry| {
        let mut words = entry
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty());
        let _protocol = words.next();
        words.next() == Some(&b"glance-shim"[..])
    })
}

/// Turns a client's request fields into the ones glance gets: hop-by-hop fields out (a chunked body
/// stays chunked), `Via` and `X-Forwarded-*` in. `proxy` applies it to every request; the inspector
/// applies it again to its copy of the fields as they arrived, to show what glance got.
pub fn for_upstream(headers: &mut HeaderMap, client_ip: &HeaderValue, proto: &'static str) {
    // A chunked request body must stay chunked; hyper would otherwise send no body at all for a GET
    // or HEAD with unknown length.
    let chunked = remove_hop_by_hop(headers);
    if chunked && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let host = headers.get(header::HOST).cloned();
    add_forwarding(
        headers,
        &Forwarded {
            client_ip,
            proto,
            host: host.as_ref(),
        },
    );
}

/// What the shim adds to a request before forwarding it.
pub struct Forwarded<'a> {
    /// The address the request came from, as it is appended to `X-Forwarded-For`.
    pub client_ip: &'a HeaderValue,
    /// `http` or `https`: how the client reached the shim.
    pub proto: &'static str,
    /// The `Host` the client sent, if any.
    pub host: Option<&'a HeaderValue>,
}

/// Adds `Via`, appends to `X-Forwarded-For`, and sets `X-Forwarded-Proto`/`X-Forwarded-Host` unless an
/// earlier proxy (Apache in front of the shim) already did: its values describe the client's original
/// request, which is what glance's `http_proxy_to_wsgi` needs to build URLs.
pub fn add_forwarding(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    append_list(headers, &header::VIA, &VIA_VALUE);
    append_list(headers, &X_FORWARDED_FOR, fwd.client_ip);
    headers
        .entry(&X_FORWARDED_PROTO)
        .or_insert_with(|| HeaderValue::from_static(fwd.proto));
    if let Some(host) = fwd.host {
        headers
            .entry(&X_FORWARDED_HOST)
            .or_insert_with(|| host.clone());
    }
}

static VIA_VALUE: HeaderValue = HeaderValue::from_static(VIA_SELF);

/// Appends `item` to a comma-separated list field, folding earlier lines of it into one.
fn append_list(headers: &mut HeaderMap, name: &HeaderName, item: &HeaderValue) {
    match headers.entry(name) {
        Entry::Vacant(slot) => {
            slot.insert(item.clone());
        }
        Entry::Occupied(mut slot) => {
            let mut buf = BytesMut::with_capacity(64);
            for v in slot.iter() {
                buf.put_slice(v.as_bytes());
                buf.put_slice(b", ");
            }
            buf.put_slice(item.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
                slot.insert(v);
            }
        }
    }
}

/// Why a request cannot be forwarded as it is.
#[derive(Debug, PartialEq, Eq)]
pub enum HostProblem {
    Missing,
    Repeated(usize),
}

/// HTTP/1.1 requires exactly one `Host` (RFC 9112 §3.2); an HTTP/1.0 request may have none.
pub fn check_host(headers: &HeaderMap, http11: bool) -> Result<(), HostProblem> {
    match headers.get_all(header::HOST).iter().count() {
        0 if http11 => Err(HostProblem::Missing),
        0 | 1 => Ok(()),
        n => Err(HostProblem::Repeated(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// A field of each hop-by-hop name, with a value it could have.
    const HOP_BY_HOP_FIELDS: [(&str, &str); 9] = [
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic x"),
        ("proxy-authenticate", "Basic"),
    ];

    #[test]
    fn hop_by_hop_fields_go_including_those_connection_names() {
        let mut fields = vec![
            ("host", "a"),
            ("connection", "keep-alive, X-Debug-Hop"),
            ("connection", "close"),
            ("x-debug-hop", "1"),
            ("x-auth-token", "t"),
            ("content-length", "5"),
        ];
        fields.extend_from_slice(&HOP_BY_HOP_FIELDS);
        let mut h = map(&fields);
        assert!(remove_hop_by_hop(&mut h), "a Transfer-Encoding was removed");
        assert_eq!(names(&h), vec!["content-length", "host", "x-auth-token"]);
    }

    #[test]
    fn each_hop_by_hop_field_goes_alone_and_only_transfer_encoding_says_so() {
        for (name, value) in HOP_BY_HOP_FIELDS {
            let mut h = map(&[("host", "a"), (name, value), ("x-auth-token", "t")]);
            let chunked = remove_hop_by_hop(&mut h);
            assert_eq!(names(&h), vec!["host", "x-auth-token"], "{name}");
            assert_eq!(chunked, name == "transfer-encoding", "{name}");
        }
        // A name listed in Connection goes only with a Connection field to list it.
        let mut h = map(&[("host", "a"), ("x-debug-hop", "1")]);
        assert!(!remove_hop_by_hop(&mut h));
        assert_eq!(names(&h), vec!["host", "x-debug-hop"]);
    }

    #[test]
    fn end_to_end_fields_are_untouched() {
        let mut h = map(&[
            ("host", "a"),
            ("content-type", "application/json"),
            ("x-image-meta", "1"),
        ]);
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn forwarding_fields() {
        let host = HeaderValue::from_static("controller:9292");
        let mut h = map(&[("host", "controller:9292")]);
        add_forwarding(
            &mut h,
            &Forwarded {
                client_ip: &HeaderValue::from_static("10.0.0.7"),
                proto: "http",
                host: Some(&host),
            },
        );
        assert_eq!(h["via"], "1.1 glance-shim");
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "controller:9292");
    }

    #[test]
    fn an_earlier_proxys_fields_are_extended_or_kept() {
        let host = HeaderValue::from_static("127.0.0.1:9292");
        let mut h = map(&[
            ("via", "1.1 apache"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "cloud.example.org"),
        ]);
        add_forwarding(
            &mut h,
            &Forwarded {
                client_ip: &HeaderValue::from_static("::1"),
                proto: "http",
                host: Some(&host),
            },
        );
        assert_eq!(h["via"], "1.1 apache, 1.1 glance-shim");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.2, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "cloud.example.org");
    }

    #[test]
    fn bytes_that_are_not_ascii_hide_nothing() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"X-Hop, caf\xe9").unwrap(),
        );
        h.append(
            HeaderName::from_static("x-hop"),
            HeaderValue::from_static("1"),
        );
        h.append(
            header::VIA,
            HeaderValue::from_bytes(b"1.0 \x85proxy, 1.1 glance-shim").unwrap(),
        );
        assert!(has_our_via(&h));
        remove_hop_by_hop(&mut h);
        assert!(
            !h.contains_key("x-hop"),
            "a listed name next to obs-text is still removed"
        );
    }

    #[test]
    fn our_own_via_means_a_loop() {
        assert!(has_our_via(&map(&[("via", "1.1 apache, 1.1 glance-shim")])));
        assert!(has_our_via(&map(&[(
            "via",
            "HTTP/1.1 glance-shim (debug)"
        )])));
        assert!(!has_our_via(&map(&[("via", "1.1 glance-shim-other")])));
        assert!(!has_our_via(&map(&[("via", "1.1 apache")])));
        assert!(!has_our_via(&map(&[])));
    }

    #[test]
    fn host_rules() {
        assert_eq!(check_host(&map(&[("host", "a")]), true), Ok(()));
        assert_eq!(check_host(&map(&[]), true), Err(HostProblem::Missing));
        assert_eq!(check_host(&map(&[]), false), Ok(()));
        assert_eq!(
            check_host(&map(&[("host", "a"), ("host", "b")]), true),
            Err(HostProblem::Repeated(2))
        );
    }
}
