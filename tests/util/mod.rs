//! Test harness: the real `glance-shim` binary as a child process whose JSON log is read line by line,
//! in-process upstreams on 127.0.0.1:0 (a scripted raw-TCP one and an echoing hyper one), and a small
//! raw HTTP/1.1 client that shows exactly what came back on the wire. Everything is torn down on Drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long any single wait in a test may take before the test fails. Waits end as soon as what they
/// wait for happens; this only bounds a broken run.
pub const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The shim process

/// A running `glance-shim` with `--log-format json` on stderr.
pub struct Shim {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The inspector's address, from the listening line (None when it is off).
    pub inspector: Option<SocketAddr>,
    /// The inspector's per-run key, from the same line.
    pub key: Option<String>,
    log: Arc<LogLines>,
}

struct LogLines {
    lines: Mutex<Vec<Value>>,
    changed: watch::Sender<usize>,
    /// The shim's stderr reached its end: every line it wrote is in `lines`.
    ended: AtomicBool,
}

impl Shim {
    /// Starts the shim listening on 127.0.0.1:0 in front of `upstream`, with extra flags, and waits
    /// for its "listening" line.
    pub async fn start(upstream: &str, extra: &[&str]) -> Shim {
        Shim::start_with_env(upstream, extra, &[]).await
    }

    /// The same, with environment additions (an empty value removes a variable).
    pub async fn start_with_env(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Shim {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            upstream,
            "--log-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let mut shim = Shim::spawn(&args, env);
        let line = shim
            .wait_for("the listening line", |l| msg(l) == "listening")
            .await;
        shim.addr = line["listen"].as_str().unwrap().parse().unwrap();
        shim.inspector = line["inspector"].as_str().map(|url| {
            let hostport = url.trim_start_matches("http://").split('/').next().unwrap();
            hostport.parse().unwrap()
        });
        shim.key = line["inspector"]
            .as_str()
            .and_then(|url| url.split_once("?key="))
            .map(|(_, key)| key.to_owned());
        shim
    }

    /// GET `path` from the inspector's API, as JSON. (Boxed: tests call it often, and each inline
    /// call would make the test's future larger than a test thread's stack in debug builds.)
    pub fn api<'a>(&'a self, path: &'a str) -> Pin<Box<dyn Future<Output = Value> + 'a>> {
        Box::pin(async move {
            let (head, body) = get(self.inspector.expect("the inspector is on"), path).await;
            assert_eq!(
                head.status(),
                200,
                "{path}: {}",
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice(&body).unwrap()
        })
    }

    /// Spawns the binary with exactly these arguments and environment additions (an empty value
    /// removes a variable).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Shim {
        let mut cmd = shim_command();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in ["RUST_LOG", "NO_COLOR"] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            if v.is_empty() {
                cmd.env_remove(k); // an empty value removes the variable
            } else {
                cmd.env(k, v);
            }
        }
        // DEBUG_SHIM_RUST_LOG=trace cargo test ... shows what a shim under test did, hyper's and
        // the pool's lines included.
        if let Ok(v) = std::env::var("DEBUG_SHIM_RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        let mut child = cmd.spawn().expect("spawn glance-shim");
        let stderr = child.stderr.take().unwrap();
        let (tx, _) = watch::channel(0);
        let log = Arc::new(LogLines {
            lines: Mutex::new(Vec::new()),
            changed: tx,
            ended: Default::default(),
        });
        let reader = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                reader.lines.lock().unwrap().push(value);
                reader.changed.send_modify(|n| *n += 1);
            }
            reader.ended.store(true, Ordering::Release);
            reader.changed.send_modify(|n| *n += 1);
        });
        Shim {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            inspector: None,
            key: None,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Number of log lines matching `pred`.
    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    /// Waits until a log line matches `pred` and returns it.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_nth(what, 1, pred).await
    }

    /// Waits until `n` log lines match `pred` and returns the n-th.
    pub async fn wait_for_nth(&self, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let mut rx = self.log.changed.subscribe();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            rx.borrow_and_update();
            if let Some(found) = self
                .log
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| pred(l))
                .nth(n - 1)
            {
                return found.clone();
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "no log line for {what} within {PATIENCE:?}; the log:\n{}",
                    self.dump()
                );
            }
        }
    }

    pub fn dump(&self) -> String {
        self.lines()
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Sends a signal (`TERM`, `INT`, `USR1`...) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit (it must, within [`PATIENCE`]), and for its last lines to be
    /// read: a process that has exited may have lines still in the pipe.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let mut changed = self.log.changed.subscribe();
                while !self.log.ended.load(Ordering::Acquire) {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let waited = tokio::time::timeout(left, changed.changed()).await;
                    assert!(
                        waited.is_ok(),
                        "the shim's stderr did not end; log:\n{}",
                        self.dump()
                    );
                }
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shim did not exit; log:\n{}",
                self.dump()
            );
            // Polling a child's exit has no async signal to wait on without a reaper; 5 ms polls.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Peak resident set size of the shim (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM")
    }

    /// Resident set size of the shim now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `message` of a JSON log line.
