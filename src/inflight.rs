//! The registry of requests in flight, the watchdog that notices a stalled (breakpointed) upstream, and
//! the table printed on SIGUSR1.
//!
//! A request is registered when it arrives and leaves the registry when its [`Guard`] is dropped, which
//! the response body owns: a streamed body outlives the service future, so bookkeeping is tied to
//! ownership rather than to code paths. Bodies report progress into their [`Entry`]; the watchdog only
//! reads it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Who the request is waiting for right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Waiting {
    /// The upstream: to read what we have, or to send what we need. A long wait here is a stall.
    Upstream = 0,
    /// The client: to send more of its body, or to read the response. Not the upstream's fault.
    Client = 1,
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Sent (or being sent) to the upstream; no response headers yet.
    AwaitingHeaders = 0,
    /// Response headers are back; the body is streaming to the client.
    Streaming = 1,
}

/// One request in flight. Counters are atomics because the request body, the response body and the
/// watchdog touch them from different tasks.
#[derive(Debug)]
pub struct Entry {
    /// Registry key, unique per process (two clients may send the same request id).
    pub serial: u64,
    /// The request id glance sees.
    pub id: String,
    pub method: http::Method,
    /// Path and query as received.
    pub target: String,
    pub client: SocketAddr,
    pub started: Instant,
    /// Microseconds after `started` at which bytes last moved (or headers arrived).
    last_progress_us: AtomicU64,
    waiting: AtomicU8,
    phase: AtomicU8,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Set by the request body when the client's upload failed: the upstream error that follows is the
    /// client's doing, not the upstream's.
    pub client_body_failed: AtomicBool,
    /// Watchdog bookkeeping: notices sent in the current stall, and the progress mark it started from.
    stall_notices: AtomicU32,
    stall_mark_us: AtomicU64,
}

impl Entry {
    fn micros_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_micros()).unwrap_or(u64::MAX)
    }

    /// Records that something moved: a body frame in either direction or the response headers.
    pub fn progress(&self, now_waiting: Waiting) {
        self.last_progress_us
            .store(self.micros_since_start(Instant::now()), Ordering::Relaxed);
        self.waiting.store(now_waiting as u8, Ordering::Relaxed);
    }

    /// Records who is being waited for, without counting it as progress.
    pub fn waiting_on(&self, who: Waiting) {
        self.waiting.store(who as u8, Ordering::Relaxed);
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        if self.phase.load(Ordering::Relaxed) == Phase::Streaming as u8 {
            Phase::Streaming
        } else {
            Phase::AwaitingHeaders
        }
    }

    pub fn waiting(&self) -> Waiting {
        if self.waiting.load(Ordering::Relaxed) == Waiting::Client as u8 {
            Waiting::Client
        } else {
            Waiting::Upstream
        }
    }

    /// Says, once, that a request which earned stall notices is moving again after `paused`. Called by
    /// the watchdog when it sees progress and by the proxy when response headers arrive, whichever
    /// comes first.
    pub fn resumed(&self, paused: Duration) {
        if self.stall_notices.swap(0, Ordering::Relaxed) > 0 {
            info!(
                id = self.id.as_str(),
                method = self.method.as_str(),
                path = self.target.as_str(),
                paused_s = secs(paused),
                "the upstream is moving again after {:.1} s",
                paused.as_secs_f64()
            );
        }
    }

    /// How long nothing has moved.
    pub fn idle(&self, now: Instant) -> Duration {
        let last = Duration::from_micros(self.last_progress_us.load(Ordering::Relaxed));
        now.saturating_duration_since(self.started)
            .saturating_sub(last)
    }
}

/// All requests in flight.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
    next_serial: AtomicU64,
}

