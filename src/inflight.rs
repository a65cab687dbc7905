//! The requests in flight, and the watchdog that applies the two rules about a request glance keeps
//! waiting: a notice after `--stall-after` (and again after twice that, four times, ...), and, with
//! `--upstream-timeout`, the cut-off. Both read the same clock, [`Exchange::idle`]: time spent waiting
//! on glance with nothing moving. Time spent waiting on the client never counts.
//!
//! A request enters the registry when it arrives and leaves it when its [`ExchangeGuard`] is dropped;
//! with the inspector on, it is then kept (`kept`) until newer requests push it out. Each of those
//! moments, and glance's answer, is an event (`events`). The SIGUSR1 table and the drain report are
//! printed from here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::capture::Capture;
use crate::events::{Events, Kind};
use crate::exchange::{Exchange, ExchangeGuard, Outcome, Waiting};
use crate::keepalive::Serving;
use crate::kept::{Copier, Copies, Head, Keeper};

/// Every request in flight, by serial number: oldest first; and, with the inspector on, the finished
/// ones it keeps.
#[derive(Debug, Default)]
pub struct Registry {
    open: Mutex<BTreeMap<u64, Arc<Exchange>>>,
    next_serial: AtomicU64,
    /// `None` with `--inspect off` and no `--capture`: nothing is copied, kept or published.
    keeper: Option<Keeper>,
    events: Events,
    /// With `--capture`: where each finished request is written.
    capture: Option<Capture>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Exchange>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A registry that keeps what `keeper` allows, for the inspector, and writes each finished
    /// request to `capture`.
    pub fn new(keeper: Option<Keeper>, capture: Option<Capture>) -> Registry {
        Registry {
            keeper,
            capture,
            ..Registry::default()
        }
    }

    /// Keeps the requests read back from a capture (the newest `--inspect-keep` of them), marked as
    /// from disk; returns the number kept and the lines that could not be made records again.
    pub fn restore(&self, lines: Vec<crate::capture::Record>) -> (usize, Vec<String>) {
        let Some(keeper) = &self.keeper else {
            return (0, Vec::new());
        };
        let skip = lines.len().saturating_sub(keeper.keep());
        let (mut kept, mut bad) = (0, Vec::new());
        for line in lines.into_iter().skip(skip) {
            let id = line.saved.id.clone();
            match line.restore(self.next_serial(), keeper, &mut |old| {
                self.events.evicted(old)
            }) {
                Ok(e) => {
                    kept += 1;
                    if let Some(old) = keeper.finish(Arc::new(e)) {
                        self.events.evicted(&old);
                    }
                }
                Err(why) => bad.push(format!("{id}: {why}")),
            }
        }
        (kept, bad)
    }

    pub fn keeper(&self) -> Option<&Keeper> {
        self.keeper.as_ref()
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
        self.lock().insert(exchange.serial, exchange.clone());
        if self.keeper.is_some() {
            self.events.publish(Kind::Arrived, &exchange);
        }
        ExchangeGuard::new(exchange, self.clone(), serving)
    }

    /// The request ended: out of the in-flight list and, with the inspector on, into the kept ones.
    pub(crate) fn finish(&self, exchange: &Arc<Exchange>) {
        self.lock().remove(&exchange.serial);
        if let Some(capture) = &self.capture {
            capture.record(exchange);
        }
        if let Some(keeper) = &self.keeper {
            self.events.publish(Kind::Done, exchange);
            if let Some(old) = keeper.finish(exchange.clone()) {
                self.events.evicted(&old);
            }
        }
    }

    /// The response head went out (glance's, or the shim's own answer's): keeps a copy of `headers`
    /// and tells the listeners.
    pub fn answered(&self, exchange: &Arc<Exchange>, headers: &HeaderMap) {
        if self.keeper.is_some() {
            if let Some(head) = self.copy_head(headers) {
                let _ = exchange.copies.response_head.set(head);
            }
            self.events.publish(Kind::Headers, exchange);
        }
    }

    /// The copies for a request that just arrived: its head as it arrived (with the request id
    /// glance gets), with the inspector on; `bodiless` when it has no body.
    pub fn copies(&self, headers: &HeaderMap, bodiless: bool) -> Copies {
        match self.keeper {
            Some(_) => Copies::new(self.copy_head(headers), bodiless),
            None => Copies::default(),
        }
    }

    fn copy_head(&self, headers: &HeaderMap) -> Option<Head> {
        let keeper = self.keeper.as_ref()?;
        keeper.head(headers, &mut |old| self.events.evicted(old))
    }

    /// A copier for a body, with the inspector on.
    pub fn copier(&self) -> Option<Copier> {
        self.keeper.as_ref().map(Keeper::copier)
    }

    /// Copies what `copier` still wants of `data`, making room in the budget if it must.
    pub fn copy(&self, copier: &mut Copier, data: &[u8]) {
        if let Some(keeper) = &self.keeper {
            copier.take(data, |n| {
                keeper.charge(n, &mut |old| self.events.evicted(old))
            });
        }
    }

    /// The request with this serial number, in flight or kept.
    pub fn find(&self, serial: u64) -> Option<Arc<Exchange>> {
        if let Some(e) = self.lock().get(&serial) {
            return Some(e.clone());
        }
        self.keeper.as_ref()?.find(serial)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Exchange>> {
        self.lock().values().cloned().collect()
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
                exchange.log_stall(idle);
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