pub fn msg(line: &Value) -> &str {
    line["message"].as_str().unwrap_or("")
}

/// The `outcome` of a completion line ("" for any other line).
pub fn outcome(line: &Value) -> &str {
    field(line, "outcome")
}

/// True for a completion line (every request gets exactly one).
pub fn completion(line: &Value) -> bool {
    !outcome(line).is_empty()
}

/// Waits until `found` picks something out of the text of the file at `path` (a log the shim writes
/// with `--log-file`) and returns it; `what` names what is waited for.
pub async fn wait_for_file<T>(
    path: &std::path::Path,
    what: &str,
    found: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(got) = found(&text) {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} in {} within {PATIENCE:?}; it holds:\n{text}",
            path.display()
        );
        // A file has no change notification without inotify, which no test dependency offers; poll.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A command for the shim binary with no `GLANCE_SHIM_*` variable of the caller's environment, and
/// its inspector on a free port (tests run in parallel; the default port is tested on its own).
pub fn shim_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glance-shim"));
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("GLANCE_SHIM_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("GLANCE_SHIM_INSPECT", "127.0.0.1:0");
    // Where the shim writes its inspector's key: not the user's own runtime directory.
    cmd.env(
        "XDG_RUNTIME_DIR",
        std::env::temp_dir().join("glance-shim-tests-run"),
    );
    cmd
}

/// A port on 127.0.0.1 that nothing listens on, kept from other programs while it is held: a bound,
/// never-listening socket (connecting to it is refused), which `listen` turns into a listener in
/// place, with no window in which anything else could take the port.
pub struct Reserved {
    socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl Reserved {
    pub fn new() -> Reserved {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Lets a shim bind the same port (it sets SO_REUSEADDR too) while this socket holds it.
        socket.set_reuseaddr(true).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        Reserved { socket, port }
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }

    /// Starts listening on the reserved port.
    pub fn listen(self) -> TcpListener {
        self.socket.listen(1024).unwrap()
    }
}

/// A log line's string field.
pub fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line[name].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// A scripted raw-TCP upstream

/// An upstream whose every byte the test writes by hand.
pub struct RawUpstream {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl RawUpstream {
    pub async fn bind() -> RawUpstream {
        RawUpstream::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// The same on a listener the test already has.
    pub fn on(listener: TcpListener) -> RawUpstream {
        let addr = listener.local_addr().unwrap();
        RawUpstream { listener, addr }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub async fn accept(&self) -> Conn {
        let (stream, _) = tokio::time::timeout(PATIENCE, self.listener.accept())
            .await
            .expect("no connection reached the upstream")
            .unwrap();
        Conn::new(stream)
    }
}

/// One side of a raw connection, with a read buffer.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A parsed message head: the start line and the fields exactly as written (original case).
#[derive(Debug, Clone)]
pub struct Head {
    pub start: String,
    pub fields: Vec<(String, String)>,
    pub raw: Vec<u8>,
}

impl Head {
    /// A head from its bytes, blank line included.
    pub fn parse(raw: Vec<u8>) -> Head {
        let text = String::from_utf8_lossy(&raw[..raw.len() - 4]).into_owned();
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or("").to_owned();
        let fields = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                (k.to_owned(), v.trim().to_owned())
            })
            .collect();
        Head { start, fields, raw }
    }

    /// All values of a field, matched case-insensitively.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    pub fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }

    /// The field name as written on the wire.
    pub fn name_as_sent(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(k, _)| k.as_str())
    }

    pub fn status(&self) -> u16 {
        self.start.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn connect(addr: SocketAddr) -> Conn {
        Conn::new(TcpStream::connect(addr).await.unwrap())
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
            .await
            .expect("peer sent nothing")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one message head, or `None` when the peer closes first.
    pub async fn try_read_head(&mut self) -> Option<Head> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Some(Head::parse(raw));
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads one message head (up to and including the blank line).
    pub async fn read_head(&mut self) -> Head {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Head::parse(raw);
            }
            assert!(
                self.fill().await > 0,
                "connection closed before a complete head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads exactly `n` body bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await > 0,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(
                self.fill().await > 0,
                "connection closed inside a chunked body"
            );
        }
    }

