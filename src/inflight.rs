//! The requests in flight, and the watchdog that applies the two rules about a request glance keeps
//! waiting: a notice after `--stall-after` (and again after twice that, four times, ...), and, with
//! `--upstream-timeout`, the cut-off. Both read the same clock, [`Exchange::idle`]: time spent waiting
//! on glance with nothing moving. Time spent waiting on the client never counts.
//!
//! A request enters the registry when it arrives and leaves it when its [`ExchangeGuard`] is dropped,
//! which writes its one completion line and hands its record to the readers: the capture, and the
//! finished requests [`Kept`] for the inspector until newer ones, or the memory their copies need,
//! push it out. Each of those moments, and glance's answer, is an event (`events`). The SIGUSR1 table
//! and the drain report are printed from here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::capture::{Capture, Record};
use crate::config::FrontTimeout;
use crate::copies::{self, Budget, Charge, Copier, Copies, Head};
use crate::events::{Events, Kind};
use crate::exchange::{Exchange, Outcome, Waiting};
use crate::keepalive::Serving;

/// Every request in flight, by serial number, oldest first; and the finished ones kept for the
/// inspector.
#[derive(Debug, Default)]
pub struct Registry {
    open: Mutex<BTreeMap<u64, Arc<Exchange>>>,
    next_serial: AtomicU64,
    /// `None` with `--inspect off` and no `--capture`: nothing is copied, kept or published.
    kept: Option<Kept>,
    events: Events,
    /// With `--capture`: where each finished request is handed.
    capture: Option<Capture>,
    /// How long Apache in front waits on a request, when known (`--takeover`).
    front_timeout: Option<FrontTimeout>,
}

/// What the registry keeps of requests, and how much it may.
#[derive(Debug)]
pub struct Kept {
    /// What every copy of a head or body is charged to (`--inspect-memory`).
    budget: Arc<Budget>,
    /// Bytes of each body copied.
    body_max: usize,
    /// Finished requests kept at most (`--inspect-keep`; 0 when only the capture wants copies).
    keep: usize,
    /// Finished requests, oldest first.
    finished: Mutex<VecDeque<Arc<Exchange>>>,
}

impl Kept {
    /// Keeps up to `keep` finished requests, copies up to `body_max` bytes of each body, and charges
    /// every copy to a budget of `memory_max` bytes.
    pub fn new(keep: usize, body_max: usize, memory_max: usize) -> Kept {
        Kept {
            budget: Budget::new(memory_max),
            body_max,
            keep,
            finished: Mutex::new(VecDeque::new()),
        }
    }

    /// Finished requests kept at most.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Bytes of copies held now.
    pub fn memory_used(&self) -> usize {
        self.budget.used()
    }

    fn finished(&self) -> MutexGuard<'_, VecDeque<Arc<Exchange>>> {
        lock(&self.finished)
    }
}

