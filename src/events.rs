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
#[derive(Debug)]
pub struct Events {
    /// The last sequence number given. Held while an event is numbered and sent, so that a listener
    /// subscribing at number N gets exactly the events after N.
    seq: Mutex<u64>,
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            seq: Mutex::new(0),
            tx: broadcast::Sender::new(CAPACITY),
        }
    }
}

impl Events {
    fn seq(&self) -> std::sync::MutexGuard<'_, u64> {
        self.seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers an event about `exchange` and sends it to whoever listens.
    pub fn publish(&self, kind: Kind, exchange: &Arc<Exchange>) {
        self.send(kind, exchange, Arc::downgrade(exchange));
    }

    /// `exchange` is no longer kept.
    pub fn evicted(&self, exchange: &Exchange) {
        self.send(Kind::Evicted, exchange, Weak::new());
    }

    fn send(&self, kind: Kind, exchange: &Exchange, weak: Weak<Exchange>) {
        let mut seq = self.seq();
        *seq += 1;
        exchange.set_version(*seq);
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Event {
                seq: *seq,
                kind,
                serial: exchange.serial,
                exchange: weak,
            });
        }
    }

    /// The last sequence number given, and a receiver of every event after it.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Event>) {
        let seq = self.seq();
        (*seq, self.tx.subscribe())
    }

    /// The last sequence number given.
    pub fn last(&self) -> u64 {
        *self.seq()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};

    fn exchange(serial: u64) -> Arc<Exchange> {
        let mut headers = HeaderMap::new();
        Arc::new(Exchange::new(
            serial,
            crate::correlation::assign(&mut headers),
            Method::GET,
            "/".into(),
            crate::exchange::Client::new("127.0.0.1:5000".parse().unwrap()),
        ))
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
    }
}
