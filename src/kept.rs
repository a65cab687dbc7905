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
use std::sync::{Arc, Mutex};

use http::HeaderMap;

use crate::exchange::Exchange;

/// Bytes that may be kept in all, and bytes kept now.
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
    fn try_charge(self: &Arc<Self>, n: usize) -> Option<Charge> {
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

    pub fn max(&self) -> usize {
        self.max
    }
}

/// Bytes charged to a [`Budget`], returned when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
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
    lines: Vec<u8>,
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

    /// The first value of `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub fn size(&self) -> usize {
        self.lines.len()
    }
}

/// The part of a body that was kept.
#[derive(Debug)]
pub struct KeptBody {
    pub bytes: Box<[u8]>,
    /// The kept bytes are the whole body.
    pub complete: bool,
    /// Why the copy stopped early, if it did for a reason other than `--inspect-body`.
    pub short: Option<&'static str>,
    _charge: Option<Charge>,
}

/// What the inspector keeps, and how much it may.
#[derive(Debug)]
pub struct Keeper {
    budget: Arc<Budget>,
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
        &self.budget
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
        // One pass, into room for the usual line length; kept as it is (shrinking it would cost a
        // second copy), and charged for all of it.
        let mut lines = Vec::with_capacity(headers.len() * 48);
        for (name, value) in headers {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.push(b':');
            lines.extend_from_slice(value.as_bytes());
            lines.push(b'\n');
        }
        let charge = self.charge(lines.capacity(), evicted)?;
        Some(Head {
            lines,
            _charge: charge,
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
        let Some(more) = charge(want) else {
            self.short = Some("the inspector's memory (--inspect-memory) was full");
            return;
        };
        match &mut self.charge {
            Some(c) => c.grow(more),
            None => self.charge = Some(more),
        }
        if self.buf.capacity() == 0 {
            // Most bodies are small: no more room than the first frame needs, up to the limit.
            self.buf.reserve_exact(want);
        }
        self.buf.extend_from_slice(&data[..want]);
    }

    /// What was kept; `ended` says whether the body ended cleanly.
    pub fn finish(self, ended: bool) -> KeptBody {
        KeptBody {
            complete: ended && self.short.is_none() && self.seen == self.buf.len(),
            short: self.short,
            bytes: self.buf.into_boxed_slice(),
            _charge: self.charge,
        }
    }
}

/// The copies one request's record holds; each is set once, when its part has passed.
#[derive(Debug, Default)]
pub struct Copies {
    /// The request head as sent to glance.
    pub request_head: std::sync::OnceLock<Head>,
    /// The response head as sent to the client (glance's, or the shim's own answer's).
    pub response_head: std::sync::OnceLock<Head>,
    pub request_body: std::sync::OnceLock<KeptBody>,
    pub response_body: std::sync::OnceLock<KeptBody>,
}