    /// Reads one chunk of a chunked body: `Some(data)`, or `None` at the last chunk (trailers read).
    pub async fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let size_line = self.read_line().await;
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
        if size == 0 {
            while !self.read_line().await.is_empty() {}
            return None;
        }
        let data = self.read_exact(size).await;
        assert_eq!(self.read_exact(2).await, b"\r\n");
        Some(data)
    }

    /// Reads a whole chunked body.
    pub async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        while let Some(chunk) = self.read_chunk().await {
            body.extend_from_slice(&chunk);
        }
        body
    }

    /// Reads a body framed as `head` says (Content-Length, chunked, or until close; none for a 204 or
    /// 304 response).
    pub async fn read_body(&mut self, head: &Head) -> Vec<u8> {
        if head.start.starts_with("HTTP/") && matches!(head.status(), 204 | 304) {
            Vec::new()
        } else if head
            .get("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked().await
        } else if let Some(len) = head.get("content-length") {
            self.read_exact(len.parse().unwrap()).await
        } else {
            self.read_to_close().await
        }
    }

    /// Reads until the peer closes.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// True when the peer closed (or reset) the connection with nothing more to read.
    pub async fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill().await == 0
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends `head` (a full request or response head, `\r\n`-terminated lines, blank line included).
    pub async fn send(&mut self, text: &str) {
        self.write(text.as_bytes()).await;
    }

    /// Writes one chunk of a chunked body (an empty slice ends the body).
    pub async fn write_chunk(&mut self, data: &[u8]) {
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        if data.is_empty() {
            out.truncate(out.len() - 2);
            out.extend_from_slice(b"\r\n");
        }
        self.write(&out).await;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `request` to the shim on a new connection, accepts the connection it makes to `up` and
/// reads the head that arrives there: the client's connection, the upstream's, and that head.
pub async fn forwarded(shim: &Shim, up: &RawUpstream, request: &str) -> (Conn, Conn, Head) {
    let mut client = Conn::connect(shim.addr).await;
    client.send(request).await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    (client, conn, head)
}

/// Sends a whole request on a new connection to `addr` and reads the response (head and body).
pub async fn roundtrip(addr: SocketAddr, request: &str) -> (Head, Vec<u8>) {
    let mut conn = Conn::connect(addr).await;
    conn.send(request).await;
    let head = conn.read_head().await;
    let body = if request.starts_with("HEAD ") {
        Vec::new()
    } else {
        conn.read_body(&head).await
    };
    (head, body)
}

/// `GET path` with a Host header, on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> (Head, Vec<u8>) {
    roundtrip(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// An echoing hyper upstream

/// What the echo upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_sha256: String,
    pub conn: usize,
}

/// A hyper server that answers every request with JSON describing it, or with generated bytes for
/// `/download?bytes=N[&chunked=1]`. Counts connections and records every request.
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Arc<AtomicUsize>,
    /// The SNI name of each TLS connection (None: none sent).
    pub sni: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        Echo::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub fn start_on(listener: TcpListener) -> Echo {
        Echo::serve(listener, None)
    }

    /// The same, speaking TLS with this server configuration.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Echo {
        Echo::serve(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            Some(tokio_rustls::TlsAcceptor::from(config)),
        )
    }

    fn serve(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> Echo {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let (seen2, conns2, sni2) = (seen.clone(), connections.clone(), sni.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn = conns2.fetch_add(1, Ordering::SeqCst) + 1;
                let seen = seen2.clone();
                let tls = tls.clone();
                let sni = sni2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| echo(req, conn, seen.clone()));
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await
                        }
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => {
                                let name = tls.get_ref().1.server_name().map(str::to_owned);
                                sni.lock().unwrap().push(name);
                                http.serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Echo {
            addr,
            seen,
            connections,
            sni,
            task,
        }
    }

    pub fn port(&self) -> String {
        self.addr.port().to_string()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn echo(
    req: hyper::Request<Incoming>,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<hyper::Response<EchoBody>, std::convert::Infallible> {
    let (parts, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            hasher.update(data);
            len += data.len() as u64;
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let record = Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: headers.clone(),
        body_len: len,
        body_sha256: hex(&hasher.finalize()),
        conn,
    };
    seen.lock().unwrap().push(record.clone());

    let query: HashMap<&str, &str> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    if parts.uri.path() == "/download" {
        let n: u64 = query["bytes"].parse().unwrap();
        let chunked = query.contains_key("chunked");
        let mut res = hyper::Response::new(EchoBody::new(Pattern::body(n)));
        if !chunked {
            res.headers_mut().insert("content-length", n.into());
        }
        res.headers_mut()
            .insert("x-body-sha256", Pattern::sha256(n).parse().unwrap());
        return Ok(res);
    }
    let json = serde_json::json!({
        "method": record.method,
        "target": target,
        "headers": headers,
        "body_len": len,
        "body_sha256": record.body_sha256,
    });
    let mut res = hyper::Response::new(EchoBody::new(
        http_body_util::Full::new(Bytes::from(json.to_string())).map_err(|e| match e {}),
    ));
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(id) = parts.headers.get("x-openstack-request-id") {
        res.headers_mut()
            .insert("x-openstack-request-id", id.clone());
    }
    Ok(res)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------------------------
// Deterministic, non-repeating test data

/// A byte stream that is cheap to make and never repeats: 1 MiB blocks of fixed random-looking bytes,
/// each stamped with its block number.
pub struct Pattern;

pub const BLOCK: usize = 1 << 20;

impl Pattern {
    fn base() -> &'static [u8] {
        static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BASE.get_or_init(|| {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            (0..BLOCK)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        })
    }

    /// Block `i` of the stream.
    pub fn block(i: u64) -> Bytes {
        let mut b = Pattern::base().to_vec();
        b[..8].copy_from_slice(&i.to_le_bytes());
        Bytes::from(b)
    }

    /// The first `n` bytes, as a streaming body.
    pub fn body(n: u64) -> EchoBody {
        let stream = PatternBody { next: 0, left: n };
        EchoBody::new(stream)
    }

    /// sha256 of the first `n` bytes.
    pub fn sha256(n: u64) -> String {
        let mut h = Sha256::new();
        let mut left = n;
        let mut i = 0;
        while left > 0 {
            let take = left.min(BLOCK as u64) as usize;
            h.update(&Pattern::block(i)[..take]);
            left -= take as u64;
            i += 1;
        }
        hex(&h.finalize())
    }
}

struct PatternBody {
    next: u64,
    left: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let take = self.left.min(BLOCK as u64) as usize;
        let block = Pattern::block(self.next).slice(..take);
        self.next += 1;
        self.left -= take as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(block))))
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates made at test time

/// A test CA that signs leaf certificates, with its certificate written to a PEM file.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub pem: std::path::PathBuf,
    dir: std::path::PathBuf,
}

