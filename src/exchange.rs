//! The record of one request, from the moment its head is read to the moment its response ends: its
//! id and where the id came from, method, target and client, every timestamp, the bytes moved, the
//! phase it is in, what glance answered, and how it ended ([`Outcome`]).
//!
//! One [`Exchange`] is made per request and shared (`Arc`) by the pieces that move its bytes; they
//! write into it, and everything that reports on a request reads it: the arrival line, the stall
//! notices, the SIGUSR1 table, the completion line, the inspector, the capture and HAR. The
//! completion line is written once, when the registry's guard over the record is dropped
//! (`inflight::ExchangeGuard`), from what the record says here.
//!
//! Moving bytes is `body`'s business and choosing what to answer is `proxy`'s; nothing here does I/O
//! but logging.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use atomic_waker::AtomicWaker;
use http::{HeaderValue, Method, StatusCode};
use tracing::field::display;
use tracing::{info, warn};

use crate::config::FrontTimeout;
use crate::copies::Copies;
use crate::correlation::{Assigned, IdFrom};

/// The client a connection came from, rendered once when it is accepted.
#[derive(Debug)]
pub struct Client {
    pub addr: SocketAddr,
    /// `addr` as text, for the log (rendered once per connection, not per request).
    pub text: Box<str>,
    /// The client's IP as it is appended to `X-Forwarded-For`.
    pub ip: HeaderValue,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Arc<Client> {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Arc::new(Client {
            addr,
            text: addr.to_string().into_boxed_str(),
            ip,
        })
    }

    /// A client on a unix socket, which has no address: shown as `unix`, forwarded as
    /// `X-Forwarded-For: unix` (nginx's `$remote_addr` for one is `unix:`).
    pub fn unix() -> Arc<Client> {
        Arc::new(Client {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            text: "unix".into(),
            ip: HeaderValue::from_static("unix"),
        })
    }
}

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The request body is coming from the client and going to glance.
    ReceivingBody = 0,
    /// The whole request is with glance; its response head has not come.
    AwaitingHeaders = 1,
    /// glance's response head has been relayed; its body is streaming to the client.
    Streaming = 2,
    /// The shim is sending an answer of its own (a refusal, a 502, ...).
    Answering = 3,
    /// Nothing more will move.
    Done = 4,
}

impl Phase {
    /// The phase named `name` (as [`Phase::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<Phase> {
        [
            Phase::ReceivingBody,
            Phase::AwaitingHeaders,
            Phase::Streaming,
            Phase::Answering,
            Phase::Done,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::ReceivingBody,
            1 => Phase::AwaitingHeaders,
            2 => Phase::Streaming,
            3 => Phase::Answering,
            _ => Phase::Done,
        }
    }

    /// The phase as a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::ReceivingBody => "receiving_body",
            Phase::AwaitingHeaders => "awaiting_headers",
            Phase::Streaming => "streaming",
            Phase::Answering => "answering",
            Phase::Done => "done",
        }
    }
}

/// Who the request is waiting for right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Waiting {
    /// The upstream: to read what the shim has, or to send what it needs. A long wait here is a stall.
    Upstream = 0,
    /// The client: to send more of its body, or to read the response. Not the upstream's fault.
    Client = 1,
}

/// How a request ended, and which side ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// glance's response was relayed to its end.
    Completed,
    /// The shim refused the request itself (400, 405, 414, 508) and never forwarded it.
    Refused,
    /// No connection to the upstream could be made (502).
    UpstreamUnreachable,
    /// The upstream closed or broke the connection: before its response head (502), or in the middle
    /// of its body (the client's connection is aborted).
    UpstreamBrokeOff,
    /// The upstream answered something that is not HTTP/1.1 (502, or aborted mid-body).
    UpstreamInvalid,
    /// The client went away (or broke off its upload) before the response was complete.
    ClientGone,
    /// `--upstream-timeout` ran out with nothing moving (504 before the response head, aborted after).
    TimedOut,
    /// The shim shut down (`--drain` ran out, or a second Ctrl-C) before the request finished.
    Drained,
}

