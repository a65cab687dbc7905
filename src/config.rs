//! The validated configuration the server runs with, and the address and duration types it is made of.
//!
//! Everything here is plain data plus the parsing of one value at a time; `cli` turns flags into a
//! [`Config`], `server` and `proxy` read it. Nothing here opens a socket.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Why an address given to `--listen` or `--upstream` cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("empty address; expected PORT, HOST:PORT or [IPv6]:PORT")]
    Empty,
    #[error("'{0}' is not [IPv6]:PORT")]
    Brackets(String),
    #[error("'{0}' is not an IPv6 address")]
    NotIpv6(String),
    #[error("'{0}' in brackets is not an IPv6 address")]
    BracketedNotIpv6(String),
    #[error("'{0}' is not a port, HOST:PORT or [IPv6]:PORT (a bare host needs a port)")]
    NoPort(String),
    #[error("'{input}': an IPv6 address must be written in brackets, as [{host}]:{port}")]
    Ipv6NeedsBrackets {
        input: String,
        host: String,
        port: String,
    },
    #[error("missing host before ':'")]
    MissingHost,
    #[error("'{0}' is neither an IP address nor a host name")]
    BadHost(String),
    #[error("'{0}' is not a port number")]
    BadPort(String),
    #[error("port {0} is out of range (1-65535)")]
    PortRange(String),
    #[error("port 0 is not a port anything listens on")]
    PortZero,
    #[error("unsupported scheme '{0}'; use http://HOST:PORT or https://HOST:PORT")]
    Scheme(String),
    #[error(
        "'{0}' has a path; glance-shim forwards paths untouched, so give only SCHEME://HOST:PORT"
    )]
    HasPath(String),
    #[error("credentials in the upstream URL are not supported")]
    Credentials,
    #[error("'{input}' has no port; write it as {scheme}://HOST:PORT")]
    UrlWithoutPort { input: String, scheme: &'static str },
}

/// Why a duration flag's value cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("'{input}' is not a duration ({reason}); expected e.g. 500ms, 5s, 2m, 1h or 1m30s")]
    Invalid { input: String, reason: String },
    #[error("must be more than 0 (leave it unset to wait forever)")]
    Zero,
}

/// Where clients connect: a TCP address, or the path of a unix socket (as uWSGI's `socket =
/// /var/run/uwsgi/NAME.socket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(HostPort),
    Unix(PathBuf),
}

impl Listen {
    /// A path when it starts with `/`, else what [`HostPort::parse`] takes (port 0 allowed).
    pub fn parse(s: &str) -> Result<Listen, AddrError> {
        match s.trim() {
            path if path.starts_with('/') => Ok(Listen::Unix(PathBuf::from(path))),
            addr => HostPort::parse(addr, true).map(Listen::Tcp),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => addr.fmt(f),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The protocol clients speak to the shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    /// HTTP/1.1 (and 1.0), as glance's uWSGI `http-socket` serves it.
    Http,
    /// The uwsgi protocol, as uWSGI's `socket =` serves Apache's mod_proxy_uwsgi: each request is
    /// forwarded to the upstream as HTTP.
    Uwsgi,
}

/// A host as the user wrote it: an IP literal, or a name resolved when it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// `HOST:PORT` after parsing; `HOST` defaults to 127.0.0.1 when only a port was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

impl HostPort {
    /// Parses `PORT`, `HOST:PORT` or `[IPv6]:PORT`. `allow_port_zero` is for `--listen`, where 0 means
    /// "any free port" (the bound address is logged at start-up).
    pub fn parse(s: &str, allow_port_zero: bool) -> Result<HostPort, AddrError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        let (host, port) = if s.bytes().all(|b| b.is_ascii_digit()) {
            (Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)), s)
        } else if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| AddrError::Brackets(s.to_owned()))?;
            let ip: IpAddr = ip.parse().map_err(|_| AddrError::NotIpv6(ip.to_owned()))?;
            if !ip.is_ipv6() {
                return Err(AddrError::BracketedNotIpv6(ip.to_string()));
            }
            (Host::Ip(ip), port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| AddrError::NoPort(s.to_owned()))?;
            if host.contains(':') {
                return Err(AddrError::Ipv6NeedsBrackets {
                    input: s.to_owned(),
                    host: host.to_owned(),
                    port: port.to_owned(),
                });
            }
            (parse_host(host)?, port)
        };
        let port = parse_port(port)?;
        if port == 0 && !allow_port_zero {
            return Err(AddrError::PortZero);
        }
        Ok(HostPort { host, port })
    }

    /// Resolves to socket addresses (an IP literal resolves to itself without any lookup).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => Ok((name.as_str(), self.port).to_socket_addrs()?.collect()),
        }
    }

    /// Listens on the first address this resolves to that can be bound, with this backlog.
    pub fn bind(&self, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
        let mut last = std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "the address resolved to nothing",
        );
        for addr in self.resolve()? {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
                Ok(listener) => return Ok(listener),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

fn parse_host(host: &str) -> Result<Host, AddrError> {
    if host.is_empty() {
        return Err(AddrError::MissingHost);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    let valid = host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if valid {
        Ok(Host::Name(host.to_ascii_lowercase()))
    } else {
        Err(AddrError::BadHost(host.to_owned()))
    }
}

fn parse_port(port: &str) -> Result<u16, AddrError> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AddrError::BadPort(port.to_owned()));
    }
    port.parse::<u16>()
        .map_err(|_| AddrError::PortRange(port.to_owned()))
}

