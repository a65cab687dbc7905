//! What happened to which request, in order, for whoever listens: the inspector's event stream.
//!
//! Publishing never waits for a listener: events go into tokio's broadcast ring, and a listener that
//! falls more than [`CAPACITY`] events behind finds out when it next reads (`Lagged`) and starts
//! again from the records themselves.
//!
//! Events carry no copy of a request's state, only which record changed: whoever sends one on reads
//! the record as it is then. Every event has a sequence number, and each record remembers the number
//! of its last event ([`Exchange::version`]), which is what lets a listener that reconnects with
//! `Last-Event-ID` be sent every record that changed since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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
#[derive(Debug)]
pub struct Events {
    /// The last sequence number given.
    seq: AtomicU64,
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            seq: AtomicU64::new(0),
            tx: broadcast::Sender::new(CAPACITY),
        }
    }
}

impl Events {
    /// Numbers an event about `exchange` and sends it to whoever listens.
    pub fn publish(&self, kind: Kind, exchange: &Arc<Exchange>) {
        let seq = self.number(exchange);
        self.send(seq, kind, exchange.serial, Arc::downgrade(exchange));
    }

    /// `exchange` is no longer kept.
    pub fn evicted(&self, exchange: &Exchange) {
        let seq = self.number(exchange);
        self.send(seq, Kind::Evicted, exchange.serial, Weak::new());
    }

    /// Gives `exchange` the next number. The record is marked before the event is sent, so a
    /// listener that subscribes between the two finds the change in the records (see
    /// [`Events::subscribe`]).
    fn number(&self, exchange: &Exchange) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        exchange.set_version(seq);
        seq
    }

    fn send(&self, seq: u64, kind: Kind, serial: u64, exchange: Weak<Exchange>) {
        // An error only says that nobody listens.
        let _ = self.tx.send(Event {
            seq,
            kind,
            serial,
            exchange,
        });
    }

    /// A receiver of every event sent from now on, and the last number given once it is subscribed.
    /// An event numbered before that may still arrive (a repeat of what the records show, which a
    /// listener applying full states takes as it comes); one numbered after it always arrives.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Event>) {
        let rx = self.tx.subscribe();
        (self.seq.load(Ordering::SeqCst), rx)
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
        let (seq, mut rx) = events.subscribe();
        assert_eq!(seq, 1);
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
        let (_, mut rx) = events.subscribe();
        let a = exchange(1);
        for _ in 0..CAPACITY + 10 {
            events.publish(Kind::Arrived, &a);
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        drop(rx);
        events.publish(Kind::Done, &a);
        assert_eq!(
            a.version() as usize,
            CAPACITY + 11,
            "numbered with nobody listening"
        );
    }
}