impl Outcome {
    /// The outcome named `name` (as [`Outcome::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<Outcome> {
        [
            Outcome::Completed,
            Outcome::Refused,
            Outcome::UpstreamUnreachable,
            Outcome::UpstreamBrokeOff,
            Outcome::UpstreamInvalid,
            Outcome::ClientGone,
            Outcome::TimedOut,
            Outcome::Drained,
        ]
        .into_iter()
        .find(|o| o.as_str() == name)
    }

    /// The outcome as a log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::UpstreamUnreachable => "upstream_unreachable",
            Outcome::UpstreamBrokeOff => "upstream_broke_off",
            Outcome::UpstreamInvalid => "upstream_invalid",
            Outcome::ClientGone => "client_gone",
            Outcome::TimedOut => "timed_out",
            Outcome::Drained => "drained",
        }
    }

    /// The completion line's message.
    fn message(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Refused => "refused by glance-shim",
            Outcome::UpstreamUnreachable => "failed: the upstream could not be reached",
            Outcome::UpstreamBrokeOff => "failed: the upstream broke off",
            Outcome::UpstreamInvalid => "failed: the upstream's answer was not valid HTTP/1.1",
            Outcome::ClientGone => "aborted: the client went away before the response was complete",
            Outcome::TimedOut => "failed: no progress from the upstream for --upstream-timeout",
            Outcome::Drained => "cut off: glance-shim shut down before the request finished",
        }
    }

    /// True for the endings that are forced on a request from outside, which wake whoever waits.
    fn is_cut_off(self) -> bool {
        matches!(self, Outcome::TimedOut | Outcome::Drained)
    }
}

/// How a request with `Expect: 100-continue` got its body sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// glance answered `100 Continue`, which the client was sent.
    Relayed,
    /// glance said nothing for a while; the shim sent the client its own `100 Continue`.
    TimedOut,
    /// glance is known not to answer `100 Continue` (uWSGI): the body was asked for at once.
    AtOnce,
    /// glance gave its final answer first: the client was never asked for the body.
    NotSent,
}

impl Continue {
    /// The way named `name` (as [`Continue::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<Continue> {
        [
            Continue::Relayed,
            Continue::TimedOut,
            Continue::AtOnce,
            Continue::NotSent,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Continue::Relayed => "relayed",
            Continue::TimedOut => "timed_out",
            Continue::AtOnce => "at_once",
            Continue::NotSent => "not_sent",
        }
    }
}

/// A moment in a request's life, after its arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The last byte of the request body was received (at arrival for a request without one).
    RequestBodyDone = 0,
    /// The request was handed to a connection to the upstream.
    SentUpstream = 1,
    /// The upstream's response head arrived.
    UpstreamHeaders = 2,
    /// The first byte of the response body was sent on to the client.
    FirstResponseByte = 3,
    /// The exchange ended, however it ended.
    Done = 4,
}

/// "Not yet" in a mark slot.
const UNSET: u64 = u64::MAX;