/// The scheme spoken to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Where every request is forwarded to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub addr: HostPort,
}

impl Upstream {
    /// Parses what `--listen` takes, or `http://host:port` / `https://host:port` (an optional trailing
    /// `/` only: the shim never rewrites paths, so a base path would be silently ignored and is
    /// refused instead).
    pub fn parse(s: &str) -> Result<Upstream, AddrError> {
        let s = s.trim();
        let (scheme, rest) = match s.split_once("://") {
            None => (Scheme::Http, s),
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" => (Scheme::Http, rest),
                "https" => (Scheme::Https, rest),
                other => return Err(AddrError::Scheme(other.to_owned())),
            },
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') || authority.contains('?') || authority.contains('#') {
            return Err(AddrError::HasPath(s.to_owned()));
        }
        if authority.contains('@') {
            return Err(AddrError::Credentials);
        }
        if s.contains("://") && !authority.contains(':') {
            return Err(AddrError::UrlWithoutPort {
                input: s.to_owned(),
                scheme: scheme.as_str(),
            });
        }
        let addr = HostPort::parse(authority, false)?;
        Ok(Upstream { scheme, addr })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.addr)
    }
}

/// Parses a duration the way humantime does (`500ms`, `5s`, `2m`, `1h`, `1m30s`, `2min`...), or a bare
/// number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let invalid = |reason: String| DurationError::Invalid {
        input: s.to_owned(),
        reason,
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| invalid("too large".into()));
    }
    humantime::parse_duration(s).map_err(|e| invalid(e.to_string()))
}

/// A duration that must be more than zero (a timeout that is either set or absent).
pub fn parse_nonzero_duration(s: &str) -> Result<Duration, DurationError> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(DurationError::Zero),
        d => Ok(d),
    }
}

/// A combination of flags that cannot work, found after each flag parsed on its own.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--listen {listen} and --upstream {upstream} are the same address: every request would come \
         back to glance-shim (a loop); the debug glance-api needs its own port"
    )]
    Loop {
        listen: HostPort,
        upstream: HostPort,
    },
    #[error("--listen or --takeover is needed")]
    NoListen,
    #[error("--upstream-ca and --upstream-insecure apply to an https upstream; --upstream is {0}")]
    UpstreamTlsOnHttp(Upstream),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Readable lines (colour only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// What a client may send and hold; each has a flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request head must be complete this long after its first byte: a client trickling its
    /// headers is closed after it.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// Bytes in a request head (request line and fields); more is answered 431.
    pub max_header_bytes: usize,
    /// Fields in a request head; more is answered 431.
    pub max_headers: usize,
    /// Bytes in a request target; more is answered 414.
    pub max_uri_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
        }
    }
}

