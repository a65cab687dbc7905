//! glance-shim: a transparent, streaming reverse proxy that makes a glance-api under a debugger easy to
//! follow: every request is forwarded untouched and logged on arrival, while it waits on a paused
//! upstream, and on completion, under the request id glance itself uses.
//!
//! # Layout
//! Each layer uses only the layers below it (`tests/layers.rs` fails on any import circle).
//! 1. The leaves: [`config`] (addresses, durations, the validated configuration), [`correlation`]
//!    (request ids), [`headers`] (hop-by-hop fields, forwarding fields, `Host`), [`mask`] (every rule
//!    about secrets), [`tls`] (PEM files to rustls), [`uwsgi`] (DevStack's uWSGI services and files),
//!    [`packet`] (the uwsgi protocol's request packet), [`apache`] (Apache's timeouts),
//!    [`keepalive`] (a client connection's clocks), [`logging`] (the log's format and writers),
//!    [`cli`] (flags to a configuration).
//! 2. The record: [`copies`] (bounded copies of heads and body prefixes), [`exchange`] (one
//!    request: ids, marks, bytes, phase, outcome, and its log lines).
//! 3. The readers of records: [`events`] (numbered changes), [`capture`] (a writer thread appending
//!    records to disk, and reading them back).
//! 4. The registry: [`inflight`] (requests in flight and kept, the watchdog, and the guard whose drop
//!    writes the one completion line and hands the record to the readers).
//! 5. The path: [`upstream`] (the connector and hyper-util's pool), [`error`] (the shim's own
//!    answers, and what stops it starting), [`body`] (streaming, `Expect: 100-continue`), [`proxy`]
//!    (one request in phases).
//! 6. The edges: [`listener`] (TCP and unix sockets), [`front`] (the uwsgi front), [`server`]
//!    (accept, TLS, serve, drain), [`inspect`] (the page, its JSON API, HAR
//!    and replay; nothing below knows it), [`signals`], and `main` (flags to a running shim).

pub mod apache;
pub mod body;
pub mod capture;
pub mod cli;
pub mod config;
pub mod copies;
pub mod correlation;
pub mod error;
pub mod events;
pub mod exchange;
pub mod front;
pub mod headers;
pub mod inflight;
pub mod inspect;
pub mod keepalive;
pub mod listener;
pub mod logging;
pub mod mask;
pub mod packet;
pub mod proxy;
pub mod server;
pub mod signals;
pub mod tls;
pub mod upstream;
pub mod uwsgi;
