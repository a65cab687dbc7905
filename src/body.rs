//! The two streaming bodies: the client's request body on its way to glance, and the response on its
//! way back. Both pass frames through untouched and write what moved into the request's [`Exchange`];
//! the response body owns the request's [`ExchangeGuard`], so the request ends (and its completion
//! line is written) when hyper is done with the response, however that happened.
//!
//! The request body also holds back a body announced with `Expect: 100-continue` until glance asks for
//! it (see [`ContinueGate`]): a client is never made to send a body glance refused unread.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use crate::copies::Copier;
use crate::exchange::{Continue, Exchange, Mark, Outcome, Waiting};
use crate::inflight::{ExchangeGuard, Registry};
use crate::upstream::Health;

/// How long glance may take to answer `Expect: 100-continue` before the body is sent anyway: what
/// curl waits before it sends its body unasked.
pub const EXPECT_WAIT: Duration = Duration::from_secs(1);

/// The largest piece of a request body sent on at once. A chunked upload leaves the shim in chunks no
/// larger than this, well under the 1 MiB uWSGI's `chunked-input-limit` refuses by default, whatever
/// the size of the client's chunks (glanceclient sends exactly 1 MiB).
pub const MAX_FRAME: usize = 256 * 1024;
const _: () = assert!(MAX_FRAME < 1 << 20);

/// The error a body ends with when it cannot go on; hyper then aborts the connection it was going to,
/// so a truncated transfer never looks complete.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body, forwarded frame by frame.
pub struct RequestBody {
    inner: Inbound,
    exchange: Arc<Exchange>,
    /// Set while a body announced with `Expect: 100-continue` is held back.
    gate: Option<ContinueGate>,
    /// What is left of a received frame larger than [`MAX_FRAME`].
    rest: Option<Bytes>,
    /// With the inspector on: the copy of the body's start, until the body ends.
    copy: Option<(Copier, Arc<Registry>)>,
}

impl RequestBody {
    pub fn new(
        inner: Inbound,
        exchange: Arc<Exchange>,
        gate: Option<ContinueGate>,
        registry: &Arc<Registry>,
    ) -> RequestBody {
        // A request without a body has nothing to copy (its record knows it is empty).
        let copy = match inner.is_end_stream() {
            true => None,
            false => registry.copier().map(|copier| (copier, registry.clone())),
        };
        RequestBody {
            inner,
            exchange,
            gate,
            rest: None,
            copy,
        }
    }

