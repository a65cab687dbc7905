//! The two waits a client connection is closed for: a request head that does not arrive in time
//! (`--header-timeout`: a client trickling its headers) and a keep-alive connection with nothing to
//! do (`--idle-timeout`).
//!
//! hyper's own header-read timer starts as soon as a connection goes idle, so with it the two could
//! not differ. Here a connection is in one of three phases:
//!
//! - **serving**: a request head has been read and its response is not yet written to the end. Never
//!   timed out: a breakpoint in glance may hold a request for hours.
//! - **idle**: nothing is being served and no byte of the next request has come. Closed after
//!   `--idle-timeout`.
//! - **reading a head**: the first byte of the next request has come. Closed after
//!   `--header-timeout` if the head is still not complete.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The phase clock of one client connection.
pub struct Clock {
    base: Instant,
    /// Requests being served: from a parsed head until its response body is dropped.
    serving: AtomicUsize,
    /// When the current wait began, in milliseconds since `base`, shifted left one bit; the low bit
    /// is set once a byte of the next request head has come.
    wait: AtomicU64,
}

/// Why a connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// A request head did not arrive within `--header-timeout` of its first byte.
    Head,
    /// Nothing came within `--idle-timeout` of the last response.
    Idle,
}

impl fmt::Display for Expired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expired::Head => "its request head did not arrive within --header-timeout",
            Expired::Idle => "it was idle for --idle-timeout",
        })
    }
}

const HEAD_STARTED: u64 = 1;

impl Clock {
    /// A clock for a connection that has just been accepted: idle from now.
    pub fn new() -> Arc<Clock> {
        Arc::new(Clock {
            base: Instant::now(),
            serving: AtomicUsize::new(0),
            wait: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// A request head has been read; it is served until the returned guard is dropped.
    pub fn serve(self: &Arc<Self>) -> Serving {
        self.serving.fetch_add(1, Ordering::AcqRel);
        Serving(self.clone())
    }

    /// Bytes came from the client: if nothing is being served they begin the next head.
    pub fn read(&self) {
        if self.serving.load(Ordering::Acquire) == 0 {
            let wait = self.wait.load(Ordering::Acquire);
            if wait & HEAD_STARTED == 0 {
                self.wait
                    .store((self.now_ms() << 1) | HEAD_STARTED, Ordering::Release);
            }
        }
    }

    /// Completes when the connection has waited too long in its current phase. Never completes while
    /// a request is being served.
    pub async fn expired(&self, header_timeout: Duration, idle_timeout: Duration) -> Expired {
        // Phases change without waking this loop, so it looks again at least every `shortest`. Any
        // new phase's deadline is at least that far from its start, so it is never passed unseen.
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let shortest = ms(header_timeout.min(idle_timeout));
        loop {
            let mut sleep_ms = shortest;
            if self.serving.load(Ordering::Acquire) == 0 {
                let wait = self.wait.load(Ordering::Acquire);
                let (limit, expired) = if wait & HEAD_STARTED != 0 {
                    (ms(header_timeout), Expired::Head)
                } else {
                    (ms(idle_timeout), Expired::Idle)
                };
                let deadline = (wait >> 1).saturating_add(limit);
                let now = self.now_ms();
                if now >= deadline {
                    return expired;
                }
                sleep_ms = sleep_ms.min(deadline - now);
            }
            tokio::time::sleep(Duration::from_millis(sleep_ms.max(1))).await;
        }
    }
}

/// Held while a request is served (by its `ExchangeGuard`, until hyper is done with the response);
/// dropping the last one starts the idle wait.
pub struct Serving(Arc<Clock>);

impl fmt::Debug for Serving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Serving")
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let clock = &self.0;
        if clock.serving.fetch_sub(1, Ordering::AcqRel) == 1 {
            clock.wait.store(clock.now_ms() << 1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: Duration = Duration::from_secs(3);
    const IDLE: Duration = Duration::from_secs(10);

    async fn expires_after(clock: &Clock) -> (Expired, Duration) {
        let start = tokio::time::Instant::now();
        let why = clock.expired(HEAD, IDLE).await;
        (why, start.elapsed())
    }

    fn about(d: Duration, secs: u64) -> bool {
        d >= Duration::from_secs(secs) && d < Duration::from_secs(secs) + Duration::from_millis(50)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_after_the_idle_timeout() {
        let clock = Clock::new();
        let (why, after) = expires_after(&clock).await;
        assert_eq!(why, Expired::Idle);
        assert!(about(after, 10), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_is_timed_from_its_first_byte() {
        let clock = Clock::new();
        let reader = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            reader.read();
            // More bytes of the same head do not restart the clock.
            tokio::time::sleep(Duration::from_secs(2)).await;
            reader.read();
        });
        let (why, after) = expires_after(&clock).await;
        assert_eq!(why, Expired::Head);
        assert!(about(after, 4 + 3), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_expires_while_a_request_is_served() {
        let clock = Clock::new();
        let server = clock.clone();
        tokio::spawn(async move {
            server.read();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let serving = server.serve();
            // A breakpoint holds the request for an hour.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(serving);
        });
        let (why, after) = expires_after(&clock).await;
        assert_eq!(why, Expired::Idle);
        assert!(about(after, 3601 + 10), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_head_timeout_is_kept_after_a_long_request() {
        let clock = Clock::new();
        let serving = clock.serve();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            drop(serving);
        });
        let start = tokio::time::Instant::now();
        let why = clock
            .expired(Duration::from_secs(30), Duration::from_secs(1))
            .await;
        assert_eq!(why, Expired::Idle);
        assert!(about(start.elapsed(), 100 + 1), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_request_after_a_slow_head_start_still_ends_in_a_short_idle_wait() {
        let clock = Clock::new();
        clock.read(); // the head starts; its deadline is 30 s away
        let server = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(server.serve()); // served at once
        });
        let start = tokio::time::Instant::now();
        let why = clock
            .expired(Duration::from_secs(30), Duration::from_secs(1))
            .await;
        assert_eq!(why, Expired::Idle);
        assert!(
            start.elapsed() < Duration::from_millis(1150),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_wait_starts_when_the_last_response_ends() {
        let clock = Clock::new();
        let (a, b) = (clock.serve(), clock.serve());
        let server = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(a);
            server.read(); // bytes while one is still served: not a new head
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(b);
        });
        let (why, after) = expires_after(&clock).await;
        assert_eq!(why, Expired::Idle);
        assert!(about(after, 10 + 10), "{after:?}");
    }
}