/// A lock whose data stays consistent even if a holder panicked (single inserts and removes).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// A registry that copies and keeps what `kept` allows, and hands each finished request to
    /// `capture`.
    pub fn new(kept: Option<Kept>, capture: Option<Capture>) -> Registry {
        Registry {
            kept,
            capture,
            ..Registry::default()
        }
    }

    /// The same, knowing how long Apache in front waits on a request: stall notices say how long
    /// remains, and a request whose client left as the time ran out says Apache's timeout ended it.
    pub fn with_front_timeout(self, front_timeout: Option<FrontTimeout>) -> Registry {
        Registry {
            front_timeout,
            ..self
        }
    }

    /// Keeps the requests read back from a capture (the newest `--inspect-keep` of them), marked as
    /// from disk; returns the number kept and the ones that could not be made records again.
    pub fn restore(&self, records: Vec<Record>) -> (usize, Vec<String>) {
        let Some(kept) = &self.kept else {
            return (0, Vec::new());
        };
        let skip = records.len().saturating_sub(kept.keep);
        let (mut restored, mut bad) = (0, Vec::new());
        for record in records.into_iter().skip(skip) {
            let id = record.saved.id.clone();
            match record.restore(self.next_serial(), &mut |n| self.charge(n)) {
                Ok(e) => {
                    restored += 1;
                    self.keep(Arc::new(e));
                }
                Err(why) => bad.push(format!("{id}: {why}")),
            }
        }
        (restored, bad)
    }

    /// What is kept, with the inspector or the capture on.
    pub fn kept(&self) -> Option<&Kept> {
        self.kept.as_ref()
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    /// A serial number for the next exchange.
    pub fn next_serial(&self) -> u64 {
        self.next_serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a request that just arrived; it stays until the returned guard is dropped.
    pub fn open(self: &Arc<Self>, exchange: Exchange, serving: Serving) -> ExchangeGuard {
        let exchange = Arc::new(exchange);
        lock(&self.open).insert(exchange.serial, exchange.clone());
        if self.kept.is_some() {
            self.events.publish(Kind::Arrived, &exchange);
        }
        ExchangeGuard {
            exchange,
            registry: self.clone(),
            _serving: serving,
        }
    }

    /// The request ended: handed to the capture, out of the in-flight list and into the kept ones.
    fn finish(&self, exchange: &Arc<Exchange>) {
        if let Some(capture) = &self.capture {
            capture.record(exchange);
        }
        lock(&self.open).remove(&exchange.serial);
        if self.kept.is_some() {
            self.events.publish(Kind::Done, exchange);
            self.keep(exchange.clone());
        }
    }

    /// Keeps a finished request, letting go of the oldest past `--inspect-keep`.
    fn keep(&self, exchange: Arc<Exchange>) {
        let Some(kept) = &self.kept else { return };
        let mut finished = kept.finished();
        finished.push_back(exchange);
        let old = (finished.len() > kept.keep)
            .then(|| finished.pop_front())
            .flatten();
        drop(finished);
        if let Some(old) = old {
            self.events.evicted(&old);
        }
    }

    /// Charges `n` bytes of copies, letting go of the oldest finished requests to make room. `None`
    /// when even that does not make room (or nothing is copied).
    pub fn charge(&self, n: usize) -> Option<Charge> {
        let kept = self.kept.as_ref()?;
        loop {
            if let Some(charge) = kept.budget.try_charge(n) {
                return Some(charge);
            }
            let oldest = kept.finished().pop_front()?;
            self.events.evicted(&oldest);
        }
    }

    /// The response head went out (glance's, or the shim's own answer's): keeps a copy of `headers`
    /// and tells the listeners.
    pub fn answered(&self, exchange: &Arc<Exchange>, headers: &HeaderMap) {
        if self.kept.is_some() {
            if let Some(head) = self.copy_head(headers) {
                let _ = exchange.copies.response_head.set(head);
            }
            self.events.publish(Kind::Headers, exchange);
        }
    }

    /// The copies for a request that just arrived: its head as it arrived (with the request id
    /// glance gets); `bodiless` when it has no body.
    pub fn copies(&self, headers: &HeaderMap, bodiless: bool) -> Copies {
        match self.kept {
            Some(_) => Copies::new(self.copy_head(headers), bodiless),
            None => Copies::default(),
        }
    }

    fn copy_head(&self, headers: &HeaderMap) -> Option<Head> {
        let lines = copies::lines_of(headers);
        let charge = self.charge(lines.len())?;
        Some(Head::new(lines, charge))
    }

    /// A copier for a body, when bodies are copied.
    pub fn copier(&self) -> Option<Copier> {
        self.kept.as_ref().map(|k| Copier::new(k.body_max))
    }

    /// Copies what `copier` still wants of `data`, making room in the budget if it must.
    pub fn copy(&self, copier: &mut Copier, data: &[u8]) {
        copier.take(data, |n| self.charge(n));
    }

    /// The request with this serial number, in flight or kept.
    pub fn find(&self, serial: u64) -> Option<Arc<Exchange>> {
        if let Some(e) = lock(&self.open).get(&serial) {
            return Some(e.clone());
        }
        let kept = self.kept.as_ref()?;
        kept.finished().iter().find(|e| e.serial == serial).cloned()
    }

    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requests in flight, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Exchange>> {
        lock(&self.open).values().cloned().collect()
    }

    /// The finished requests kept, oldest first.
    pub fn finished(&self) -> Vec<Arc<Exchange>> {
        self.kept
            .as_ref()
            .map(|k| k.finished().iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies the watchdog's rules to every request as of `now`.
    pub fn check(&self, now: Instant, rules: &Rules) {
        for exchange in self.snapshot() {
            if exchange.waiting() != Waiting::Upstream {
                continue;
            }
            let idle = exchange.idle(now);
            if let Some(limit) = rules.upstream_timeout
                && idle >= limit
            {
                exchange.cut_off(
                    Outcome::TimedOut,
                    format!(
                        "no progress from the upstream for {:.1} s (--upstream-timeout)",
                        limit.as_secs_f64()
                    ),
                );
            } else if let Some(after) = rules.stall_after
                && idle >= notice_threshold(after, exchange.stall_notices())
            {
                exchange.log_stall(idle, self.front_timeout.as_ref());
            }
        }
    }

    /// Cuts off every request in flight (the shutdown).
    pub fn cut_off_all(&self, why: &str) {
        for exchange in self.snapshot() {
            exchange.cut_off(Outcome::Drained, why.to_owned());
        }
    }

    /// The in-flight table, one line per request, for SIGUSR1 and for the drain report.
    pub fn table(&self, now: Instant) -> String {
        let open = self.snapshot();
        let mut out = format!("{} request(s) in flight", open.len());
        for exchange in open {
            exchange.table_row(now, &mut out);
        }
        out
    }

    /// Writes what the capture still holds and stops its writer: call once no request can end any
    /// more (the runtime is gone).
    pub fn close(&self) {
        if let Some(capture) = &self.capture {
            capture.close();
        }
    }
}

/// Owns a request's record while it is open: made when the request arrives, held by the proxy and
/// then by the response body, which outlives the proxy's future. Dropping it ends the request,
/// however it ended: the record is settled, then finished (see [`Finish`]). The client connection
/// leaves its serving phase with it.
#[derive(Debug)]
pub struct ExchangeGuard {
    exchange: Arc<Exchange>,
    registry: Arc<Registry>,
    /// Keeps the client connection out of its idle and head timeouts while the request is served.
    _serving: Serving,
}

impl ExchangeGuard {
    pub fn exchange(&self) -> &Arc<Exchange> {
        &self.exchange
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

impl Drop for ExchangeGuard {
    /// The request is over. What that takes (handing the record on, the completion line) is done
    /// by a task of its own: hyper drops a response body before it writes the response's last bytes
    /// to the client, so done here, it would hold the response back by a log write.
    fn drop(&mut self) {
        if let Some(front) = &self.registry.front_timeout {
            self.exchange.note_front_timeout(front, Instant::now());
        }
        self.exchange.settle();
        let finish = Finish {
            exchange: self.exchange.clone(),
            registry: self.registry.clone(),
        };
        match tokio::runtime::Handle::try_current() {
            // A task the runtime drops unpolled (it is shutting down) still finishes the request.
            Ok(runtime) => drop(runtime.spawn(async move { drop(finish) })),
            Err(_) => drop(finish),
        }
    }
}

/// A request that is over, finished when dropped: handed to the capture, moved from the in-flight
/// list to the kept ones, and then its one completion line is written, so that whoever reads that
/// line finds the request everywhere else already.
struct Finish {
    exchange: Arc<Exchange>,
    registry: Arc<Registry>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.registry.finish(&self.exchange);
        let outcome = self.exchange.outcome().unwrap_or(Outcome::ClientGone);
        self.exchange.log_completion(outcome);
    }
}

/// What the watchdog enforces.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// `--stall-after`: a notice after this long waiting on glance, then after 2x, 4x, ...
    pub stall_after: Option<Duration>,
    /// `--upstream-timeout`: cut the request off after this long waiting on glance.
    pub upstream_timeout: Option<Duration>,
}

impl Rules {
    /// How often the watchdog looks: a tenth of the shortest rule, between 10 ms and 500 ms. `None`
    /// when there is no rule to apply.
    pub fn tick(&self) -> Option<Duration> {
        let shortest = match (self.stall_after, self.upstream_timeout) {
            (Some(a), Some(b)) => a.min(b),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => return None,
        };
        Some((shortest / 10).clamp(Duration::from_millis(10), Duration::from_millis(500)))
    }
}

/// Idle time at which notice number `sent` (0-based) is due: after `stall_after`, then twice that,
/// four times, ... with at most ten minutes between notices.
pub fn notice_threshold(stall_after: Duration, sent: u32) -> Duration {
    const MAX_GAP: Duration = Duration::from_secs(600);
    let mut at = stall_after;
    let mut gap = stall_after;
    for _ in 0..sent {
        at += gap.min(MAX_GAP);
        gap = gap.saturating_mul(2);
    }
    at
}

/// Applies `rules` for as long as the shim runs (cheap: one scan of the registry per tick, and
/// nothing at all while no request is in flight).
pub async fn watchdog(registry: Arc<Registry>, rules: Rules) {
    let Some(period) = rules.tick() else { return };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !registry.is_empty() {
            registry.check(Instant::now(), &rules);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Phase;
    use crate::keepalive::Clock;

    fn open(r: &Arc<Registry>, clock: &Arc<Clock>) -> ExchangeGuard {
        let exchange = crate::exchange::for_test(r.next_serial(), http::Method::GET, "/v2/images");
        r.open(exchange, clock.serve())
    }

    #[test]
    fn a_guard_removes_its_request() {
        let r = Arc::new(Registry::default());
        let clock = Clock::new();
        let a = open(&r, &clock);
        let b = open(&r, &clock);
        assert_eq!(r.len(), 2);
        drop(a);
        assert_eq!(r.len(), 1);
        drop(b);
        assert!(r.is_empty());
    }

    /// A finished request whose response body holds `n` bytes of copies.
    fn finished_with(r: &Arc<Registry>, clock: &Arc<Clock>, n: usize) -> u64 {
        let guard = open(r, clock);
        let mut copier = r.copier().unwrap();
        r.copy(&mut copier, &vec![0; n]);
        let _ = guard
            .exchange()
            .copies
            .response_body
            .set(copier.finish(true));
        guard.exchange().serial
    }

    #[test]
    fn at_most_keep_finished_are_kept_and_the_oldest_go_first() {
        let r = Arc::new(Registry::new(Some(Kept::new(2, 10, 1000)), None));
        let clock = Clock::new();
        let serials: Vec<u64> = (0..3).map(|_| finished_with(&r, &clock, 0)).collect();
        let kept: Vec<u64> = r.finished().iter().map(|e| e.serial).collect();
        assert_eq!(kept, serials[1..]);
        assert!(r.find(serials[0]).is_none());
        assert!(r.find(serials[2]).is_some());
    }

    #[test]
    fn room_is_made_from_the_oldest_finished_and_a_full_budget_cuts_the_copy() {
        let r = Arc::new(Registry::new(Some(Kept::new(10, 5000, 2000)), None));
        let clock = Clock::new();
        let oldest = finished_with(&r, &clock, 900);
        let next = finished_with(&r, &clock, 900);
        assert!(r.find(oldest).is_some());
        let (_, mut sub) = r.events().subscribe();
        // A third copy does not fit beside the two: the oldest finished goes, and says so.
        let newest = finished_with(&r, &clock, 900);
        let kept: Vec<u64> = r.finished().iter().map(|e| e.serial).collect();
        assert_eq!(kept, [next, newest]);
        let evicted: Vec<u64> = std::iter::from_fn(|| sub.try_recv().ok())
            .filter(|e| e.kind == Kind::Evicted)
            .map(|e| e.serial)
            .collect();
        assert_eq!(evicted, [oldest]);
        assert!(r.kept().unwrap().memory_used() <= 2000);

        // Nothing left to evict that frees enough: the copy stops and says why.
        let guard = open(&r, &clock);
        let mut copier = r.copier().unwrap();
        r.copy(&mut copier, &[0; 5000]);
        let body = copier.finish(true);
        assert!(!body.complete);
        assert_eq!(body.short, Some(copies::BUDGET_FULL));
        drop(guard);
    }

    #[test]
    fn thresholds_grow() {
        let s = Duration::from_secs(5);
        let at: Vec<u64> = (0..5).map(|n| notice_threshold(s, n).as_secs()).collect();
        assert_eq!(at, vec![5, 10, 20, 40, 80]);
        let late = notice_threshold(s, 40) - notice_threshold(s, 39);
        assert_eq!(late, Duration::from_secs(600), "gaps are capped");
    }

    #[test]
    fn the_table_lists_every_request() {
        let r = Arc::new(Registry::default());
        let clock = Clock::new();
        let _a = open(&r, &clock);
        let b = open(&r, &clock);
        b.exchange().add_bytes_in(42);
        b.exchange().set_phase(Phase::Streaming);
        b.exchange().waiting_on(Waiting::Client);
        let t = r.table(Instant::now());
        assert!(t.starts_with("2 request(s) in flight"), "{t}");
        assert!(t.contains("GET /v2/images from 127.0.0.1:5000"), "{t}");
        assert!(
            t.contains("in=42") && t.contains("sending to the client"),
            "{t}"
        );
    }

    #[test]
    fn one_rule_times_out_only_what_waits_on_the_upstream() {
        let r = Arc::new(Registry::default());
        let clock = Clock::new();
        let waiting_on_glance = open(&r, &clock);
        let waiting_on_client = open(&r, &clock);
        waiting_on_client.exchange().waiting_on(Waiting::Client);
        let rules = Rules {
            stall_after: None,
            upstream_timeout: Some(Duration::from_secs(3)),
        };
        let soon = Instant::now() + Duration::from_secs(1);
        r.check(soon, &rules);
        assert_eq!(waiting_on_glance.exchange().outcome(), None);
        let later = Instant::now() + Duration::from_secs(4);
        r.check(later, &rules);
        assert_eq!(
            waiting_on_glance.exchange().outcome(),
            Some(Outcome::TimedOut)
        );
        assert_eq!(waiting_on_client.exchange().outcome(), None);
    }

    #[test]
    fn ticks() {
        let rules = |s: Option<u64>, t: Option<u64>| Rules {
            stall_after: s.map(Duration::from_millis),
            upstream_timeout: t.map(Duration::from_millis),
        };
        assert_eq!(
            rules(Some(5000), None).tick(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            rules(Some(5000), Some(400)).tick(),
            Some(Duration::from_millis(40))
        );
        assert_eq!(rules(Some(1), None).tick(), Some(Duration::from_millis(10)));
        assert_eq!(rules(None, None).tick(), None);
    }
}
