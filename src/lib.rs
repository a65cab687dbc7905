//! glance-shim: a transparent, streaming reverse proxy that makes a glance-api under a debugger easy to
//! follow: every request is forwarded untouched and logged on arrival, while it waits on a paused
//! upstream, and on completion, under the request id glance itself uses.
//!
//! # Layout
//! - [`cli`] — flags and environment variables → [`config::Config`]; one-line usage errors.
//! - [`config`] — the validated configuration and the address/duration types it is made of.
//! - [`logging`] — the log's format and destination.
//! - [`server`] — binding, the accept loop, HTTP/1.1 serving, the graceful drain.
//! - [`keepalive`] — the head and idle timeouts of a client connection.
//! - [`proxy`] — one request from arrival to response, in phases; maps failures to statuses.
//! - [`exchange`] — the record of one request (ids, timestamps, bytes, phase, outcome) and its log
//!   lines; the one place the completion line is written.
//! - [`headers`] — hop-by-hop removal, `Via`/`X-Forwarded-*`, `Host` rules, masking for the log.
//! - [`correlation`] — `req-<uuid4>` ids and which id a request carries to glance.
//! - [`inflight`] — requests in flight and kept, the watchdog's stall and timeout rules, the SIGUSR1
//!   table.
//! - [`kept`] — the copies of heads and body prefixes the inspector keeps, and their memory bounds.
//! - [`events`] — what happened to which request, in order, for the inspector's event stream.
//! - [`inspect`] — the inspector: its own small server, the Host guard, the page, the JSON API, HAR
//!   export, and the client of `glance-shim har`.
//! - [`capture`] — every finished request written to disk (`--capture`), and read back.
//! - [`mapped`] — a file appended to through a shared mapping (the capture's files).
//! - [`body`] — the streaming request/response bodies; `Expect: 100-continue`.
//! - [`upstream`] — the connector (with `--wait-upstream` and TLS), outage logging, the pooled client.
//! - [`error`] — what stops the shim starting; its own answers (502, 504, ...) as OpenStack-style JSON.
//! - [`signals`] — SIGTERM/SIGINT/SIGUSR1.
//! - [`tls`] — PEM files to rustls configurations, for both sides.
//! - [`uwsgi`] — the address in DevStack's glance-uwsgi.ini, for `--takeover`.

pub mod body;
pub mod capture;
pub mod cli;
pub mod config;
pub mod correlation;
pub mod error;
pub mod events;
pub mod exchange;
pub mod headers;
pub mod inflight;
pub mod inspect;
pub mod keepalive;
pub mod kept;
pub mod logging;
pub mod mapped;
pub mod proxy;
pub mod server;
pub mod signals;
pub mod tls;
pub mod upstream;
pub mod uwsgi;
