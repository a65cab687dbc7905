//! Request ids: making `req-<uuid4>` ids, and deciding which id a request carries to glance.
//!
//! glance's context middleware adopts an incoming `X-OpenStack-Request-ID` as `req.context.request_id`
//! (no format check, at most 64 characters; a longer or repeated header makes it answer 500), so the id
//! the shim logs is always the one glance will log: the client's own when glance accepts it, otherwise
//! one made here and sent in its place.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use http::header::{HeaderMap, HeaderName};

/// The header glance reads (and echoes, lower-cased by uWSGI, as `x-openstack-request-id`).
pub static X_OPENSTACK_REQUEST_ID: HeaderName = HeaderName::from_static("x-openstack-request-id");

/// glance's `request_id` column and its context middleware's limit.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Makes a new `req-<lowercase uuid4>` id, the form oslo.middleware accepts as a global request id.
///
/// The 122 random bits come from SipHash keyed once per process from the OS's randomness (std's
/// `RandomState`) over a counter: unique per process, unpredictable across processes, and far cheaper
/// than a system call per request.
pub fn new_request_id() -> String {
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let keys = KEYS.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hi = keys.hash_one((n, 0x6c61_6e63_6531_u64));
    let lo = keys.hash_one((n, 0x7368_696d_3232_u64));
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant

    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(40);
    out.push_str("req-");
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    out
}

/// True for `req-` followed by a lowercase uuid4, the form oslo.middleware's RequestId accepts.
pub fn is_shim_style(id: &str) -> bool {
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

/// Why a client's id was not sent on as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// Over 64 characters: glance would answer 500.
    TooLong { len: usize },
    /// Sent more than once: glance joins the copies with ", " and answers 500.
    Repeated { count: usize },
    /// Present but empty: glance would ignore it and make its own.
    Empty,
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
        }
    }
}

/// The id a request carries, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The id glance will see, printable (non-printable bytes escaped) for the log.
    pub id: String,
    /// True when the client's own id was kept.
    pub from_client: bool,
    /// Set when the client sent an id glance cannot take and it was replaced.
    pub replaced: Option<Replaced>,
    /// The client's original value when it was replaced, escaped and cut to 100 characters, so the
    /// warning can show what came in without writing an unbounded value into the log.
    pub original: Option<String>,
}

/// Makes sure `headers` carries exactly one `X-OpenStack-Request-ID` that glance accepts, and says which.
pub fn assign(headers: &mut HeaderMap) -> Assigned {
    let mut values = headers.get_all(&X_OPENSTACK_REQUEST_ID).iter();
    let first = values.next();
    let extra = values.count();
    let replaced = match first {
        None => None,
        Some(_) if extra > 0 => Some(Replaced::Repeated { count: extra + 1 }),
        Some(v) if v.is_empty() => Some(Replaced::Empty),
        Some(v) if v.len() > MAX_CLIENT_ID_LEN => Some(Replaced::TooLong { len: v.len() }),
        Some(v) => {
            return Assigned {
                id: printable(v.as_bytes()),
                from_client: true,
                replaced: None,
                original: None,
            };
        }
    };
    let original = first.map(|v| {
        let mut s = printable(&v.as_bytes()[..v.len().min(100)]);
        if v.len() > 100 {
            s.push('…');
        }
        s
    });
    let absent = first.is_none();
    let id = new_request_id();
    let value =
        HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("req-invalid"));
    // `append` skips the search `insert` makes for copies to replace when there are none.
    if absent {
        headers.append(&X_OPENSTACK_REQUEST_ID, value);
    } else {
        headers.insert(&X_OPENSTACK_REQUEST_ID, value);
    }
    Assigned {
        id,
        from_client: false,
        replaced,
        original,
    }
}

/// Header bytes as log text: printable ASCII kept, everything else as `\xNN`.
pub fn printable(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        // All printable ASCII: valid UTF-8 by construction.
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for &b in bytes {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!a.from_client && a.replaced.is_none() && is_shim_style(&a.id));
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
            assert!(a.from_client && a.replaced.is_none());
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
            assert_eq!(a.replaced, Some(want));
            assert!(!a.from_client && is_shim_style(&a.id));
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
        let original = a.original.unwrap();
        assert!(original.chars().count() <= 101, "{}", original.len());
    }

    #[test]
    fn printable_escapes_control_and_high_bytes() {
        assert_eq!(printable(b"abc"), "abc");
        assert_eq!(printable(b"a\tb\xff"), "a\\x09b\\xff");
    }
}
