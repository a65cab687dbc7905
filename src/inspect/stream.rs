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
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use super::view::{self, Filter};
use crate::events::{Event, Kind};
use crate::inflight::Registry;

/// How often the requests in flight are sent (their counters, bytes and phases move between events).
const TICK: Duration = Duration::from_secs(1);

/// A comment sent when nothing else was, so that a reader that went away is noticed.
const PING: Duration = Duration::from_secs(15);

/// A reader that has taken nothing for this long loses its stream.
const SILENT_READER: Duration = Duration::from_secs(30);

/// What a reader of the stream asked for.
pub struct Reader {
    /// The last event the reader has.
    pub since: Option<u64>,
    /// What its filter box holds: every summary says whether it is shown.
    pub filter: Option<Filter>,
    /// The views' settings.
    pub cx: view::Context,
}

/// The event stream's body, fed by a task of its own until the reader goes away.
pub fn events(registry: Arc<Registry>, reader: Reader) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(16);
    // Subscribed here, before the response goes out: nothing published after `seq` is missed.
    let (seq, events) = registry.events().subscribe();
    tokio::spawn(feed(registry, reader, seq, events, tx));
    rx
}

async fn feed(
    registry: Arc<Registry>,
    reader: Reader,
    seq: u64,
    mut events: broadcast::Receiver<Event>,
    tx: mpsc::Sender<Bytes>,
) {
    let out = Sender(tx);
    let summary = |e: &crate::exchange::Exchange| -> String {
        serde_json::to_string(&view::filtered(
            e,
            &reader.cx.renewed(),
            reader.filter.as_ref(),
        ))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    };
    // Reconnect after a second, not EventSource's default three.
    let mut first = String::from("retry: 1000\n\n");
    let mut all = registry.snapshot();
    all.extend(registry.finished());
    let serials: Vec<u64> = all.iter().map(|e| e.serial).collect();
    message(&mut first, "kept", None, &Kept { serials, seq });
    if !out.send(first).await {
        return;
    }
    if let Some(since) = reader.since {
        // Every request that changed after `since` and up to `seq`, oldest change first; later
        // changes come as events.
        all.retain(|e| e.version() > since && e.version() <= seq);
        all.sort_by_key(|e| e.version());
        for e in all {
            let mut text = String::new();
            raw_message(&mut text, "update", Some(e.version()), &summary(&e));
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
            event = events.recv() => match event {
                Ok(event) => render(&event, &summary),
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
                let open = registry.snapshot();
                if open.is_empty() {
                    continue;
                }
                let cx = reader.cx.renewed();
                let mut text = String::new();
                message(&mut text, "inflight", None, &InFlight {
                    now: view::rfc3339(std::time::SystemTime::now()),
                    requests: open.iter().map(|e| view::filtered(e, &cx, reader.filter.as_ref())).collect(),
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

fn render(event: &Event, summary: &impl Fn(&crate::exchange::Exchange) -> String) -> String {
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
        (kind, Some(e)) => raw_message(&mut text, kind.as_str(), Some(event.seq), &summary(&e)),
    }
    text
}

/// Appends one message: `event:`, `id:` and one `data:` line of JSON.
fn message(out: &mut String, event: &str, id: Option<u64>, data: &impl Serialize) {
    // serde_json never writes a raw newline, so the data is one line.
    let data = serde_json::to_string(data).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    raw_message(out, event, id, &data);
}

/// Appends one message whose data is already one line of JSON.
fn raw_message(out: &mut String, event: &str, id: Option<u64>, data: &str) {
    let _ = writeln!(out, "event: {event}");
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
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
