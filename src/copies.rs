//! The copies a request's record holds of its heads and of the start of each body, and the memory
//! budget they are charged to.
//!
//! - Each body is copied up to a limit (`--inspect-body`, or `--capture-body` if larger); image data
//!   past it is never copied.
//! - Every copy is charged to one [`Budget`] (`--inspect-memory`), and the charge is returned when the
//!   copy is dropped. Whoever charges decides what to do when a copy does not fit (the registry drops
//!   the oldest finished requests); when nothing can make room, the copy stops and says why.
//!
//! Heads are copied into one buffer each, `name:value\n` lines, rather than cloned as a `HeaderMap`:
//! hyper's header values are slices of its read buffer, and holding one would keep that whole buffer
//! (8 KiB and up) alive for as long as the request is kept.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderMap;

/// Bytes that may be copied in all, and bytes copied now.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Charges `n` bytes if they fit.
    pub fn try_charge(self: &Arc<Self>, n: usize) -> Option<Charge> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.max)
            })
            .ok()
            .map(|_| Charge {
                budget: self.clone(),
                n,
            })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes charged to a [`Budget`], returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    n: usize,
}

impl Charge {
    /// Adds `more` to this charge (they are returned together).
    fn absorb(&mut self, mut more: Charge) {
        self.n += std::mem::take(&mut more.n);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// A copy of a message head's fields.
#[derive(Debug)]
pub struct Head {
    lines: Box<[u8]>,
    _charge: Charge,
}

impl Head {
    /// A head made of `lines` (`name:value\n`, as [`lines_of`] writes them), paid for by `charge`.
    pub fn new(lines: Box<[u8]>, charge: Charge) -> Head {
        Head {
            lines,
            _charge: charge,
        }
    }

    /// The fields, in order: lower-case names, values as bytes.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                let name = std::str::from_utf8(&line[..colon]).ok()?;
                Some((name, &line[colon + 1..]))
            })
    }

    /// The fields as a map again (a field that no longer parses is left out).
    pub fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in self.fields() {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) {
                map.append(n, v);
            }
        }
        map
    }

    /// The first value of `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The fields as kept: `name:value` lines, each ended by `\n`.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }
}

/// `headers` as `name:value\n` lines, in order.
pub fn lines_of(headers: &HeaderMap) -> Box<[u8]> {
    let len = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 2)
        .sum();
    let mut lines = Vec::with_capacity(len);
    for (name, value) in headers {
        lines.extend_from_slice(name.as_str().as_bytes());
        lines.push(b':');
        lines.extend_from_slice(value.as_bytes());
        lines.push(b'\n');
    }
    lines.into_boxed_slice()
}

/// The part of a body that was kept.
#[derive(Debug)]
pub struct KeptBody {
    pub bytes: Vec<u8>,
    /// The kept bytes are the whole body.
    pub complete: bool,
    /// Why the copy stopped early, if it did for a reason other than its limit.
    pub short: Option<&'static str>,
    /// Read back from a capture in which its secret values were masked: not the bytes that were sent.
    pub masked: bool,
    _charge: Option<Charge>,
}

impl KeptBody {
    /// A body read back from a capture, paid for by `charge`.
    pub fn restored(
        bytes: Vec<u8>,
        complete: bool,
        short: Option<&'static str>,
        masked: bool,
        charge: Charge,
    ) -> KeptBody {
        KeptBody {
            bytes,
            complete,
            short,
            masked,
            _charge: Some(charge),
        }
    }
}

/// Why a copy stopped because its budget was full.
pub const BUDGET_FULL: &str = "the inspector's memory (--inspect-memory) was full";

/// Copies the start of one body as it streams past.
#[derive(Debug)]
pub struct Copier {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes of the body seen so far.
    seen: usize,
    charge: Option<Charge>,
    short: Option<&'static str>,
}

impl Copier {
    /// A copier that keeps up to `limit` bytes.
    pub fn new(limit: usize) -> Copier {
        Copier {
            buf: Vec::new(),
            limit,
            seen: 0,
            charge: None,
            short: None,
        }
    }

    /// Copies what of `data` is still wanted, paying for it with `charge`.
    pub fn take(&mut self, data: &[u8], charge: impl FnOnce(usize) -> Option<Charge>) {
        self.seen = self.seen.saturating_add(data.len());
        let want = self.limit.saturating_sub(self.buf.len()).min(data.len());
        if want == 0 || self.short.is_some() {
            return;
        }
        let needed = self.buf.len() + want;
        if needed > self.buf.capacity() {
            // The room is what is charged: no more than the first frame needs (most bodies are one
            // small frame), then doubling, never past the limit.
            let room = needed
                .max(self.buf.capacity().saturating_mul(2))
                .min(self.limit);
            let Some(more) = charge(room - self.buf.capacity()) else {
                self.short = Some(BUDGET_FULL);
                return;
            };
            match &mut self.charge {
                Some(c) => c.absorb(more),
                None => self.charge = Some(more),
            }
            self.buf.reserve_exact(room - self.buf.len());
        }
        self.buf.extend_from_slice(&data[..want]);
    }

