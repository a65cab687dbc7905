//! What the inspector keeps of each request besides its counters: copies of the heads and a prefix of
//! each body, charged against one memory budget; and the finished requests kept for showing.
//!
//! The copies belong to the request's [`Exchange`] (the one record): this module only bounds them.
//! - Each body is kept up to `--inspect-body` bytes each way; image data past that is never copied.
//! - Everything kept, in flight or finished, is charged to a [`Budget`] of `--inspect-memory` bytes.
//!   A charge is returned when the copy is dropped. When a new copy does not fit, the oldest finished
//!   requests go first; when none is left to drop, the copy stops and says why.
//! - At most `--inspect-keep` finished requests are kept.
//!
//! Heads are copied into one buffer each, `name: value\n` lines, rather than cloned as a `HeaderMap`:
//! hyper's header values are slices of its read buffer, and holding one would keep that whole buffer
//! (8 KiB and up) alive for as long as the request is kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http::HeaderMap;

use crate::exchange::Exchange;
use crate::headers::is_secret_name;

/// Bytes that may be kept in all, and bytes kept now.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget for the rest of the process. It is leaked on purpose: there is one per shim, and a
    /// charge that held an `Arc` to it would cost two more atomic operations per copy, on every
    /// request's path.
    pub fn new(max: usize) -> &'static Budget {
        Box::leak(Box::new(Budget {
            used: AtomicUsize::new(0),
            max,
        }))
    }

    /// Charges `n` bytes if they fit.
    fn try_charge(&'static self, n: usize) -> Option<Charge> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.max)
            })
            .ok()
            .map(|_| Charge { budget: self, n })
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Bytes charged to a [`Budget`], returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: &'static Budget,
    n: usize,
}

impl Charge {
    fn grow(&mut self, more: Charge) {
        self.n += more.n;
        std::mem::forget(more);
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
    /// A field whose value is a secret is among them (a token, say).
    secret: bool,
    _charge: Charge,
}

impl Head {
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
        let mut map = HeaderMap::with_capacity(self.fields().count());
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

    pub fn size(&self) -> usize {
        self.lines.len()
    }

    /// The fields as kept: `name:value` lines, each ended by `\n`.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// True when a field's value is a secret ([`crate::headers::is_secret`]): without one, the lines
    /// can leave the process as they are.
    pub fn holds_secret(&self) -> bool {
        self.secret
    }
}

/// The part of a body that was kept.
#[derive(Debug)]
pub struct KeptBody {
    pub bytes: Vec<u8>,
    /// The kept bytes are the whole body.
    pub complete: bool,
    /// Why the copy stopped early, if it did for a reason other than `--inspect-body`.
    pub short: Option<&'static str>,
    /// Read back from a capture in which its secret values were masked: not the bytes that were sent.
    pub masked: bool,
    _charge: Option<Charge>,
}

/// What the inspector keeps, and how much it may.
#[derive(Debug)]
pub struct Keeper {
    budget: &'static Budget,
    /// Bytes of each body kept.
    body_max: usize,
    keep: usize,
    /// Finished requests, oldest first.
    finished: Mutex<VecDeque<Arc<Exchange>>>,
}

impl Keeper {
    pub fn new(keep: usize, body_max: usize, memory_max: usize) -> Keeper {
        Keeper {
            budget: Budget::new(memory_max),
            body_max,
            keep,
            finished: Mutex::new(VecDeque::new()),
        }
    }

