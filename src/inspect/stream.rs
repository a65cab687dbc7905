//! The event stream (`/api/events`, Server-Sent Events): every change to a kept request as it
//! happens, resumable with `Last-Event-ID` (or `?since=`), and a tick with the requests in flight.
//!
//! Each connection has its own task, which reads the events and writes them into a small channel
//! the response body drains. The proxy never waits for it: a reader that stops reading blocks only
//! its own task; the events it misses pile up in nobody's memory (the ring is fixed), and when it
//! reads again it is told to resync (`event: resync`), or, if it stays silent past
//! [`SILENT_READER`], its stream is closed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::{Inspector, Out, view};
use crate::events::{Event, Kind, Subscription};

/// How often the requests in flight are sent (their counters, bytes and phases move between events).
const TICK: Duration = Duration::from_secs(1);

/// A comment sent when nothing else was, so that a reader that went away is noticed.
const PING: Duration = Duration::from_secs(15);

/// A reader that has taken nothing for this long loses its stream.
const SILENT_READER: Duration = Duration::from_secs(30);

/// The event stream's response; `since` is the last event the reader has.
pub fn events(inspector: Arc<Inspector>, since: Option<u64>) -> Response<Out> {
    let (tx, rx) = mpsc::channel(16);
    // Subscribed here, before the response goes out: nothing published after `seq` is missed.
    let (seq, events) = inspector.registry.events().subscribe();
    tokio::spawn(feed(inspector, since, seq, events, tx));
    let mut res = Response::new(Out::Stream(rx));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn feed(
    inspector: Arc<Inspector>,
    since: Option<u64>,
    seq: u64,
    mut events: Subscription,
    tx: mpsc::Sender<Bytes>,
) {
    let out = Sender(tx);
    // Reconnect after a second, not EventSource's default three.
    let mut first = String::from("retry: 1000\n\n");
    let mut all = inspector.registry.snapshot();
    if let Some(k) = inspector.registry.keeper() {
        all.extend(k.snapshot());
    }
    let serials: Vec<u64> = all.iter().map(|e| e.serial).collect();
    message(&mut first, "kept", None, &Kept { serials, seq });
    if !out.send(first).await {
        return;
    }
    if let Some(since) = since {
        // Every request that changed after `since` and up to `seq`, oldest change first; later
        // changes come as events.
        all.retain(|e| e.version() > since && e.version() <= seq);
        all.sort_by_key(|e| e.version());
        let cx = inspector.context();
        for e in all {
            let mut text = String::new();
            message(
                &mut text,
                "update",
                Some(e.version()),
                &view::summary(&e, &cx),
            );
            if !out.send(text).await {
                return;
            }
        }
    }

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = tokio::time::interval(PING);
    quiet.reset();
    loop {
        let text = tokio::select! {
            event = events.rx.recv() => match event {
                Ok(event) => render(&inspector, &event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let mut text = String::new();
                    let reason = format!("this reader fell {missed} events behind; fetch /api/requests and reopen the stream");
                    message(&mut text, "resync", None, &Resync { reason, missed });
                    let _ = out.send(text).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let open = inspector.registry.snapshot();
                if open.is_empty() {
                    continue;
                }
                let cx = inspector.context();
                let mut text = String::new();
                message(&mut text, "inflight", None, &InFlight {
                    now: view::rfc3339(std::time::SystemTime::now()),
                    requests: open.iter().map(|e| view::summary(e, &cx)).collect(),
                });
                text
            }
            _ = quiet.tick() => ": ping\n\n".to_owned(),
            () = out.0.closed() => return,
        };
        if !out.send(text).await {
            return;
        }
        quiet.reset();
    }
}

/// The channel to the response body.
struct Sender(mpsc::Sender<Bytes>);

impl Sender {
    /// False once the reader is gone, or has read nothing for [`SILENT_READER`].
    async fn send(&self, text: String) -> bool {
        matches!(
            tokio::time::timeout(SILENT_READER, self.0.send(Bytes::from(text))).await,
            Ok(Ok(()))
        )
    }
}

fn render(inspector: &Inspector, event: &Event) -> String {
    let mut text = String::new();
    match (event.kind, event.exchange.upgrade()) {
        (Kind::Evicted, _) | (_, None) => message(
            &mut text,
            Kind::Evicted.as_str(),
            Some(event.seq),
            &Evicted {
                serial: event.serial,
            },
        ),
        (kind, Some(e)) => {
            let cx = inspector.context();
            message(
                &mut text,
                kind.as_str(),
                Some(event.seq),
                &view::summary(&e, &cx),
            );
        }
    }
    text
}

/// Appends one message: `event:`, `id:` and one `data:` line of JSON.
fn message(out: &mut String, event: &str, id: Option<u64>, data: &impl Serialize) {
    let _ = writeln!(out, "event: {event}");
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    // serde_json never writes a raw newline, so the data is one line.
    let data = serde_json::to_string(data).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let _ = write!(out, "data: {data}\n\n");
}

#[derive(Serialize)]
struct Kept {
    serials: Vec<u64>,
    seq: u64,
}

#[derive(Serialize)]
struct Evicted {
    serial: u64,
}

#[derive(Serialize)]
struct Resync {
    reason: String,
    missed: u64,
}

#[derive(Serialize)]
struct InFlight<'a> {
    now: String,
    requests: Vec<view::Summary<'a>>,
}