    /// What was kept; `ended` says whether the body ended cleanly.
    pub fn finish(self, ended: bool) -> KeptBody {
        KeptBody {
            complete: ended && self.short.is_none() && self.seen == self.buf.len(),
            short: self.short,
            masked: false,
            bytes: self.buf,
            _charge: self.charge,
        }
    }
}

/// The copies one request's record holds. The request head is copied before the record is made;
/// the others are set once each, when their part has passed.
#[derive(Debug, Default)]
pub struct Copies {
    /// The request head as it arrived (with the request id glance gets).
    pub request_head: Option<Head>,
    /// The request came without a body: kept whole from the start, with nothing to set.
    bodiless: bool,
    request_body: OnceLock<KeptBody>,
    /// The response head as sent to the client (glance's, or the shim's own answer's).
    pub response_head: OnceLock<Head>,
    pub response_body: OnceLock<KeptBody>,
}

/// The copy of a body that has no bytes.
static EMPTY: KeptBody = KeptBody {
    bytes: Vec::new(),
    complete: true,
    short: None,
    masked: false,
    _charge: None,
};

impl Copies {
    /// The copies of a request whose head was copied as `request_head` (`None` when nothing is
    /// copied, or there was no room); `bodiless` when it has no body.
    pub fn new(request_head: Option<Head>, bodiless: bool) -> Copies {
        Copies {
            request_head,
            bodiless,
            ..Copies::default()
        }
    }

    /// What was kept of the request body, once it has ended.
    pub fn request_body(&self) -> Option<&KeptBody> {
        if self.bodiless {
            Some(&EMPTY)
        } else {
            self.request_body.get()
        }
    }

    /// Keeps what was copied of the request body (the first call wins).
    pub fn keep_request_body(&self, body: KeptBody) {
        let _ = self.request_body.set(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_head_copy_keeps_every_field_in_order_and_its_charge_goes_with_it() {
        let budget = Budget::new(1 << 20);
        let mut h = HeaderMap::new();
        h.append("host", HeaderValue::from_static("controller:9292"));
        h.append("x-image-meta-a", HeaderValue::from_static("1"));
        h.append(
            "x-image-meta-a",
            HeaderValue::from_static("two: with a colon"),
        );
        h.append("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let lines = lines_of(&h);
        let charge = budget.try_charge(lines.len()).unwrap();
        let head = Head::new(lines, charge);
        let fields: Vec<(&str, &[u8])> = head.fields().collect();
        assert_eq!(
            fields,
            vec![
                ("host", &b"controller:9292"[..]),
                ("x-image-meta-a", b"1"),
                ("x-image-meta-a", b"two: with a colon"),
                ("x-raw", b"caf\xe9"),
            ]
        );
        assert_eq!(head.get("host"), Some(&b"controller:9292"[..]));
        assert_eq!(head.to_map().len(), 4);
        assert_eq!(budget.used(), head.lines().len());
        drop(head);
        assert_eq!(budget.used(), 0, "the charge is returned");
    }

    #[test]
    fn a_copier_keeps_the_start_up_to_its_limit_and_says_whether_that_is_all() {
        let budget = Budget::new(1 << 20);
        let charge = |n| budget.try_charge(n);
        let mut c = Copier::new(100);
        c.take(&[1; 60], charge);
        c.take(&[2; 30], charge);
        let whole = c.finish(true);
        assert_eq!(whole.bytes.len(), 90);
        assert!(whole.complete);

        let mut c = Copier::new(100);
        for _ in 0..10 {
            c.take(&[3; 60], charge);
        }
        let cut = c.finish(true);
        assert_eq!(cut.bytes, vec![3; 100], "the first 100 bytes and no more");
        assert!(!cut.complete);
        assert!(cut.short.is_none(), "cut by its limit, not by the budget");

        let mut c = Copier::new(100);
        c.take(&[4; 10], charge);
        assert!(
            !c.finish(false).complete,
            "a body that broke off is not whole"
        );
        assert!(budget.used() <= 2 * 100 + 10);
        drop((whole, cut));
        assert_eq!(budget.used(), 0, "every charge is returned");
    }

    #[test]
    fn a_full_budget_cuts_the_copy_and_says_why() {
        let budget = Budget::new(1000);
        let mut c = Copier::new(10_000);
        c.take(&[0; 600], |n| budget.try_charge(n));
        c.take(&[0; 600], |n| budget.try_charge(n));
        let short = c.finish(true);
        assert_eq!(short.bytes.len(), 600);
        assert!(!short.complete);
        assert_eq!(short.short, Some(BUDGET_FULL));
    }
}
