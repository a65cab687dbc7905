//! What happened to which request, in order, for whoever listens: the inspector's event stream.
//!
//! Publishing costs the proxy a short lock and, only while someone listens, a slot in a broadcast
//! ring: it never waits for a listener. A listener that falls more than [`CAPACITY`] events behind
//! finds out when it next reads (`Lagged`) and starts again from the records themselves.
//!
//! Events carry no copy of a request's state, only which record changed: whoever sends one on reads
//! the record as it is then. Every event has a sequence number, and each record remembers the number
//! of its last event ([`Exchange::version`]), which is what lets a listener that reconnects with
//! `Last-Event-ID` be sent every record that changed since.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::broadcast;

use crate::exchange::Exchange;

/// Events a listener may fall behind by before it is told to start again.
pub const CAPACITY: usize = 4096;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The request's head was read.
    Arrived,
    /// Its response head was sent (glance's, or the shim's own answer).
    Headers,
    /// It ended, however it ended.
    Done,
    /// It is no longer kept.
    Evicted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Arrived => "arrived",
            Kind::Headers => "headers",
            Kind::Done => "done",
            Kind::Evicted => "evicted",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Event {
    pub seq: u64,
    pub kind: Kind,
    pub serial: u64,
    /// The record, while it is still kept somewhere.
    pub exchange: Weak<Exchange>,
}

/// The sequence of events.
///
/// Publishing is on every request's path, so with nobody listening it costs one atomic add: the
/// broadcast ring (whose every call takes a lock) is used only while a listener is subscribed.
/// Measured in bench/README.md: the lock-per-event version cost about 16 atomic operations per
/// request, a measurable share of the inspector's cost.
#[derive(Debug)]
pub struct Events {
    /// The last sequence number given.
    seq: AtomicU64,
    /// Listeners subscribed now.
    listeners: Arc<AtomicUsize>,
    /// Held while an event is sent, and while a listener subscribes.
    send: Mutex<()>,
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            seq: AtomicU64::new(0),
            listeners: Arc::new(AtomicUsize::new(0)),
            send: Mutex::new(()),
            tx: broadcast::Sender::new(CAPACITY),
        }
    }
}

/// A listener's receiver; while it lives, events are sent.
#[derive(Debug)]
pub struct Subscription {
    pub rx: broadcast::Receiver<Event>,
    listeners: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.send.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers an event about `exchange` and sends it to whoever listens.
    pub fn publish(&self, kind: Kind, exchange: &Arc<Exchange>) {
        if let Some(seq) = self.number(exchange) {
            self.send(seq, kind, exchange.serial, Arc::downgrade(exchange));
        }
    }

    /// `exchange` is no longer kept.
    pub fn evicted(&self, exchange: &Exchange) {
        if let Some(seq) = self.number(exchange) {
            self.send(seq, Kind::Evicted, exchange.serial, Weak::new());
        }
    }

    /// Gives `exchange` the next number; `Some` when someone listens and the event must be sent.
    ///
    /// A listener subscribes (under the lock) and then reads the number; a publisher numbers, marks
    /// the record, and then looks for listeners, all in one order (SeqCst). So an event that finds
    /// nobody listening was numbered, and its record marked, before the listener read the number:
    /// the listener's catch-up from the records includes it.
    fn number(&self, exchange: &Exchange) -> Option<u64> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        exchange.set_version(seq);
        (self.listeners.load(Ordering::SeqCst) > 0).then_some(seq)
    }

    fn send(&self, seq: u64, kind: Kind, serial: u64, exchange: Weak<Exchange>) {
        let _held = self.lock();
        let _ = self.tx.send(Event {
            seq,
            kind,
            serial,
            exchange,
        });
    }

    /// The last sequence number given, and a receiver of every event after it (and perhaps of a few
    /// before it: a listener applies full states, so a repeat is harmless).
    pub fn subscribe(&self) -> (u64, Subscription) {
        let _held = self.lock();
        let rx = self.tx.subscribe();
        self.listeners.fetch_add(1, Ordering::SeqCst);
        let seq = self.seq.load(Ordering::SeqCst);
        (
            seq,
            Subscription {
                rx,
                listeners: self.listeners.clone(),
            },
        )
    }

    /// The last sequence number given.
    pub fn last(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn exchange(serial: u64) -> Arc<Exchange> {
        Arc::new(crate::exchange::for_test(serial, Method::GET, "/"))
    }

    #[test]
    fn a_subscriber_gets_exactly_the_events_after_the_number_it_was_given() {
        let events = Events::default();
        let a = exchange(1);
        events.publish(Kind::Arrived, &a);
        assert_eq!(a.version(), 1, "numbered even with nobody listening");
        let (seq, mut sub) = events.subscribe();
        assert_eq!(seq, 1);
        let rx = &mut sub.rx;
        events.publish(Kind::Done, &a);
        events.evicted(&a);
        let got: Vec<(u64, Kind, u64)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.seq, e.kind, e.serial))
            .collect();
        assert_eq!(got, vec![(2, Kind::Done, 1), (3, Kind::Evicted, 1)]);
        assert_eq!(a.version(), 3);
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_and_the_publisher_never_waits() {
        let events = Events::default();
        let (_, mut sub) = events.subscribe();
        let rx = &mut sub.rx;
        let a = exchange(1);
        for _ in 0..CAPACITY + 10 {
            events.publish(Kind::Arrived, &a);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        drop(sub);
        events.publish(Kind::Done, &a);
        assert_eq!(
            a.version() as usize,
            CAPACITY + 11,
            "numbered with nobody listening"
        );
    }
}