/// The listening side's certificate chain and key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the running shim needs to know, already validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where clients connect.
    pub listen: Listen,
    /// What they speak there.
    pub front: Front,
    /// Where every request goes.
    pub upstream: Upstream,
    /// Waiting this long on the upstream with nothing moving earns a notice; `None` disables notices.
    pub stall_after: Option<Duration>,
    /// Give up on an upstream that has made no progress for this long (504); `None` waits forever,
    /// which is what a debugger paused at a breakpoint needs.
    pub upstream_timeout: Option<Duration>,
    /// While the upstream refuses connections, keep trying this long before answering 502.
    pub wait_upstream: Option<Duration>,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the shim exits anyway.
    pub drain: Duration,
    /// Limits on what clients may send and hold.
    pub limits: Limits,
    /// Add the (masked) request headers to the arrival line.
    pub log_headers: bool,
    pub log_format: LogFormat,
    pub log_file: Option<PathBuf>,
    /// Serve TLS with these files.
    pub tls: Option<TlsFiles>,
    /// A private CA the upstream's certificate may chain to (besides the system's roots).
    pub upstream_ca: Option<PathBuf>,
    /// Accept any upstream certificate.
    pub upstream_insecure: bool,
    /// The uWSGI INI `--listen` was read from (`--takeover`), for the log.
    pub takeover: Option<PathBuf>,
    /// How long Apache in front waits on a held request (`--takeover`, `--apache-config`).
    pub front_timeout: Option<FrontTimeout>,
    /// The inspector page and its API (`--inspect`); `None` with `--inspect off`.
    pub inspect: Option<Inspect>,
    /// Every request written to disk as it ends (`--capture DIR`).
    pub capture: Option<Capture>,
}

/// Where requests are captured, and how much of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub dir: PathBuf,
    /// Bytes of each body captured, each way (`--capture-body`).
    pub body: usize,
    /// Bytes the directory may hold; past it, the oldest files go (`--capture-max`).
    pub max: usize,
    /// Bytes of heads and bodies copied for the capture while their requests are in flight, when
    /// there is no inspector to keep them (`--inspect-memory`).
    pub memory: usize,
}

/// How long the server in front of the shim (Apache) waits on a request before it gives up and
/// answers its client itself, read from its configuration with `--takeover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontTimeout {
    pub limit: Duration,
    /// What sets it, as the developer would find it: `Timeout 300 in /etc/apache2/apache2.conf`.
    pub directive: String,
    /// The file with the `ProxyPass` that forwards to the shim.
    pub site: PathBuf,
    /// What Apache then answers its client: 502 through mod_proxy_http, 500 through
    /// mod_proxy_uwsgi (both measured with Apache 2.4.71).
    pub status: u16,
}

/// Where the inspector is served, and what it keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspect {
    pub addr: HostPort,
    /// Given by the user: failing to bind it stops the shim. The default only earns a warning.
    pub explicit: bool,
    /// Finished requests kept (`--inspect-keep`).
    pub keep: usize,
    /// Bytes of each body kept, each way (`--inspect-body`).
    pub body: usize,
    /// Bytes of heads and bodies kept in all (`--inspect-memory`).
    pub memory: usize,
}

impl Inspect {
    /// The default port: next to glance-api's 9292, and used by no DevStack service (see README).
    pub const DEFAULT_PORT: u16 = 9293;

    pub fn new(addr: HostPort, explicit: bool) -> Inspect {
        Inspect {
            addr,
            explicit,
            keep: 1000,
            body: 64 * 1024,
            memory: 32 * 1024 * 1024,
        }
    }

    /// 127.0.0.1:9293, not given by the user.
    pub fn default_on() -> Inspect {
        let addr = HostPort {
            host: Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: Inspect::DEFAULT_PORT,
        };
        Inspect::new(addr, false)
    }
}

impl Config {
    /// A configuration with the defaults the CLI uses, for tests and embedding.
    pub fn new(listen: HostPort, upstream: Upstream) -> Config {
        Config {
            listen: Listen::Tcp(listen),
            front: Front::Http,
            upstream,
            stall_after: Some(Duration::from_secs(5)),
            upstream_timeout: None,
            wait_upstream: None,
            drain: Duration::from_secs(10),
            limits: Limits::default(),
            log_headers: false,
            log_format: LogFormat::Text,
            log_file: None,
            tls: None,
            upstream_ca: None,
            upstream_insecure: false,
            takeover: None,
            front_timeout: None,
            inspect: Some(Inspect::default_on()),
            capture: None,
        }
    }

