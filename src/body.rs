//! The two streaming bodies: the client's request body on its way to the upstream, and the response on
//! its way back. Both pass frames through untouched, count bytes and record progress for the stall
//! watchdog; the response body also owns the request's in-flight [`Guard`] and writes the completion
//! line when it is dropped, so every request is logged exactly once however it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};
use tracing::{info, warn};

use crate::inflight::{Entry, Guard, Phase, Waiting};
use crate::upstream::Lease;

/// The client's request body, forwarded frame by frame.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    entry: Arc<Entry>,
}

impl RequestBody {
    pub fn new(inner: Incoming, entry: Arc<Entry>) -> RequestBody {
        RequestBody { inner, entry }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => self.entry.waiting_on(Waiting::Client),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.entry
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                self.entry.progress(Waiting::Upstream);
            }
            Poll::Ready(Some(Err(_))) => {
                self.entry.client_body_failed.store(true, Ordering::Relaxed);
                self.entry.waiting_on(Waiting::Upstream);
            }
            Poll::Ready(None) => self.entry.waiting_on(Waiting::Upstream),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything the completion line needs, held until the response body is done.
#[derive(Debug)]
pub struct Completion {
    pub guard: Guard,
    pub status: StatusCode,
    /// Time from arrival to the upstream's response headers; `None` when the shim answered itself.
    pub upstream_headers: Option<Duration>,
    /// The `x-openstack-request-id` the upstream answered with.
    pub upstream_id: Option<String>,
    /// Why the shim answered itself (502, 504, 400...).
    pub error: Option<String>,
}

/// Where the response bytes come from.
enum Source {
    /// The upstream's body, and its first frame when it was read before the head was relayed.
    Upstream(Incoming, Option<Frame<Bytes>>),
    /// A response the shim made itself (error bodies).
    Full(Option<Bytes>),
}

/// The response body sent to the client.
pub struct ResponseBody {
    source: Source,
    completion: Option<Completion>,
    /// The upstream connection, returned to the pool when the body ends cleanly.
    lease: Option<Lease>,
    /// With `--upstream-timeout`: fires when the upstream has sent nothing for that long mid-body.
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    ended: bool,
    failure: Option<String>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// The error a response body ends with when the upstream fails mid-body; the server then aborts the
/// connection rather than ending the body cleanly, so a truncated transfer never looks complete.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    /// Streams an upstream response; `first` is its first frame if it was already read.
    pub fn upstream(
        inner: Incoming,
        first: Option<Frame<Bytes>>,
        completion: Completion,
        lease: Option<Lease>,
        idle_timeout: Option<Duration>,
    ) -> Self {
        completion.guard.entry.set_phase(Phase::Streaming);
        ResponseBody {
            source: Source::Upstream(inner, first),
            completion: Some(completion),
            lease,
            idle: idle_timeout.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            ended: false,
            failure: None,
        }
    }

    /// A body the shim wrote itself.
    pub fn full(bytes: Bytes, completion: Option<Completion>) -> Self {
        ResponseBody {
            source: Source::Full(Some(bytes)),
            completion,
            lease: None,
            idle: None,
            ended: false,
            failure: None,
        }
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
        let polled = match &mut this.source {
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream(_, first @ Some(_)) => Poll::Ready(first.take().map(Ok)),
            Source::Upstream(inner, None) => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(r) => Poll::Ready(r.map(|r| r.map_err(BodyError::from))),
                Poll::Pending => {
                    if let Some((limit, sleep)) = &mut this.idle
                        && sleep.as_mut().poll(cx).is_ready()
                    {
                        let msg = format!(
                            "the upstream sent nothing for {:.1} s in the middle of the body \
                             (--upstream-timeout)",
                            limit.as_secs_f64()
                        );
                        Poll::Ready(Some(Err(BodyError::from(msg))))
                    } else {
                        Poll::Pending
                    }
                }
            },
        };
        let entry = this.completion.as_ref().map(|c| &c.guard.entry);
        match &polled {
            Poll::Pending => {
                if let Some(e) = entry {
                    e.waiting_on(Waiting::Upstream);
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(e) = entry {
                    if let Some(data) = frame.data_ref() {
                        e.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    e.progress(Waiting::Client);
                }
                if let Some((limit, sleep)) = &mut this.idle {
                    sleep.as_mut().reset(Instant::now() + *limit);
                }
            }
            Poll::Ready(Some(Err(e))) => this.failure = Some(error_chain(e.as_ref())),
            Poll::Ready(None) => this.ended = true,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(bytes) => bytes.is_none(),
            Source::Upstream(inner, first) => first.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
            Source::Upstream(inner, first) => {
                let held = first
                    .as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64);
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + held);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says so, so "ended" cannot wait for a `None`.
        let ended = self.ended || self.is_end_stream();
        if let Some(lease) = self.lease.take()
            && ended
            && self.failure.is_none()
        {
            lease.release();
        }
        let Some(c) = self.completion.take() else {
            return;
        };
        let e = &c.guard.entry;
        let total = e.started.elapsed();
        let bytes_in = e.bytes_in.load(Ordering::Relaxed);
        let bytes_out = e.bytes_out.load(Ordering::Relaxed);
        let headers_ms = c.upstream_headers.map(millis);
        let upstream_id = c.upstream_id.as_deref();
        let status = c.status.as_u16();
        let failure = self.failure.take();
        let (outcome, error) = match (&failure, ended, c.error.as_deref()) {
            (Some(failure), _, _) => (
                "failed: the response body broke off; the client's connection was aborted so the \
                 transfer cannot look complete",
                Some(failure.as_str()),
            ),
            (None, false, _) => (
                "aborted: the client went away before the response was complete",
                None,
            ),
            (None, true, Some(error)) => ("completed by glance-shim itself", Some(error)),
            (None, true, None) => ("completed", None),
        };
        // One line per request, however it ended; only a clean relay is INFO.
        macro_rules! line {
            ($level:ident) => {
                $level!(
                    id = e.id.as_str(),
                    method = e.method.as_str(),
                    path = e.target.as_str(),
                    status,
                    bytes_in,
                    bytes_out,
                    upstream_headers_ms = headers_ms,
                    total_ms = millis(total),
                    upstream_id,
                    error,
                    "{outcome}"
                )
            };
        }
        if outcome == "completed" {
            line!(info);
        } else {
            line!(warn);
        }
    }
}

/// Milliseconds with a tenth, as a log field.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// An error and its causes on one line: hyper's `Display` shows only the outermost level.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