/// One request. Fields that change are atomics: the request body, the response body, the proxy and
/// the watchdog write and read them from different tasks.
#[derive(Debug)]
pub struct Exchange {
    /// Unique per process (two clients may send the same request id); the registry's key.
    pub serial: u64,
    /// The request id glance sees, printable.
    pub id: String,
    pub id_from: IdFrom,
    pub method: Method,
    /// The request target as received (path and query; the whole URL for absolute-form).
    pub target: String,
    pub client: Arc<Client>,
    /// When the request head was read, on the monotonic clock every other timestamp counts from...
    pub arrived: Instant,
    /// ...and on the wall clock, for showing.
    pub arrived_at: SystemTime,
    /// Microseconds after `arrived` of each [`Mark`], or [`UNSET`].
    marks: [AtomicU64; 5],
    /// Request body bytes received from the client.
    bytes_in: AtomicU64,
    /// Response body bytes sent on to the client (glance's, or the shim's own answer).
    bytes_out: AtomicU64,
    phase: AtomicU8,
    waiting: AtomicU8,
    /// Microseconds after `arrived` at which something last moved between the shim and glance, or the
    /// wait on glance began.
    last_progress_us: AtomicU64,
    /// Stall notices given in the current stall.
    stall_notices: AtomicU32,
    /// The status the client got (glance's, or the shim's own); 0 until there is one.
    status: AtomicU16,
    /// The status glance answered with; 0 when it answered nothing.
    upstream_status: AtomicU16,
    /// The `x-openstack-request-id` glance answered with.
    upstream_id: OnceLock<String>,
    /// For a request with `Expect: 100-continue`: how its body came to be sent (a [`Continue`]).
    expect: OnceLock<Continue>,
    /// How it ended: set once, by whoever first knows.
    outcome: OnceLock<Outcome>,
    /// The [`Phase`] it was in when its ending was decided.
    ended_in: AtomicU8,
    /// What went wrong, in a few words, when it did not complete.
    error: OnceLock<String>,
    /// Woken when the request is cut off (timeout, shutdown), so that whoever waits on the upstream
    /// for it stops waiting.
    cut_off: AtomicWaker,
    /// The sequence number of the last event about this request (see `events`).
    version: AtomicU64,
    /// What the inspector keeps of its heads and bodies (nothing with `--inspect off`).
    pub copies: Copies,
    /// Read back from a capture directory (`--capture`), not seen by this process.
    pub from_disk: bool,
    /// Sent again from the inspector: the request it replays.
    pub replay_of: Option<ReplayOf>,
}

/// The request a replay sends again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayOf {
    pub serial: u64,
    pub id: String,
}

/// A finished request's values as plain data: what `capture` writes for it (borrowed from the
/// record), and reads back (owned). Fields that are absent are left out of the line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved<'a> {
    pub id: Cow<'a, str>,
    pub id_from: Cow<'a, str>,
    pub method: Cow<'a, str>,
    pub target: Cow<'a, str>,
    pub client: Cow<'a, str>,
    /// RFC 3339, to the microsecond.
    pub arrived_at: String,
    /// Microseconds after arrival of each [`Mark`], in its order.
    pub marks_us: [Option<u64>; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Cow<'a, str>>,
    pub ended_in: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Cow<'a, str>>,
}

impl Saved<'_> {
    pub fn into_owned(self) -> Saved<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        Saved {
            id: own(self.id),
            id_from: own(self.id_from),
            method: own(self.method),
            target: own(self.target),
            client: own(self.client),
            arrived_at: self.arrived_at,
            marks_us: self.marks_us,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            status: self.status,
            upstream_status: self.upstream_status,
            upstream_id: self.upstream_id.map(own),
            outcome: self.outcome.map(own),
            ended_in: own(self.ended_in),
            error: self.error.map(own),
            expect: self.expect.map(own),
        }
    }
}