    /// Refuses combinations no single flag can see: listening where we forward is a loop.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Listen::Tcp(listen) = &self.listen else {
            return Ok(());
        };
        if listen.port == 0 || listen.port != self.upstream.addr.port {
            return Ok(());
        }
        let addr = listen;
        let listen = addr.resolve().unwrap_or_default();
        let upstream = self.upstream.addr.resolve().unwrap_or_default();
        let loops = listen.iter().any(|l| {
            upstream.iter().any(|u| {
                l.ip() == u.ip()
                    || (l.ip().is_unspecified()
                        && (u.ip().is_loopback() || u.ip().is_unspecified()))
            })
        });
        if loops {
            return Err(ConfigError::Loop {
                listen: addr.clone(),
                upstream: self.upstream.addr.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(s: &str) -> Result<String, String> {
        HostPort::parse(s, true)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(hp("9292").unwrap(), "127.0.0.1:9292");
        assert_eq!(hp(" 60999 ").unwrap(), "127.0.0.1:60999");
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(hp("0.0.0.0:9292").unwrap(), "0.0.0.0:9292");
        assert_eq!(hp("[::1]:9292").unwrap(), "[::1]:9292");
        assert_eq!(hp("LocalHost:80").unwrap(), "localhost:80");
        assert_eq!(
            hp("controller.example.org:9292").unwrap(),
            "controller.example.org:9292"
        );
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        assert!(hp("").unwrap_err().contains("empty"));
        assert!(hp("70000").unwrap_err().contains("out of range"));
        assert!(hp("localhost").unwrap_err().contains("needs a port"));
        assert!(hp("::1:9292").unwrap_err().contains("brackets"));
        assert!(hp("[127.0.0.1]:80").unwrap_err().contains("not an IPv6"));
        assert!(hp("[::1]9292").unwrap_err().contains("[IPv6]:PORT"));
        assert!(hp("host:").unwrap_err().contains("not a port number"));
        assert!(hp(":80").unwrap_err().contains("missing host"));
        assert!(hp("bad_host:80").unwrap_err().contains("neither an IP"));
        assert!(hp("-x:80").unwrap_err().contains("neither an IP"));
        assert_eq!(HostPort::parse("0", false), Err(AddrError::PortZero));
        assert_eq!(hp("0").unwrap(), "127.0.0.1:0");
    }

    #[test]
    fn upstream_takes_a_url_too() {
        let u = Upstream::parse("http://127.0.0.1:60999").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:60999");
        assert_eq!(
            Upstream::parse("HTTP://[::1]:9292/").unwrap().to_string(),
            "http://[::1]:9292"
        );
        assert_eq!(
            Upstream::parse("9292").unwrap().to_string(),
            "http://127.0.0.1:9292"
        );
        let up = |s: &str| Upstream::parse(s).unwrap_err().to_string();
        assert!(up("http://h:1/image").contains("has a path"));
        assert!(up("http://h").contains("no port"));
        assert!(up("ftp://h:1").contains("unsupported scheme"));
        assert!(up("http://u:p@h:1").contains("credentials"));
        assert!(up("0").contains("port 0"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration(" 1h 5m ").unwrap(),
            Duration::from_secs(3900)
        );
        for bad in ["", "5x", "s", "1m30", "-5s", "soon", "99999999999999999999"] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("'{}' is not a duration", bad.trim())),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(parse_nonzero_duration("0s"), Err(DurationError::Zero));
        assert_eq!(
            parse_nonzero_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
    }

    #[test]
    fn listening_on_the_upstream_is_a_loop() {
        let cfg = |l: &str, u: &str| {
            Config::new(
                HostPort::parse(l, true).unwrap(),
                Upstream::parse(u).unwrap(),
            )
            .validate()
            .map_err(|e| e.to_string())
        };
        assert!(cfg("9292", "9292").unwrap_err().contains("loop"));
        assert!(
            cfg("9292", "http://localhost:9292")
                .unwrap_err()
                .contains("loop")
        );
        assert!(cfg("0.0.0.0:9292", "9292").unwrap_err().contains("loop"));
        assert!(cfg("9292", "60999").is_ok());
        assert!(cfg("127.0.0.2:9292", "127.0.0.1:9292").is_ok());
        assert!(cfg("0", "9292").is_ok());
    }
}
