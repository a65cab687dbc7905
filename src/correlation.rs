//! Request ids: making `req-<uuid4>` ids, and deciding which id a request carries to glance.
//!
//! glance's context middleware adopts an incoming `X-OpenStack-Request-ID` as `req.context.request_id`
//! (no format check, at most 64 characters; a longer or repeated header makes it answer 500), so the id
//! the shim logs is always the one glance will log: the client's own when glance accepts it, otherwise
//! one made here and sent in its place.

use http::HeaderValue;
use http::header::{HeaderMap, HeaderName};

/// The header glance reads (and echoes, lower-cased by uWSGI, as `x-openstack-request-id`).
pub static X_OPENSTACK_REQUEST_ID: HeaderName = HeaderName::from_static("x-openstack-request-id");

/// glance's `request_id` column and its context middleware's limit.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Makes a new `req-<lowercase uuid4>` id, the form oslo.middleware accepts as a global request id.
pub fn new_request_id() -> String {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let uuid = uuid::Uuid::new_v4().hyphenated();
    let mut out = String::with_capacity(4 + uuid::fmt::Hyphenated::LENGTH);
    out.push_str("req-");
    out.push_str(uuid.encode_lower(&mut buf));
    out
}

/// Why a client's id was not sent on as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// Over 64 characters: glance would answer 500.
    TooLong { len: usize },
    /// Sent more than once: glance joins the copies with ", " and answers 500.
    Repeated { count: usize },
    /// Present but empty: glance would ignore it and make its own.
    Empty,
    /// Read back from a capture, which keeps that the id was replaced but not why.
    Unrecorded,
}

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replaced::TooLong { len } => write!(
                f,
                "the client's X-OpenStack-Request-ID is {len} characters long and glance answers 500 \
                 to ids over {MAX_CLIENT_ID_LEN}"
            ),
            Replaced::Repeated { count } => write!(
                f,
                "the client sent X-OpenStack-Request-ID {count} times and glance answers 500 to a \
                 repeated id"
            ),
            Replaced::Empty => write!(f, "the client sent an empty X-OpenStack-Request-ID"),
            Replaced::Unrecorded => write!(
                f,
                "the client's X-OpenStack-Request-ID was replaced (read back from a capture, which \
                 does not keep why)"
            ),
        }
    }
}

/// The id a request carries, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The id glance will see, printable (non-printable bytes escaped) for the log.
    pub id: String,
    pub from: IdFrom,
}

/// Where the request id glance sees came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdFrom {
    /// The client sent it, and glance can take it as it is.
    Client,
    /// The client sent none: the shim made it.
    Shim,
    /// The client sent one glance cannot take; the shim sent its own instead.
    Replaced {
        why: Replaced,
        /// The client's value, escaped and cut to 100 characters, so the warning can show what came
        /// in without writing an unbounded value into the log.
        original: String,
    },
}

impl IdFrom {
    pub fn as_str(&self) -> &'static str {
        match self {
            IdFrom::Client => "client",
            IdFrom::Shim => "shim",
            IdFrom::Replaced { .. } => "replaced",
        }
    }
}

/// Makes sure `headers` carries exactly one `X-OpenStack-Request-ID` that glance accepts, and says which.
pub fn assign(headers: &mut HeaderMap) -> Assigned {
    let mut values = headers.get_all(&X_OPENSTACK_REQUEST_ID).iter();
    let first = values.next();
    let extra = values.count();
    let why = match first {
        None => None,
        Some(_) if extra > 0 => Some(Replaced::Repeated { count: extra + 1 }),
        Some(v) if v.is_empty() => Some(Replaced::Empty),
        Some(v) if v.len() > MAX_CLIENT_ID_LEN => Some(Replaced::TooLong { len: v.len() }),
        Some(v) => {
            return Assigned {
                id: printable(v.as_bytes()).into_owned(),
                from: IdFrom::Client,
            };
        }
    };
    let from = match (first, why) {
        (Some(v), Some(why)) => {
            let mut original = printable(&v.as_bytes()[..v.len().min(100)]).into_owned();
            if v.len() > 100 {
                original.push('…');
            }
            IdFrom::Replaced { why, original }
        }
        _ => IdFrom::Shim,
    };
    let id = new_request_id();
    let value =
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("req-invalid"));
    // `append` skips the search `insert` makes for copies to replace when there are none.
    if first.is_none() {
        headers.append(&X_OPENSTACK_REQUEST_ID, value);
    } else {
        headers.insert(&X_OPENSTACK_REQUEST_ID, value);
    }
    Assigned { id, from }
}