impl Exchange {
    /// The record of a request whose head was just read.
    pub fn new(
        serial: u64,
        assigned: Assigned,
        method: Method,
        target: String,
        client: Arc<Client>,
        copies: Copies,
    ) -> Exchange {
        Exchange {
            serial,
            id: assigned.id,
            id_from: assigned.from,
            method,
            target,
            client,
            arrived: Instant::now(),
            arrived_at: SystemTime::now(),
            marks: std::array::from_fn(|_| AtomicU64::new(UNSET)),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::ReceivingBody as u8),
            waiting: AtomicU8::new(Waiting::Upstream as u8),
            last_progress_us: AtomicU64::new(0),
            stall_notices: AtomicU32::new(0),
            status: AtomicU16::new(0),
            upstream_status: AtomicU16::new(0),
            upstream_id: OnceLock::new(),
            expect: OnceLock::new(),
            outcome: OnceLock::new(),
            ended_in: AtomicU8::new(Phase::Done as u8),
            error: OnceLock::new(),
            cut_off: AtomicWaker::new(),
            version: AtomicU64::new(0),
            copies,
            from_disk: false,
            replay_of: None,
        }
    }

    /// The values of this record, to be written down.
    pub fn saved(&self) -> Saved<'_> {
        Saved {
            id: Cow::Borrowed(&self.id),
            id_from: Cow::Borrowed(self.id_from.as_str()),
            method: Cow::Borrowed(self.method.as_str()),
            target: Cow::Borrowed(&self.target),
            client: Cow::Borrowed(&self.client.text),
            arrived_at: humantime::format_rfc3339_micros(self.arrived_at).to_string(),
            marks_us: std::array::from_fn(|i| {
                Some(self.marks[i].load(Ordering::Relaxed)).filter(|&us| us != UNSET)
            }),
            bytes_in: self.bytes_in(),
            bytes_out: self.bytes_out(),
            status: self.status(),
            upstream_status: self.upstream_status(),
            upstream_id: self.upstream_id().map(Cow::Borrowed),
            outcome: self.outcome().map(|o| Cow::Borrowed(o.as_str())),
            ended_in: Cow::Borrowed(self.ended_in().as_str()),
            error: self.error().map(Cow::Borrowed),
            expect: self.expect().map(|c| Cow::Borrowed(c.as_str())),
        }
    }

    /// A record made again from `saved` (marked as from disk), under this process's `serial`; what
    /// does not parse is named in the error.
    pub fn restore(serial: u64, saved: Saved<'_>, copies: Copies) -> Result<Exchange, String> {
        let arrived_at = humantime::parse_rfc3339(&saved.arrived_at)
            .map_err(|e| format!("arrived_at '{}': {e}", saved.arrived_at))?;
        let method = Method::from_bytes(saved.method.as_bytes())
            .map_err(|_| format!("method '{}'", saved.method))?;
        let client = saved
            .client
            .parse()
            .map_err(|_| format!("client '{}'", saved.client))?;
        let outcome = match &saved.outcome {
            None => None,
            Some(o) => Some(Outcome::from_name(o).ok_or_else(|| format!("outcome '{o}'"))?),
        };
        let ended_in = Phase::from_name(&saved.ended_in)
            .ok_or_else(|| format!("ended_in '{}'", saved.ended_in))?;
        // As long ago on the monotonic clock as on the wall clock (as of now), for showing ages.
        let ago = SystemTime::now()
            .duration_since(arrived_at)
            .unwrap_or_default();
        let arrived = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        let id_from = match &*saved.id_from {
            "client" => IdFrom::Client,
            "replaced" => IdFrom::Replaced {
                why: crate::correlation::Replaced::Unrecorded,
                original: String::new(),
            },
            _ => IdFrom::Shim,
        };
        let mut e = Exchange::new(
            serial,
            Assigned {
                id: saved.id.into_owned(),
                from: id_from,
            },
            method,
            saved.target.into_owned(),
            Client::new(client),
            copies,
        );
        e.arrived = arrived;
        e.arrived_at = arrived_at;
        e.from_disk = true;
        for (slot, us) in e.marks.iter().zip(saved.marks_us) {
            slot.store(us.unwrap_or(UNSET), Ordering::Relaxed);
        }
        e.bytes_in.store(saved.bytes_in, Ordering::Relaxed);
        e.bytes_out.store(saved.bytes_out, Ordering::Relaxed);
        e.status.store(saved.status.unwrap_or(0), Ordering::Relaxed);
        e.upstream_status
            .store(saved.upstream_status.unwrap_or(0), Ordering::Relaxed);
        if let Some(id) = saved.upstream_id {
            let _ = e.upstream_id.set(id.into_owned());
        }
        if let Some(o) = outcome {
            let _ = e.outcome.set(o);
        }
        if let Some(c) = saved.expect.as_deref().and_then(Continue::from_name) {
            let _ = e.expect.set(c);
        }
        if let Some(error) = saved.error {
            let _ = e.error.set(error.into_owned());
        }
        e.ended_in.store(ended_in as u8, Ordering::Relaxed);
        e.phase.store(Phase::Done as u8, Ordering::Relaxed);
        Ok(e)
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.arrived).as_micros()).unwrap_or(UNSET - 1)
    }

    // ---- writing: what happened ------------------------------------------------------------------

    /// Records that `mark` happened now, unless it already did.
    pub fn mark(&self, mark: Mark) {
        // Called for every response frame (the first byte's mark): no clock read once it is set.
        if self.marks[mark as usize].load(Ordering::Relaxed) != UNSET {
            return;
        }
        let now = self.micros(Instant::now());
        let _ = self.marks[mark as usize].compare_exchange(
            UNSET,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The request body has been received whole: the request is now glance's to answer.
    pub fn request_body_done(&self) {
        self.mark(Mark::RequestBodyDone);
        let _ = self.phase.compare_exchange(
            Phase::ReceivingBody as u8,
            Phase::AwaitingHeaders as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// glance's response head arrived: `status`, and the request id it names.
    pub fn upstream_answered(&self, status: StatusCode, upstream_id: Option<String>) {
        self.mark(Mark::UpstreamHeaders);
        self.upstream_status
            .store(status.as_u16(), Ordering::Relaxed);
        self.status.store(status.as_u16(), Ordering::Relaxed);
        if let Some(id) = upstream_id {
            let _ = self.upstream_id.set(id);
        }
        self.set_phase(Phase::Streaming);
        self.progress(Waiting::Upstream);
    }

    /// The shim answers the request itself with `status`.
    pub fn shim_answers(&self, status: StatusCode) {
        self.status.store(status.as_u16(), Ordering::Relaxed);
        self.set_phase(Phase::Answering);
    }

    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Something moved between the shim and glance (a body frame either way, the response head); the
    /// request now waits on `next`. Ends a stall, saying so if it earned a notice.
    pub fn progress(&self, next: Waiting) {
        let now = self.micros(Instant::now());
        let before = self.last_progress_us.swap(now, Ordering::Relaxed);
        self.waiting.store(next as u8, Ordering::Relaxed);
        if self.stall_notices.load(Ordering::Relaxed) > 0
            && self.stall_notices.swap(0, Ordering::Relaxed) > 0
        {
            let paused = Duration::from_micros(now.saturating_sub(before));
            info!(
                id = %self.id,
                method = %self.method,
                path = %self.target,
                paused_s = secs(paused),
                "the upstream is moving again after {:.1} s",
                paused.as_secs_f64()
            );
        }
    }

    /// Records who is being waited for, without counting it as progress. A wait on glance that follows
    /// a wait on the client is timed from now: the client's slowness is not glance's stall.
    pub fn waiting_on(&self, who: Waiting) {
        let before = self.waiting.swap(who as u8, Ordering::Relaxed);
        if who == Waiting::Upstream && before == Waiting::Client as u8 {
            self.last_progress_us
                .store(self.micros(Instant::now()), Ordering::Relaxed);
        }
    }

    pub fn set_expect(&self, how: Continue) {
        let _ = self.expect.set(how);
    }

    /// Sets how the request ended, unless something already did; `error` says what went wrong.
    /// Returns whether this call decided it.
    pub fn end(&self, outcome: Outcome, error: Option<String>) -> bool {
        if self.outcome.set(outcome).is_err() {
            return false;
        }
        self.ended_in
            .store(self.phase.load(Ordering::Relaxed), Ordering::Relaxed);
        if let Some(error) = error {
            let _ = self.error.set(error);
        }
        true
    }

    /// Ends the request from outside (a timeout, the shutdown) and wakes whoever waits on it.
    pub fn cut_off(&self, outcome: Outcome, why: String) {
        debug_assert!(outcome.is_cut_off());
        if self.end(outcome, Some(why)) {
            self.cut_off.wake();
        }
    }

    /// Ready with the outcome once the request has been cut off.
    pub fn poll_cut_off(&self, cx: &mut Context<'_>) -> Poll<Outcome> {
        self.cut_off.register(cx.waker());
        match self.outcome.get() {
            Some(&o) if o.is_cut_off() => Poll::Ready(o),
            _ => Poll::Pending,
        }
    }

    /// Completes once the request has been cut off.
    pub async fn cut_off_wait(&self) -> Outcome {
        std::future::poll_fn(|cx| self.poll_cut_off(cx)).await
    }

    pub(crate) fn set_version(&self, seq: u64) {
        self.version.store(seq, Ordering::Release);
    }

    // ---- reading ---------------------------------------------------------------------------------

    /// The sequence number of the last event about this request.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// When `mark` happened, counted from arrival.
    pub fn at(&self, mark: Mark) -> Option<Duration> {
        match self.marks[mark as usize].load(Ordering::Relaxed) {
            UNSET => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub fn waiting(&self) -> Waiting {
        if self.waiting.load(Ordering::Relaxed) == Waiting::Client as u8 {
            Waiting::Client
        } else {
            Waiting::Upstream
        }
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// The status the client got, if any yet.
    pub fn status(&self) -> Option<u16> {
        Some(self.status.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }

    /// The status glance answered with, if it answered.
    pub fn upstream_status(&self) -> Option<u16> {
        Some(self.upstream_status.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }

    pub fn upstream_id(&self) -> Option<&str> {
        self.upstream_id.get().map(String::as_str)
    }

    pub fn expect(&self) -> Option<Continue> {
        self.expect.get().copied()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.get().copied()
    }

    pub fn error(&self) -> Option<&str> {
        self.error.get().map(String::as_str)
    }

    /// How long nothing has moved while waiting on glance, as of `now`.
    pub fn idle(&self, now: Instant) -> Duration {
        let last = Duration::from_micros(self.last_progress_us.load(Ordering::Relaxed));
        now.saturating_duration_since(self.arrived)
            .saturating_sub(last)
    }

    /// Stall notices given in the current stall.
    pub fn stall_notices(&self) -> u32 {
        self.stall_notices.load(Ordering::Relaxed)
    }

    // ---- the lines --------------------------------------------------------------------------------

    /// The arrival line, written before anything is sent upstream: when a breakpoint holds this
    /// request, this line is already in the log. `headers` are the request headers, masked.
    pub fn log_arrival(&self, headers: Option<String>) {
        info!(
            id = %self.id,
            method = %self.method,
            path = %self.target,
            client = %self.client.text,
            id_from = %self.id_from.as_str(),
            headers,
            replay_of = self.replay_of.as_ref().map(|r| display(&r.id)),
            "arrived"
        );
        if let IdFrom::Replaced { why, original } = &self.id_from {
            warn!(
                id = %self.id,
                original = original.as_str(),
                "{why}; sent glance-shim's id {} instead",
                self.id
            );
        }
    }

    /// A notice that glance has kept this request waiting for `idle`, with how long Apache in
    /// front (`front`) still waits for it.
    pub fn log_stall(&self, idle: Duration, front: Option<&FrontTimeout>) {
        self.stall_notices.fetch_add(1, Ordering::Relaxed);
        let phase = self.phase();
        let what = match phase {
            Phase::ReceivingBody => "has read nothing more of the request body",
            Phase::Streaming => "has sent nothing more of its response",
            _ => "has not answered",
        };
        warn!(
            id = %self.id,
            method = %self.method,
            path = %self.target,
            client = %self.client.text,
            phase = %phase.as_str(),
            waited_s = secs(idle),
            apache_gives_up_in_s = front.map(|f| secs(f.limit.saturating_sub(idle))),
            "the upstream {what} for {:.1} s: it is probably paused at a breakpoint{}",
            idle.as_secs_f64(),
            front.map(|f| apache_left(f, idle)).unwrap_or_default()
        );
    }

    /// A request whose client left as Apache's timeout ran out, with no answer yet: Apache gave up
    /// on it and answered its client itself. Says so, and what to raise, as the request's error.
    pub fn note_front_timeout(&self, front: &FrontTimeout, now: Instant) {
        // A second's slack: Apache's clock started when it had sent the request's last byte.
        if self.outcome().is_some() || self.idle(now) + Duration::from_secs(1) < front.limit {
            return;
        }
        self.end(
            Outcome::ClientGone,
            Some(format!(
                "Apache gave up on it after {} s ({}) and answered its client {} itself; to hold a \
                 breakpoint longer, raise it, or set ProxyTimeout (or timeout= on the ProxyPass) in {}",
                front.limit.as_secs(),
                front.directive,
                front.status,
                front.site.display()
            )),
        );
    }

    /// One line of the in-flight table.
    pub fn table_row(&self, now: Instant, out: &mut String) {
        let state = match (self.phase(), self.waiting()) {
            (Phase::ReceivingBody, Waiting::Client) => "receiving the client's body",
            (Phase::ReceivingBody, Waiting::Upstream) if self.expect().is_none() => {
                "waiting for the upstream to read the body"
            }
            (Phase::ReceivingBody, Waiting::Upstream) => "waiting for the upstream's 100 Continue",
            (Phase::AwaitingHeaders, _) => "waiting for upstream headers",
            (Phase::Streaming, Waiting::Upstream) => "waiting for upstream body",
            (Phase::Streaming, Waiting::Client) => "sending to the client",
            (Phase::Answering, _) => "sending glance-shim's own answer",
            (Phase::Done, _) => "done",
        };
        let _ = write!(
            out,
            "\n  {} {} {} from {} age={:.1}s idle={:.1}s in={} out={} {}",
            self.id,
            self.method,
            self.target,
            self.client.text,
            now.saturating_duration_since(self.arrived).as_secs_f64(),
            self.idle(now).as_secs_f64(),
            self.bytes_in(),
            self.bytes_out(),
            state,
        );
    }

    /// The phase it was in when its ending was decided.
    pub fn ended_in(&self) -> Phase {
        Phase::from_u8(self.ended_in.load(Ordering::Relaxed))
    }

    /// Settles the record of a request that is over, however it ended: its end is marked, a request
    /// nobody finished was left by its client, and nothing waits on it any more. Returns how it
    /// ended.
    pub fn settle(&self) -> Outcome {
        self.mark(Mark::Done);
        self.end(Outcome::ClientGone, None);
        self.set_phase(Phase::Done);
        // Nothing waits on a finished request: let go of the connection task's waker now, while it
        // is hot, rather than when the kept record is dropped long after.
        drop(self.cut_off.take());
        self.outcome().unwrap_or(Outcome::ClientGone)
    }

    /// The completion line: every request gets exactly one, when its guard is dropped.
    pub fn log_completion(&self, outcome: Outcome) {
        let total_ms = self.at(Mark::Done).map(millis);
        let upstream_headers_ms = self.at(Mark::UpstreamHeaders).map(millis);
        let status = self.status();
        let expect_100 = self.expect().map(|c| display(c.as_str()));
        // Where a request that did not complete was cut short.
        let ended_in = (outcome != Outcome::Completed).then(|| display(self.ended_in().as_str()));
        macro_rules! line {
            ($level:ident) => {
                $level!(
                    id = %self.id,
                    method = %self.method,
                    path = %self.target,
                    outcome = %outcome.as_str(),
                    status,
                    bytes_in = self.bytes_in(),
                    bytes_out = self.bytes_out(),
                    upstream_headers_ms,
                    total_ms,
                    upstream_id = self.upstream_id().map(display),
                    expect_100,
                    ended_in,
                    error = self.error(),
                    "{}",
                    outcome.message()
                )
            };
        }
        // Only a clean relay is INFO: everything else is worth a look.
        if outcome == Outcome::Completed {
            line!(info);
        } else {
            line!(warn);
        }
    }
}

/// A record for unit tests: `method target` from 127.0.0.1:5000, with an id of the shim's.
#[cfg(test)]
pub(crate) fn for_test(serial: u64, method: Method, target: &str) -> Exchange {
    let mut headers = http::HeaderMap::new();
    Exchange::new(
        serial,
        crate::correlation::assign(&mut headers),
        method,
        target.into(),
        Client::new("127.0.0.1:5000".parse().unwrap()),
        Copies::default(),
    )
}

/// What a stall notice adds about Apache's clock.
fn apache_left(front: &FrontTimeout, idle: Duration) -> String {
    match front.limit.checked_sub(idle) {
        Some(left) if !left.is_zero() => format!(
            "; Apache gives up on it in {:.0} s ({}), and answers its client {}",
            left.as_secs_f64().ceil(),
            front.directive,
            front.status
        ),
        _ => format!(
            "; Apache's timeout has run out ({}): it has answered its client {}",
            front.directive, front.status
        ),
    }
}

/// Milliseconds with a tenth, as a log field.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// Seconds with a tenth, as a log field.
pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange() -> Exchange {
        for_test(7, Method::PUT, "/v2/images/x/file")
    }

    #[test]
    fn the_first_outcome_stands() {
        let e = exchange();
        assert!(e.end(Outcome::UpstreamBrokeOff, Some("reset".into())));
        assert!(!e.end(Outcome::Completed, None));
        assert_eq!(e.outcome(), Some(Outcome::UpstreamBrokeOff));
        assert_eq!(e.error(), Some("reset"));
    }

    #[test]
    fn marks_are_set_once() {
        let e = exchange();
        assert_eq!(e.at(Mark::FirstResponseByte), None);
        e.mark(Mark::FirstResponseByte);
        let first = e.at(Mark::FirstResponseByte).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        e.mark(Mark::FirstResponseByte);
        assert_eq!(e.at(Mark::FirstResponseByte), Some(first));
    }

    #[test]
    fn idle_counts_from_the_last_progress_and_not_from_the_clients_slowness() {
        let e = exchange();
        let later = e.arrived + Duration::from_secs(7);
        assert_eq!(e.idle(later), Duration::from_secs(7));
        e.last_progress_us.store(5_000_000, Ordering::Relaxed);
        assert_eq!(e.idle(later), Duration::from_secs(2));
        // Waiting on the client, then on glance again: the wait on glance starts now.
        e.waiting_on(Waiting::Client);
        e.waiting_on(Waiting::Upstream);
        assert!(e.idle(Instant::now()) < Duration::from_secs(1));
    }

    #[test]
    fn a_cut_off_wakes_the_waiter_and_other_endings_do_not() {
        let e = Arc::new(exchange());
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(e.poll_cut_off(&mut cx).is_pending());
        e.end(Outcome::ClientGone, None);
        assert!(e.poll_cut_off(&mut cx).is_pending(), "not a cut-off");
        let e = Arc::new(exchange());
        e.cut_off(Outcome::TimedOut, "no progress".into());
        assert_eq!(e.poll_cut_off(&mut cx), Poll::Ready(Outcome::TimedOut));
    }

    #[test]
    fn the_request_body_phase_gives_way_to_awaiting_headers_once() {
        let e = exchange();
        assert_eq!(e.phase(), Phase::ReceivingBody);
        e.request_body_done();
        assert_eq!(e.phase(), Phase::AwaitingHeaders);
        e.upstream_answered(StatusCode::OK, Some("req-g".into()));
        e.request_body_done(); // a late end of the body does not go back in time
        assert_eq!(e.phase(), Phase::Streaming);
        assert_eq!(e.status(), Some(200));
        assert_eq!(e.upstream_id(), Some("req-g"));
    }
}