/// A fresh directory for one test's files.
pub fn tempdir(tag: &str) -> std::path::PathBuf {
    use std::hash::{BuildHasher, RandomState};
    let dir = std::env::temp_dir().join(format!(
        "glance-shim-{tag}-{}-{:x}",
        std::process::id(),
        RandomState::new().hash_one(std::time::Instant::now())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let dir = tempdir("pki");
        let pem = dir.join(format!("{name}.pem").replace(' ', "-"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        TestCa { issuer, pem, dir }
    }

    /// A certificate for localhost and 127.0.0.1, and its key, as PEM files; `expired` makes one
    /// that ran out in 2001.
    pub fn leaf(&self, expired: bool) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let n = std::fs::read_dir(&self.dir).unwrap().count();
        let (c, k) = (
            self.dir.join(format!("cert{n}.pem")),
            self.dir.join(format!("key{n}.pem")),
        );
        std::fs::write(&c, format!("{}{}", cert.pem(), self.issuer.pem())).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A server configuration presenting a leaf of this CA.
    pub fn server_config(&self, expired: bool) -> Arc<rustls::ServerConfig> {
        let (c, k) = self.leaf(expired);
        glance_shim::tls::server_config(&c, &k).unwrap()
    }

    /// A client configuration trusting only this CA, limited to `versions`.
    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// One request over TLS on a new connection (the request must ask for `Connection: close`); returns
/// the negotiated protocol version and ALPN, the response head and its body.
pub async fn tls_roundtrip(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: &str,
) -> std::io::Result<(
    Option<rustls::ProtocolVersion>,
    Option<Vec<u8>>,
    Head,
    Vec<u8>,
)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let (_, session) = tls.get_ref();
    let version = session.protocol_version();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    tls.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await?;
    let end = find(&raw, b"\r\n\r\n").expect("a response head");
    let body = raw[end + 4..].to_vec();
    raw.truncate(end + 4);
    Ok((version, alpn, Head::parse(raw), body))
}