/// Header bytes as log text: printable ASCII kept, everything else as `\xNN`.
pub fn printable(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        // All printable ASCII, as most values are: valid UTF-8 by construction, and not copied.
        return String::from_utf8_lossy(bytes);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True for `req-` followed by a lowercase uuid4, the form oslo.middleware's RequestId accepts.
    fn is_shim_style(id: &str) -> bool {
        let Some(uuid) = id.strip_prefix("req-") else {
            return false;
        };
        let b = uuid.as_bytes();
        b.len() == 36
            && b.iter().enumerate().all(|(i, &c)| match i {
                8 | 13 | 18 | 23 => c == b'-',
                _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
            })
    }

    #[test]
    fn new_ids_are_req_uuid4_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = new_request_id();
            assert!(is_shim_style(&id), "{id}");
            assert_eq!(&id[18..19], "4", "version nibble: {id}");
            assert!(
                matches!(&id[23..24], "8" | "9" | "a" | "b"),
                "variant: {id}"
            );
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn shim_style_check() {
        assert!(is_shim_style("req-0f8a6b2c-1d3e-4f5a-8b7c-9d0e1f2a3b4c"));
        assert!(!is_shim_style("req-0F8A6B2C-1D3E-4F5A-8B7C-9D0E1F2A3B4C"));
        assert!(!is_shim_style("0f8a6b2c-1d3e-4f5a-8b7c-9d0e1f2a3b4c"));
        assert!(!is_shim_style("req-0f8a6b2c-1d3e-4f5a-8b7c"));
    }

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_OPENSTACK_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn sent(h: &HeaderMap) -> Vec<&[u8]> {
        h.get_all(&X_OPENSTACK_REQUEST_ID)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    #[test]
    fn absent_gets_the_shims_id() {
        let mut h = headers(&[]);
        let a = assign(&mut h);
        assert!(a.from == IdFrom::Shim && is_shim_style(&a.id));
        assert_eq!(sent(&h), vec![a.id.as_bytes()]);
    }

    #[test]
    fn a_clients_id_is_kept_as_is() {
        for id in [
            &b"req-0f8a6b2c-1d3e-4f5a-8b7c-9d0e1f2a3b4c"[..],
            b"abc123",
            &[b'x'; 64],
        ] {
            let mut h = headers(&[id]);
            let a = assign(&mut h);
            assert_eq!(a.from, IdFrom::Client);
            assert_eq!(a.id.as_bytes(), id);
            assert_eq!(sent(&h), vec![id]);
        }
    }

    #[test]
    fn over_long_repeated_or_empty_is_replaced_once() {
        for (values, want) in [
            (vec![&[b'x'; 65][..]], Replaced::TooLong { len: 65 }),
            (
                vec![&b"req-a"[..], b"req-b"],
                Replaced::Repeated { count: 2 },
            ),
            (
                vec![&b"same"[..], b"same", b"same"],
                Replaced::Repeated { count: 3 },
            ),
            (vec![&b""[..]], Replaced::Empty),
        ] {
            let mut h = headers(&values);
            let a = assign(&mut h);
            assert!(matches!(&a.from, IdFrom::Replaced { why, .. } if *why == want));
            assert!(is_shim_style(&a.id));
            assert_eq!(
                sent(&h),
                vec![a.id.as_bytes()],
                "exactly one copy goes to glance"
            );
        }
    }

    #[test]
    fn the_original_of_a_replaced_id_is_bounded_in_the_log() {
        let mut h = headers(&[&[b'y'; 5000]]);
        let a = assign(&mut h);
        let IdFrom::Replaced { original, .. } = a.from else {
            panic!("not replaced: {a:?}")
        };
        assert!(original.chars().count() <= 101, "{}", original.len());
    }

    #[test]
    fn printable_escapes_control_and_high_bytes() {
        assert_eq!(printable(b"abc"), "abc");
        assert_eq!(printable(b"a\tb\xff"), "a\\x09b\\xff");
    }
}