/// Removes its entry from the registry when dropped.
#[derive(Debug)]
pub struct Guard {
    registry: Arc<Registry>,
    pub entry: Arc<Entry>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.entry.serial);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request that just arrived.
    pub fn register(
        self: &Arc<Self>,
        id: String,
        method: http::Method,
        target: String,
        client: SocketAddr,
    ) -> Guard {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            serial,
            id,
            method,
            target,
            client,
            started: Instant::now(),
            last_progress_us: AtomicU64::new(0),
            waiting: AtomicU8::new(Waiting::Upstream as u8),
            phase: AtomicU8::new(Phase::AwaitingHeaders as u8),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            client_body_failed: AtomicBool::new(false),
            stall_notices: AtomicU32::new(0),
            stall_mark_us: AtomicU64::new(0),
        });
        self.lock().insert(serial, entry.clone());
        Guard {
            registry: self.clone(),
            entry,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        let mut all: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        all.sort_by_key(|e| e.serial);
        all
    }

    /// Logs a notice for each request that has waited on the upstream past its next threshold: after
    /// `stall_after`, then after twice that, four times, ... (capped at ten minutes between notices).
    /// Logs once when a stalled request starts moving again.
    pub fn check_stalls(&self, now: Instant, stall_after: Duration) {
        for entry in self.snapshot() {
            let mark = entry.last_progress_us.load(Ordering::Relaxed);
            let old_mark = entry.stall_mark_us.load(Ordering::Relaxed);
            if mark != old_mark {
                entry.stall_mark_us.store(mark, Ordering::Relaxed);
                entry.resumed(Duration::from_micros(mark.saturating_sub(old_mark)));
                continue;
            }
            let notices = entry.stall_notices.load(Ordering::Relaxed);
            if entry.waiting() != Waiting::Upstream {
                continue;
            }
            let idle = entry.idle(now);
            if idle >= notice_threshold(stall_after, notices) {
                entry.stall_notices.store(notices + 1, Ordering::Relaxed);
                let what = match entry.phase() {
                    Phase::AwaitingHeaders => "has not answered",
                    Phase::Streaming => "has sent nothing more",
                };
                warn!(
                    id = entry.id.as_str(),
                    method = entry.method.as_str(),
                    path = entry.target.as_str(),
                    client = %entry.client,
                    waited_s = secs(idle),
                    "the upstream {what} for {:.1} s: it is probably paused at a breakpoint",
                    idle.as_secs_f64()
                );
            }
        }
    }

    /// The in-flight table, one line per request, for SIGUSR1 and for the drain report.
    pub fn table(&self, now: Instant) -> String {
        let entries = self.snapshot();
        let mut out = format!("{} request(s) in flight", entries.len());
        for e in entries {
            let state = match (e.phase(), e.waiting()) {
                (Phase::AwaitingHeaders, Waiting::Upstream) => "waiting for upstream headers",
                (Phase::AwaitingHeaders, Waiting::Client) => "receiving the client's body",
                (Phase::Streaming, Waiting::Upstream) => "waiting for upstream body",
                (Phase::Streaming, Waiting::Client) => "sending to the client",
            };
            let _ = write!(
                out,
                "\n  {} {} {} from {} age={:.1}s idle={:.1}s in={} out={} {}",
                e.id,
                e.method,
                e.target,
                e.client,
                now.saturating_duration_since(e.started).as_secs_f64(),
                e.idle(now).as_secs_f64(),
                e.bytes_in.load(Ordering::Relaxed),
                e.bytes_out.load(Ordering::Relaxed),
                state,
            );
        }
        out
    }
}

/// Idle time at which notice number `sent` (0-based) is due.
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

/// Seconds with one decimal, as a log field.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// How often the watchdog looks: a tenth of the threshold, between 10 ms and 500 ms.
pub fn watchdog_tick(stall_after: Duration) -> Duration {
    (stall_after / 10).clamp(Duration::from_millis(10), Duration::from_millis(500))
}

/// Runs the stall watchdog forever (it is cheap: one scan of the registry per tick).
pub async fn watchdog(registry: Arc<Registry>, stall_after: Duration) {
    let mut tick = tokio::time::interval(watchdog_tick(stall_after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !registry.is_empty() {
            registry.check_stalls(Instant::now(), stall_after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn register(r: &Arc<Registry>, id: &str) -> Guard {
        r.register(
            id.into(),
            http::Method::GET,
            "/v2/images".into(),
            "127.0.0.1:5000".parse().unwrap(),
        )
    }

    #[test]
    fn a_guard_removes_its_entry() {
        let r = registry();
        let a = register(&r, "req-a");
        let b = register(&r, "req-a");
        assert_eq!(r.len(), 2, "the same id twice is two requests");
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
        let r = registry();
        let _a = register(&r, "req-one");
        let b = register(&r, "req-two");
        b.entry.bytes_in.store(42, Ordering::Relaxed);
        b.entry.set_phase(Phase::Streaming);
        b.entry.waiting_on(Waiting::Client);
        let t = r.table(Instant::now());
        assert!(t.starts_with("2 request(s) in flight"), "{t}");
        assert!(
            t.contains("req-one GET /v2/images from 127.0.0.1:5000"),
            "{t}"
        );
        assert!(
            t.contains("in=42") && t.contains("sending to the client"),
            "{t}"
        );
    }

    #[test]
    fn idle_counts_from_the_last_progress() {
        let r = registry();
        let g = register(&r, "req-x");
        let later = g.entry.started + Duration::from_secs(7);
        assert_eq!(g.entry.idle(later), Duration::from_secs(7));
        g.entry.last_progress_us.store(5_000_000, Ordering::Relaxed);
        assert_eq!(g.entry.idle(later), Duration::from_secs(2));
    }

    #[test]
    fn tick_bounds() {
        assert_eq!(
            watchdog_tick(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(
            watchdog_tick(Duration::from_millis(200)),
            Duration::from_millis(20)
        );
        assert_eq!(
            watchdog_tick(Duration::from_millis(1)),
            Duration::from_millis(10)
        );
    }
}