    fn finished(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Exchange>>> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn budget(&self) -> &Budget {
        self.budget
    }

    /// Finished requests kept at most (`--inspect-keep`).
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Charges `n` bytes, dropping the oldest finished requests to make room; `evicted` is told
    /// each one dropped. `None` when even that does not make room.
    pub fn charge(&self, n: usize, evicted: &mut dyn FnMut(&Exchange)) -> Option<Charge> {
        loop {
            if let Some(charge) = self.budget.try_charge(n) {
                return Some(charge);
            }
            let oldest = self.finished().pop_front()?;
            evicted(&oldest);
        }
    }

    /// A copy of `headers`, or `None` when there is no room for it.
    pub fn head(&self, headers: &HeaderMap, evicted: &mut dyn FnMut(&Exchange)) -> Option<Head> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // One pass over the map into a buffer that stays warm, then one allocation of exactly the
        // size: a record is kept long after its request, so the room it holds is what costs, and a
        // second pass to size it first cost more than this copy (measured in bench/README.md).
        let mut secret = false;
        let lines: Box<[u8]> = SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            for (name, value) in headers {
                secret |= crate::headers::is_secret(name);
                scratch.extend_from_slice(name.as_str().as_bytes());
                scratch.push(b':');
                scratch.extend_from_slice(value.as_bytes());
                scratch.push(b'\n');
            }
            scratch.as_slice().into()
        });
        let charge = self.charge(lines.len(), evicted)?;
        Some(Head {
            lines,
            secret,
            _charge: charge,
        })
    }

    /// A head read back from a capture, as `name:value` lines; `None` when there is no room.
    pub fn restored_head(
        &self,
        lines: Vec<u8>,
        evicted: &mut dyn FnMut(&Exchange),
    ) -> Option<Head> {
        let charge = self.charge(lines.len(), evicted)?;
        let head = Head {
            lines: lines.into_boxed_slice(),
            secret: false,
            _charge: charge,
        };
        let secret = head.fields().any(|(name, _)| is_secret_name(name));
        Some(Head { secret, ..head })
    }

    /// A body read back from a capture; `None` when there is no room.
    pub fn restored_body(
        &self,
        bytes: Vec<u8>,
        complete: bool,
        short: Option<&'static str>,
        masked: bool,
        evicted: &mut dyn FnMut(&Exchange),
    ) -> Option<KeptBody> {
        let charge = self.charge(bytes.capacity(), evicted)?;
        Some(KeptBody {
            bytes,
            complete,
            short,
            masked,
            _charge: Some(charge),
        })
    }

    /// A copier for one body, which keeps up to `--inspect-body` of it.
    pub fn copier(&self) -> Copier {
        Copier {
            buf: Vec::new(),
            limit: self.body_max,
            seen: 0,
            charge: None,
            short: None,
        }
    }

    /// Keeps a finished request; returns the one that no longer fits (`--inspect-keep`), if any.
    pub fn finish(&self, exchange: Arc<Exchange>) -> Option<Arc<Exchange>> {
        let mut finished = self.finished();
        finished.push_back(exchange);
        (finished.len() > self.keep)
            .then(|| finished.pop_front())
            .flatten()
    }

    /// The finished request with this serial number, if it is kept.
    pub fn find(&self, serial: u64) -> Option<Arc<Exchange>> {
        self.finished().iter().find(|e| e.serial == serial).cloned()
    }

    /// The finished requests, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Exchange>> {
        self.finished().iter().cloned().collect()
    }
}

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
                self.short = Some("the inspector's memory (--inspect-memory) was full");
                return;
            };
            match &mut self.charge {
                Some(c) => c.grow(more),
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
    /// The copies of a request whose head was copied as `request_head` (`None` with the inspector
    /// off, or when there was no room); `bodiless` when it has no body.
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
    use http::{HeaderValue, Method};

    fn exchange(serial: u64) -> Arc<Exchange> {
        Arc::new(crate::exchange::for_test(serial, Method::GET, "/v2/images"))
    }

    fn never_evicted(_: &Exchange) {
        panic!("nothing should be evicted");
    }

    #[test]
    fn a_head_knows_whether_it_holds_a_secret() {
        let keeper = Keeper::new(10, 1024, 1 << 20);
        let mut plain = HeaderMap::new();
        plain.append("content-type", HeaderValue::from_static("application/json"));
        plain.append("x-openstack-request-id", HeaderValue::from_static("req-1"));
        let head = keeper.head(&plain, &mut never_evicted).unwrap();
        assert!(!head.holds_secret());
        let restored = keeper.restored_head(head.lines().to_vec(), &mut never_evicted);
        assert!(!restored.unwrap().holds_secret());
        for name in [
            "x-auth-token",
            "x-subject-token",
            "x-service-token",
            "authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
        ] {
            let mut h = plain.clone();
            h.append(name, HeaderValue::from_static("gAAAAABsecretvalue"));
            let head = keeper.head(&h, &mut never_evicted).unwrap();
            assert!(head.holds_secret(), "{name}");
            let restored = keeper.restored_head(head.lines().to_vec(), &mut never_evicted);
            assert!(restored.unwrap().holds_secret(), "{name}, read back");
        }
    }

    #[test]
    fn a_head_copy_keeps_every_field_in_order_and_its_charge_goes_with_it() {
        let keeper = Keeper::new(10, 1024, 1 << 20);
        let mut h = HeaderMap::new();
        h.append("host", HeaderValue::from_static("controller:9292"));
        h.append("x-image-meta-a", HeaderValue::from_static("1"));
        h.append(
            "x-image-meta-a",
            HeaderValue::from_static("two: with a colon"),
        );
        h.append("x-raw", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let head = keeper.head(&h, &mut never_evicted).unwrap();
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
        assert!(keeper.budget().used() >= head.size());
        drop(head);
        assert_eq!(keeper.budget().used(), 0, "the charge is returned");
    }

    #[test]
    fn a_copier_keeps_the_start_up_to_its_limit_and_says_whether_that_is_all() {
        let keeper = Keeper::new(10, 100, 1 << 20);
        let charge = |n| keeper.charge(n, &mut never_evicted);
        let mut c = keeper.copier();
        c.take(&[1; 60], charge);
        c.take(&[2; 30], |n| keeper.charge(n, &mut never_evicted));
        let whole = c.finish(true);
        assert_eq!(whole.bytes.len(), 90);
        assert!(whole.complete);

        let mut c = keeper.copier();
        for _ in 0..10 {
            c.take(&[3; 60], |n| keeper.charge(n, &mut never_evicted));
        }
        let cut = c.finish(true);
        assert_eq!(cut.bytes, vec![3; 100], "the first 100 bytes and no more");
        assert!(!cut.complete);
        assert!(cut.short.is_none(), "cut by its limit, not by the budget");

        let mut c = keeper.copier();
        c.take(&[4; 10], |n| keeper.charge(n, &mut never_evicted));
        assert!(
            !c.finish(false).complete,
            "a body that broke off is not whole"
        );
        assert!(keeper.budget().used() <= 2 * 100 + 10);
        drop((whole, cut));
    }

    #[test]
    fn room_is_made_from_the_oldest_finished_and_a_full_budget_cuts_the_copy() {
        let keeper = Keeper::new(10, 1000, 1000);
        let old = exchange(1);
        let mut c = keeper.copier();
        c.take(&[0; 600], |n| keeper.charge(n, &mut never_evicted));
        old.copies.keep_request_body(c.finish(true));
        assert!(keeper.finish(old).is_none());
        assert!(keeper.finish(exchange(2)).is_none());

        let mut evicted = Vec::new();
        let mut c = keeper.copier();
        c.take(&[0; 600], |n| {
            keeper.charge(n, &mut |e: &Exchange| evicted.push(e.serial))
        });
        assert_eq!(evicted, vec![1], "the oldest finished went first");
        let kept = c.finish(true);
        assert_eq!(kept.bytes.len(), 600);
        assert!(keeper.budget().used() <= 1000);

        // Nothing left to evict that holds memory: the copy stops and says why.
        let mut c = keeper.copier();
        c.take(&[0; 600], |n| keeper.charge(n, &mut |_: &Exchange| {}));
        let short = c.finish(true);
        assert!(!short.complete);
        assert!(short.short.unwrap().contains("--inspect-memory"));
        assert!(keeper.snapshot().is_empty());
    }

    #[test]
    fn at_most_keep_finished_are_kept() {
        let keeper = Keeper::new(2, 10, 100);
        assert!(keeper.finish(exchange(1)).is_none());
        assert!(keeper.finish(exchange(2)).is_none());
        assert_eq!(keeper.finish(exchange(3)).map(|e| e.serial), Some(1));
        let serials: Vec<u64> = keeper.snapshot().iter().map(|e| e.serial).collect();
        assert_eq!(serials, vec![2, 3]);
        let none = Keeper::new(0, 10, 100);
        assert_eq!(none.finish(exchange(4)).map(|e| e.serial), Some(4));
    }
}