    /// The body has ended (`ended`: cleanly): what was copied of it goes into the record.
    fn keep_copy(&mut self, ended: bool) {
        if let Some((copier, _)) = self.copy.take() {
            self.exchange.copies.keep_request_body(copier.finish(ended));
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.keep_copy(false);
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("id", &self.exchange.id)
            .field("gated", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a request body comes from: the client's connection, or the bytes a replay sends.
#[derive(Debug)]
pub enum Inbound {
    Client(Incoming),
    Replay(Option<Bytes>),
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Inbound::Client(inner) => Pin::new(inner).poll_frame(cx),
            Inbound::Replay(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inbound::Client(inner) => inner.is_end_stream(),
            Inbound::Replay(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Client(inner) => inner.size_hint(),
            Inbound::Replay(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(rest) = &mut this.rest {
            let piece = if rest.len() > MAX_FRAME {
                rest.split_to(MAX_FRAME)
            } else {
                this.rest.take().unwrap_or_default()
            };
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if let Some(gate) = &mut this.gate {
            match gate.poll_open(cx) {
                Poll::Pending => {
                    this.exchange.waiting_on(Waiting::Upstream);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Ok(how)) => {
                    this.exchange.set_expect(how);
                    this.gate = None;
                }
            }
        }
        // The first poll of a body that came with `Expect: 100-continue` is what makes hyper send the
        // client its `100 Continue`.
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let exchange = &this.exchange;
        match polled {
            Poll::Pending => {
                exchange.waiting_on(Waiting::Client);
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    exchange.add_bytes_in(data.len() as u64);
                    if let Some((copier, registry)) = &mut this.copy {
                        registry.copy(copier, data);
                    }
                }
                exchange.progress(Waiting::Upstream);
                // hyper stops polling once the body says it has ended, so the end is seen here.
                if this.inner.is_end_stream() {
                    exchange.request_body_done();
                    this.keep_copy(true);
                }
                match frame.into_data() {
                    Ok(mut data) if data.len() > MAX_FRAME => {
                        this.rest = Some(data.split_off(MAX_FRAME));
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                }
            }
            Poll::Ready(Some(Err(e))) => {
                exchange.end(Outcome::ClientGone, Some(crate::error::chain(&e)));
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                exchange.request_body_done();
                this.keep_copy(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

// ---------------------------------------------------------------------------------------------
// Expect: 100-continue

const WAITING: u8 = 0;
/// glance answered `100 Continue`, or was given long enough to.
const GO: u8 = 1;
/// glance gave its final answer while the body was held back: it will never be sent.
const ANSWERED: u8 = 2;
/// ... and that answer has been relayed: the body gives up, which closes the upstream connection.
const ABANDONED: u8 = 3;

/// What glance said about a held-back body, shared by the request body, the callback hyper calls for
/// a `1xx` answer, and the proxy.
#[derive(Debug, Default)]
pub struct ContinueSignal {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl ContinueSignal {
    fn set(&self, from: u8, to: u8) {
        if self
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// glance answered `100 Continue`.
    pub fn go(&self) {
        self.set(WAITING, GO);
    }

    /// glance's final answer came while the body was still held back; returns whether it was.
    pub fn answered(&self) -> bool {
        self.state
            .compare_exchange(WAITING, ANSWERED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The final answer has been relayed: a body still held back is given up.
    pub fn abandon(&self) {
        self.set(ANSWERED, ABANDONED);
    }
}

/// Holds a request body back until glance answers `100 Continue`, or says nothing for
/// [`EXPECT_WAIT`] (uWSGI never answers it), or gives its final answer first. Until then the client,
/// which waits for a `100 Continue` before it sends, is not asked for the body.
pub struct ContinueGate {
    signal: Arc<ContinueSignal>,
    /// Started at the first poll: hyper asks for the body once the head is written to glance.
    timer: Option<Pin<Box<Sleep>>>,
    health: Arc<Health>,
}

impl ContinueGate {
    pub fn new(signal: Arc<ContinueSignal>, health: Arc<Health>) -> ContinueGate {
        ContinueGate {
            signal,
            timer: None,
            health,
        }
    }

    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<Result<Continue, BodyError>> {
        self.signal.waker.register(cx.waker());
        match self.signal.state.load(Ordering::Acquire) {
            GO => Poll::Ready(Ok(Continue::Relayed)),
            ANSWERED => Poll::Pending,
            ABANDONED => Poll::Ready(Err(
                "glance answered before it asked for the request body; the body was not sent"
                    .into(),
            )),
            _ => match self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(EXPECT_WAIT)))
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    if self
                        .signal
                        .state
                        .compare_exchange(WAITING, GO, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        // glance spoke meanwhile: go by what it said.
                        return self.poll_open(cx);
                    }
                    self.health.upstream_ignores_expect();
                    Poll::Ready(Ok(Continue::TimedOut))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The response

/// Where the response bytes come from.
enum Source {
    /// glance's response body.
    Relay(Incoming),
    /// An answer the shim made itself.
    Own(Option<Bytes>),
}

/// The response body sent to the client. Owns the request's [`ExchangeGuard`].
pub struct ResponseBody {
    source: Source,
    guard: ExchangeGuard,
    /// Set when glance answered while the request body was still held back for its 100 Continue.
    held_back: Option<Arc<ContinueSignal>>,
    /// False until hyper has had a chance to send the head (the body said Pending once, or gave a
    /// frame).
    head_out: bool,
    /// A failure that came before the head was out: given to hyper once it is.
    failed_early: Option<BodyError>,
    ended: bool,
    /// With the inspector on: the copy of glance's body's start, until the body ends.
    copier: Option<Copier>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("id", &self.guard.exchange().id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// Relays glance's response body.
    pub fn relay(
        inner: Incoming,
        guard: ExchangeGuard,
        held_back: Option<Arc<ContinueSignal>>,
    ) -> Self {
        let copier = guard.registry().copier();
        ResponseBody {
            source: Source::Relay(inner),
            guard,
            held_back,
            head_out: false,
            failed_early: None,
            ended: false,
            copier,
        }
    }

    /// An answer of the shim's own; the exchange's outcome is already settled.
    pub fn own(bytes: Bytes, guard: ExchangeGuard) -> Self {
        // Copied as it goes out, as glance's bodies are.
        let copier = guard.registry().copier();
        ResponseBody {
            source: Source::Own(Some(bytes)),
            guard,
            held_back: None,
            head_out: true,
            failed_early: None,
            ended: false,
            copier,
        }
    }

    fn exchange(&self) -> &Exchange {
        self.guard.exchange()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(e) = this.failed_early.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let polled = match &mut this.source {
            Source::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Relay(inner) => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    let outcome = crate::error::classify_upstream(&e).outcome();
                    this.guard
                        .exchange()
                        .end(outcome, Some(crate::error::chain(&e)));
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(BodyError::from))),
                Poll::Pending => match this.guard.exchange().poll_cut_off(cx) {
                    Poll::Ready(outcome) => Poll::Ready(Some(Err(BodyError::from(format!(
                        "the response was cut off ({})",
                        outcome.as_str()
                    ))))),
                    Poll::Pending => Poll::Pending,
                },
            },
        };
        let exchange = this.guard.exchange();
        let head_was_out = std::mem::replace(&mut this.head_out, true);
        match &polled {
            Poll::Ready(Some(Err(_))) if !head_was_out => {
                // hyper sends the head with the first body bytes, and drops it if the body fails
                // first. Say Pending once, so that the head glance sent goes out before the abort.
                if let Poll::Ready(Some(Err(e))) = polled {
                    this.failed_early = Some(e);
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Pending => exchange.waiting_on(Waiting::Upstream),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    exchange.mark(Mark::FirstResponseByte);
                    exchange.add_bytes_out(data.len() as u64);
                    if let Some(copier) = &mut this.copier {
                        this.guard.registry().copy(copier, data);
                    }
                }
                exchange.progress(Waiting::Client);
            }
            Poll::Ready(Some(Err(_))) => {}
            Poll::Ready(None) => this.ended = true,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            _ if self.failed_early.is_some() => false,
            Source::Own(bytes) => bytes.is_none(),
            Source::Relay(inner) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Own(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Own(None) => SizeHint::with_exact(0),
            Source::Relay(inner) => inner.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let ended = self.ended || self.is_end_stream();
        if let Some(copier) = self.copier.take() {
            let _ = self
                .exchange()
                .copies
                .response_body
                .set(copier.finish(ended));
        }
        // hyper stops polling once `is_end_stream` says so, so the end cannot wait for a `None`.
        // Otherwise the client went away, unless something else already ended the request: the
        // guard settles that when it drops, right after this.
        if ended {
            self.exchange().end(Outcome::Completed, None);
        }
        // A body held back for a 100 Continue glance never asked for is given up: the request body
        // fails, and hyper closes that upstream connection rather than reuse it owing a body.
        if let Some(signal) = &self.held_back {
            signal.abandon();
        }
    }
}
