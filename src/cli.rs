//! Command-line flags (each with an environment-variable fallback) and their conversion into a [`Config`].
//!
//! Flags are parsed here and only here; a bad value becomes one line naming the flag, which `main`
//! prints before exiting with status 2. No sockets, no runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{
    AddrError, Config, ConfigError, Front, HostPort, Inspect, Listen, LogFormat, Scheme, TlsFiles,
    Upstream, parse_duration, parse_nonzero_duration,
};
use crate::uwsgi;

const EXAMPLES: &str = "\
Examples:
  # In front of a debug glance-api bound on 60999 (point clients, or Apache's ProxyPass, at 9292):
  glance-shim --listen 9292 --upstream 60999

  # Take uWSGI's place on the port DevStack's Apache already proxies /image to, with the debug
  # glance-api on its default 9292: nothing in Apache, uWSGI or glance-api.conf is edited:
  glance-shim --listen 60999 --upstream 9292
  # The same, with the port read from /etc/glance/glance-uwsgi.ini and the upstream 9292:
  glance-shim --takeover

  # Take the place of keystone's uWSGI on the unix socket Apache's mod_proxy_uwsgi forwards
  # /identity to (read from /etc/keystone/keystone-uwsgi-public.ini), speaking uwsgi there, with
  # the debug keystone (gunicorn) on 127.0.0.1:5000; the same for nova, placement, cinder, neutron:
  glance-shim --takeover keystone
  # The same, spelled out:
  glance-shim --listen /var/run/uwsgi/keystone-api.socket --uwsgi --upstream 5000

Every flag can also be set through the environment variable named in its description.
Log filtering follows RUST_LOG (default: info), e.g. RUST_LOG=glance_shim=debug.";

/// glance-shim: a transparent reverse proxy that makes a glance-api under a debugger easy to follow.
///
/// Every request is forwarded byte for byte to the upstream glance-api and logged when it arrives,
/// while it waits on a paused upstream, and when it completes, with the request id glance uses.
#[derive(Debug, Parser)]
#[command(name = "glance-shim", version, about, long_about = None, after_help = EXAMPLES,
          args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Where to accept connections: PORT (127.0.0.1:PORT), HOST:PORT, [IPv6]:PORT, or the path of
    /// a unix socket (/var/run/uwsgi/NAME.socket).
    #[arg(long, env = "GLANCE_SHIM_LISTEN", value_name = "ADDR", value_parser = Listen::parse,
          required_unless_present = "takeover", conflicts_with = "takeover")]
    pub listen: Option<Listen>,

    /// Speak the uwsgi protocol on --listen, as uWSGI's `socket =` does for Apache's
    /// mod_proxy_uwsgi, and forward each request to the upstream as HTTP.
    #[arg(long, env = "GLANCE_SHIM_UWSGI", conflicts_with = "takeover")]
    pub uwsgi: bool,

    /// Listen where DevStack's uWSGI for a service does, speaking what it spoke: the socket or
    /// http-socket of this INI file, or of the service named (glance, keystone, nova, placement,
    /// cinder, neutron). Default: glance's /etc/glance/glance-uwsgi.ini. --upstream then defaults to
    /// the service's own port (glance 9292, keystone 5000, nova 8774, placement 8778, cinder 8776,
    /// neutron 9696).
    #[arg(long, env = "GLANCE_SHIM_TAKEOVER", value_name = "SERVICE|UWSGI_INI", num_args = 0..=1,
          default_missing_value = uwsgi::DEVSTACK_INI)]
    pub takeover: Option<PathBuf>,

    /// The server to forward to (the debug glance-api): PORT, HOST:PORT, [IPv6]:PORT,
    /// http://HOST:PORT or https://HOST:PORT.
    #[arg(long, env = "GLANCE_SHIM_UPSTREAM", value_name = "ADDR", value_parser = Upstream::parse,
          required_unless_present = "takeover")]
    pub upstream: Option<Upstream>,

    /// Apache's main configuration, read with --takeover (or when given) for how long the Apache in
    /// front waits on a held request: the stall notices say how long remains, and the completion
    /// line says when Apache's timeout ended a request.
    #[arg(long, env = "GLANCE_SHIM_APACHE_CONFIG", value_name = "FILE")]
    pub apache_config: Option<PathBuf>,

    /// Serve TLS with this PEM certificate chain (with --tls-key).
    #[arg(
        long,
        env = "GLANCE_SHIM_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key (PKCS#8, RSA or EC) of --tls-cert.
    #[arg(
        long,
        env = "GLANCE_SHIM_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// With an https upstream: also trust certificates signed by this PEM CA (DevStack's
    /// tls-proxy keeps its CA in /opt/stack/data/ca-bundle.pem).
    #[arg(
        long,
        env = "GLANCE_SHIM_UPSTREAM_CA",
        value_name = "PEM",
        conflicts_with = "upstream_insecure"
    )]
    pub upstream_ca: Option<PathBuf>,

    /// With an https upstream: accept any certificate it presents. Only for throwaway setups.
    #[arg(long, env = "GLANCE_SHIM_UPSTREAM_INSECURE")]
    pub upstream_insecure: bool,

    /// Log a notice when nothing has moved between the shim and the upstream for this long (the
    /// upstream is probably paused at a breakpoint), repeated at growing intervals; 0 turns it off.
    #[arg(long, env = "GLANCE_SHIM_STALL_AFTER", value_name = "DURATION", default_value = "5s",
          value_parser = parse_duration)]
    pub stall_after: Duration,

    /// Answer 504 when the upstream has made no progress for this long. Unset (the default), the
    /// shim waits forever, as a breakpoint needs.
    #[arg(long, env = "GLANCE_SHIM_UPSTREAM_TIMEOUT", value_name = "DURATION",
          value_parser = parse_nonzero_duration)]
    pub upstream_timeout: Option<Duration>,

    /// While nothing listens on the upstream port, hold requests and keep trying to connect for up to
    /// this long (e.g. while the debugger restarts) before answering 502.
    #[arg(long, env = "GLANCE_SHIM_WAIT_UPSTREAM", value_name = "DURATION",
          value_parser = parse_duration)]
    pub wait_upstream: Option<Duration>,

    /// On SIGTERM or SIGINT, let in-flight requests finish for up to this long, then exit.
    #[arg(long, env = "GLANCE_SHIM_DRAIN", value_name = "DURATION", default_value = "10s",
          value_parser = parse_duration)]
    pub drain: Duration,

    /// Connections open at once; beyond this, new ones get a 503 and are closed (open ones keep
    /// working).
    #[arg(long, env = "GLANCE_SHIM_MAX_CONNECTIONS", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A request head must be complete this long after its first byte, or the connection is closed
    /// (a client trickling its headers).
    #[arg(long, env = "GLANCE_SHIM_HEADER_TIMEOUT", value_name = "DURATION", default_value = "30s",
          value_parser = parse_nonzero_duration)]
    pub header_timeout: Duration,

    /// A keep-alive connection with no request in progress is closed after this long. A request held
    /// at a breakpoint is in progress: it is never timed out.
    #[arg(long, env = "GLANCE_SHIM_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s",
          value_parser = parse_nonzero_duration)]
    pub idle_timeout: Duration,

    /// Bytes a request head may have (request line and fields); more is answered 431.
    #[arg(long, env = "GLANCE_SHIM_MAX_HEADER_BYTES", value_name = "BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_header_bytes: u32,

    /// Fields a request head may have; more is answered 431.
    #[arg(long, env = "GLANCE_SHIM_MAX_HEADERS", value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_headers: u32,

    /// Bytes a request target (path and query) may have; more is answered 414.
    #[arg(long, env = "GLANCE_SHIM_MAX_URI_BYTES", value_name = "BYTES", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_uri_bytes: u32,

    /// Log format.
    #[arg(
        long,
        env = "GLANCE_SHIM_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Append the log to this file instead of writing it to stderr.
    #[arg(long, env = "GLANCE_SHIM_LOG_FILE", value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Add each request's headers to its arrival line (token, password and cookie values masked).
    #[arg(long, env = "GLANCE_SHIM_LOG_HEADERS")]
    pub log_headers: bool,

    /// Serve the inspector (a live page of the requests, and its JSON API) here: PORT, HOST:PORT,
    /// [IPv6]:PORT, or off [default: 127.0.0.1:9293]. If the default port is taken, the shim warns
    /// and proxies without it.
    #[arg(long, env = "GLANCE_SHIM_INSPECT", value_name = "ADDR", value_parser = parse_inspect)]
    pub inspect: Option<InspectAt>,

    /// Finished requests the inspector keeps (the oldest go first).
    #[arg(long, env = "GLANCE_SHIM_INSPECT_KEEP", value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub inspect_keep: u32,

    /// Bytes of each request's and response's body the inspector keeps (a prefix: image data is
    /// never kept beyond it).
    #[arg(long, env = "GLANCE_SHIM_INSPECT_BODY", value_name = "SIZE", default_value = "64KiB",
          value_parser = parse_size)]
    pub inspect_body: usize,

    /// Bytes of heads and bodies the inspector keeps in all; past it, the oldest requests go first.
    /// With --inspect off and --capture, the bound on what is copied of requests in flight for the
    /// capture.
    #[arg(long, env = "GLANCE_SHIM_INSPECT_MEMORY", value_name = "SIZE", default_value = "32MiB",
          value_parser = parse_size)]
    pub inspect_memory: usize,

    /// Write every request, as it ends, to a file in DIR (made 0700; files 0600, tokens masked), so
    /// its history survives a restart: the inspector shows it again, and `glance-shim har DIR` turns
    /// it into a HAR file.
    #[arg(long, env = "GLANCE_SHIM_CAPTURE", value_name = "DIR")]
    pub capture: Option<PathBuf>,

    /// Bytes of each request's and response's body captured (a prefix). Raise it to capture whole
    /// uploads of that size, so they can be replayed; the inspector's memory (--inspect-memory) must
    /// hold them too.
    #[arg(long, env = "GLANCE_SHIM_CAPTURE_BODY", value_name = "SIZE", default_value = "64KiB",
          value_parser = parse_size)]
    pub capture_body: usize,

    /// Bytes the capture directory may hold; past it, the oldest files are removed.
    #[arg(long, env = "GLANCE_SHIM_CAPTURE_MAX", value_name = "SIZE", default_value = "256MiB",
          value_parser = parse_size)]
    pub capture_max: usize,
}

/// What else `glance-shim` does besides proxying: ask a running shim.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the requests a running glance-shim's inspector holds, or those captured in DIR, as a
    /// HAR 1.2 file (secrets masked).
    Har(HarArgs),
    /// Send a request a running glance-shim keeps to glance again, with a new request id, and wait
    /// for its answer.
    Replay(ReplayArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The request to send again: its request id (req-...) or its serial number in the inspector.
    #[arg(value_name = "ID")]
    pub of: String,

    /// A fresh token for X-Auth-Token (openstack token issue -f value -c id), instead of the one it
    /// came with.
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,

    /// The running shim's inspector: PORT, HOST:PORT or [IPv6]:PORT [default: 127.0.0.1:9293].
    #[arg(long, env = "GLANCE_SHIM_INSPECT", value_name = "ADDR", value_parser = parse_inspect)]
    pub inspector: Option<InspectAt>,

    /// The inspector's key (the key= in its address on the start-up line) [default: read from the
    /// file the shim wrote it to].
    #[arg(
        long,
        env = "GLANCE_SHIM_INSPECT_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,

    /// Return once the replay is sent, without waiting for glance's answer.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct HarArgs {
    /// A capture directory (--capture DIR) to read instead of asking a running shim (--inspector
    /// is then not asked).
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The running shim's inspector: PORT, HOST:PORT or [IPv6]:PORT [default: 127.0.0.1:9293].
    #[arg(long, env = "GLANCE_SHIM_INSPECT", value_name = "ADDR", value_parser = parse_inspect)]
    pub inspector: Option<InspectAt>,

    /// Only the requests this filter shows, as the page's filter box reads it: words found in the
    /// method, path, status, ids or outcome, or FIELD:TEXT (status:404, method:put, path:/file).
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,

    /// Write the archive to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// What `--inspect` was given.
#[derive(Clone, Debug)]
pub enum InspectAt {
    Off,
    At(HostPort),
}

fn parse_inspect(s: &str) -> Result<InspectAt, AddrError> {
    if s.trim().eq_ignore_ascii_case("off") {
        Ok(InspectAt::Off)
    } else {
        HostPort::parse(s, true).map(InspectAt::At)
    }
}

/// A size such as 65536, 64KiB, 64kB or 32 MiB (bytesize's syntax).
fn parse_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s.trim().parse().map_err(|e: String| {
        format!("'{s}' is not a size ({e}); expected e.g. 65536, 64KiB or 32MiB")
    })?;
    usize::try_from(size.as_u64()).map_err(|_| format!("'{s}' is too large"))
}

impl Args {
    /// Validates what single flags cannot and builds the configuration.
    pub fn into_config(self) -> Result<Config, UsageError> {
        let takeover = self.takeover.as_deref().map(uwsgi::ini_for);
        let (listen, front) = match (self.listen, &takeover) {
            (Some(listen), _) if self.uwsgi => (listen, Front::Uwsgi),
            (Some(listen), _) => (listen, Front::Http),
            (None, Some(ini)) => {
                let a = uwsgi::address(ini).map_err(UsageError::Takeover)?;
                (a.listen, a.front)
            }
            (None, None) => return Err(ConfigError::NoListen.into()),
        };
        // The service's own default port (glance-api's bind_port 9292): where its debug server
        // listens unless told otherwise.
        let port = takeover
            .as_deref()
            .and_then(uwsgi::service)
            .map_or(9292, |s| s.port);
        let upstream = self.upstream.unwrap_or_else(|| Upstream {
            scheme: Scheme::Http,
            addr: HostPort {
                host: crate::config::Host::Ip(std::net::Ipv4Addr::LOCALHOST.into()),
                port,
            },
        });
        if upstream.scheme == Scheme::Http && (self.upstream_ca.is_some() || self.upstream_insecure)
        {
            return Err(ConfigError::UpstreamTlsOnHttp(upstream).into());
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            _ => None,
        };
        // Apache's clock, where Apache forwards to the address taken over (or when asked for).
        let front_timeout = match (&self.apache_config, &takeover) {
            (Some(conf), _) => crate::apache::front_timeout(conf, &listen),
            (None, Some(_)) => {
                crate::apache::front_timeout(Path::new(crate::apache::DEBIAN_CONF), &listen)
            }
            (None, None) => None,
        };
        let config = Config {
            listen,
            front,
            front_timeout,
            upstream,
            stall_after: Some(self.stall_after).filter(|d| !d.is_zero()),
            upstream_timeout: self.upstream_timeout,
            wait_upstream: self.wait_upstream.filter(|d| !d.is_zero()),
            drain: self.drain,
            limits: crate::config::Limits {
                max_connections: self.max_connections as usize,
                header_timeout: self.header_timeout,
                idle_timeout: self.idle_timeout,
                max_header_bytes: self.max_header_bytes as usize,
                max_headers: self.max_headers as usize,
                max_uri_bytes: self.max_uri_bytes as usize,
            },
            log_headers: self.log_headers,
            log_format: self.log_format,
            log_file: self.log_file,
            tls,
            upstream_ca: self.upstream_ca,
            upstream_insecure: self.upstream_insecure,
            takeover,
            inspect: match self.inspect {
                Some(InspectAt::Off) => None,
                Some(InspectAt::At(addr)) => Some(Inspect::new(addr, true)),
                None => Some(Inspect::default_on()),
            }
            .map(|i| Inspect {
                keep: self.inspect_keep as usize,
                body: self.inspect_body,
                memory: self.inspect_memory,
                ..i
            }),
            capture: self.capture.map(|dir| crate::config::Capture {
                dir,
                body: self.capture_body,
                max: self.capture_max,
                memory: self.inspect_memory,
            }),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Why the flags, each valid on its own, cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--takeover`'s uWSGI file cannot be read, or names no address to listen on.
    #[error("--takeover {0}")]
    Takeover(uwsgi::IniError),
}

/// What parsing the command line came to.
#[derive(Debug)]
pub enum Parsed {
    /// Run with this configuration.
    Run(Box<Config>),
    /// `glance-shim har`: fetch an archive from a running shim.
    Har(HarArgs),
    /// `glance-shim replay`: ask a running shim to send a request again.
    Replay(ReplayArgs),
    /// `--help` or `--version`: print this on stdout and exit 0.
    Print(String),
    /// A usage error: print this one line on stderr and exit 2.
    Usage(String),
}

/// Parses arguments (and the environment) into what `main` should do.
pub fn parse<I, T>(args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    parse_with(Args::command(), args)
}

/// The same, with every environment fallback off: what the arguments alone say, whatever the shell
/// exports (for tests, and for checking the command lines the docs show).
pub fn parse_args_only<I, T>(args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    parse_with(Args::command().mut_args(|arg| arg.env(None)), args)
}

fn parse_with<I, T>(command: clap::Command, args: I) -> Parsed
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let parsed = command
        .try_get_matches_from(args)
        .and_then(|matches| Args::from_arg_matches(&matches));
    match parsed {
        Ok(Args {
            command: Some(Command::Har(har)),
            ..
        }) => Parsed::Har(har),
        Ok(Args {
            command: Some(Command::Replay(replay)),
            ..
        }) => Parsed::Replay(replay),
        Ok(args) => match args.into_config() {
            Ok(config) => Parsed::Run(Box::new(config)),
            Err(e) => Parsed::Usage(format!("glance-shim: {}", without_controls(&e.to_string()))),
        },
        Err(err) => match err.kind() {
            clap::error::ErrorKind::DisplayHelp
            | clap::error::ErrorKind::DisplayVersion
            | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                Parsed::Print(err.render().to_string())
            }
            _ => Parsed::Usage(one_line(&err.render().to_string())),
        },
    }
}

/// `text` with control characters (a newline in a file name, say) written as escapes, so a usage
/// error stays one line.
fn without_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Folds clap's multi-line error (message, usage, tips) into the one line a user needs.
fn one_line(rendered: &str) -> String {
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with("Usage:")
            || line.starts_with("For more information")
            || line.starts_with("tip:")
        {
            continue;
        }
        parts.push(line.strip_prefix("error: ").unwrap_or(line));
    }
    format!("glance-shim: {}", parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The arguments alone: whatever GLANCE_SHIM_* variables the shell running the tests exports.
    fn run(args: &[&str]) -> Parsed {
        parse_args_only(std::iter::once("glance-shim").chain(args.iter().copied()))
    }

    fn config(args: &[&str]) -> Config {
        match run(args) {
            Parsed::Run(c) => *c,
            other => panic!("expected a config from {args:?}, got {other:?}"),
        }
    }

    fn usage(args: &[&str]) -> String {
        match run(args) {
            Parsed::Usage(line) => line,
            other => panic!("expected a usage error from {args:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_inspector_is_on_by_default_at_9293_and_can_be_moved_or_turned_off() {
        let base = ["--listen", "9292", "--upstream", "60999"];
        let c = config(&base);
        let i = c.inspect.unwrap();
        assert_eq!(i.addr.to_string(), "127.0.0.1:9293");
        assert!(!i.explicit, "the default only warns when taken");
        assert_eq!((i.keep, i.body, i.memory), (1000, 65536, 32 << 20));
        let c = config(&[&base[..], &["--inspect", "OFF"]].concat());
        assert!(c.inspect.is_none());
        let c = config(
            &[
                &base[..],
                &[
                    "--inspect",
                    "0",
                    "--inspect-keep",
                    "5",
                    "--inspect-body",
                    "1KiB",
                ],
                &["--inspect-memory", "2 MiB"],
            ]
            .concat(),
        );
        let i = c.inspect.unwrap();
        assert_eq!(i.addr.to_string(), "127.0.0.1:0");
        assert!(i.explicit);
        assert_eq!((i.keep, i.body, i.memory), (5, 1024, 2 << 20));
        let line = usage(&[&base[..], &["--inspect-body", "lots"]].concat());
        assert!(
            line.contains("--inspect-body") && line.contains("64KiB"),
            "{line}"
        );
        let line = usage(&[&base[..], &["--inspect", "nowhere"]].concat());
        assert!(line.contains("--inspect"), "{line}");
    }

    #[test]
    fn the_card_topology() {
        let c = config(&["--listen", "9292", "--upstream", "60999"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:9292");
        assert_eq!(c.upstream.to_string(), "http://127.0.0.1:60999");
        assert_eq!(c.stall_after, Some(Duration::from_secs(5)));
        assert_eq!(c.upstream_timeout, None);
        assert_eq!(c.wait_upstream, None);
        assert_eq!(c.drain, Duration::from_secs(10));
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(!c.log_headers);
    }

    #[test]
    fn the_takeover_topology() {
        let c = config(&["--listen", "60999", "--upstream", "http://127.0.0.1:9292"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:60999");
        assert_eq!(c.upstream.addr.port, 9292);
    }

    #[test]
    fn every_flag() {
        let c = config(&[
            "--listen",
            "[::1]:9292",
            "--upstream",
            "localhost:60999",
            "--stall-after",
            "250ms",
            "--upstream-timeout",
            "2m",
            "--wait-upstream",
            "30s",
            "--drain",
            "1s",
            "--log-format",
            "json",
            "--log-file",
            "/tmp/shim.log",
            "--log-headers",
        ]);
        assert_eq!(c.stall_after, Some(Duration::from_millis(250)));
        assert_eq!(c.upstream_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.wait_upstream, Some(Duration::from_secs(30)));
        assert_eq!(c.drain, Duration::from_secs(1));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.log_file.as_deref(),
            Some(std::path::Path::new("/tmp/shim.log"))
        );
        assert!(c.log_headers);
    }

    #[test]
    fn zero_turns_notices_and_waiting_off() {
        let c = config(&[
            "--listen",
            "1",
            "--upstream",
            "2",
            "--stall-after",
            "0",
            "--wait-upstream",
            "0",
        ]);
        assert_eq!(c.stall_after, None);
        assert_eq!(c.wait_upstream, None);
        let line = usage(&[
            "--listen",
            "1",
            "--upstream",
            "2",
            "--upstream-timeout",
            "0",
        ]);
        assert!(
            line.contains("--upstream-timeout") && line.contains("more than 0"),
            "{line}"
        );
    }

    #[test]
    fn a_bad_value_is_one_line_naming_the_flag() {
        let line = usage(&["--listen", "abc", "--upstream", "60999"]);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("glance-shim: "), "{line}");
        assert!(line.contains("--listen"), "{line}");
        assert!(line.contains("abc"), "{line}");

        let line = usage(&["--listen", "9292", "--upstream", "http://h:1/image"]);
        assert!(
            line.contains("--upstream") && line.contains("has a path"),
            "{line}"
        );

        let line = usage(&["--listen", "9292", "--upstream", "1", "--drain", "soon"]);
        assert!(line.contains("--drain") && line.contains("soon"), "{line}");

        let line = usage(&["--listen", "9292", "--upstream", "1", "--log-format", "xml"]);
        assert!(
            line.contains("--log-format") && line.contains("xml"),
            "{line}"
        );
    }

    #[test]
    fn missing_and_unknown_flags_are_one_line_too() {
        let line = usage(&["--listen", "9292"]);
        assert!(
            !line.contains('\n') && line.contains("--upstream"),
            "{line}"
        );
        let line = usage(&["--listen", "9292", "--upstream", "1", "--bogus"]);
        assert!(!line.contains('\n') && line.contains("--bogus"), "{line}");
    }

    #[test]
    fn a_usage_error_stays_one_line_whatever_the_values_hold() {
        let line = usage(&["--takeover", "/tmp/a\nb.ini"]);
        assert!(!line.contains('\n') && line.contains("a\\nb.ini"), "{line}");
        let line = usage(&["--listen", "a\nb", "--upstream", "1"]);
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn a_loop_is_refused() {
        let line = usage(&["--listen", "9292", "--upstream", "http://127.0.0.1:9292"]);
        assert!(line.contains("loop") && line.contains("--listen"), "{line}");
    }

    #[test]
    fn takeover_reads_the_port_from_devstacks_uwsgi_ini() {
        let ini = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/glance-uwsgi.ini");
        let c = config(&["--takeover", ini]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:60999");
        assert_eq!(
            c.upstream.to_string(),
            "http://127.0.0.1:9292",
            "glance's default port, nothing typed"
        );
        assert_eq!(c.takeover.as_deref(), Some(std::path::Path::new(ini)));
        let c = config(&["--takeover", ini, "--upstream", "19292"]);
        assert_eq!(c.upstream.addr.port, 19292);

        let line = usage(&["--takeover", "/nonexistent/glance-uwsgi.ini"]);
        assert!(
            line.contains("--takeover /nonexistent/glance-uwsgi.ini") && line.contains("--listen"),
            "{line}"
        );
        let line = usage(&["--takeover", ini, "--listen", "1"]);
        assert!(
            line.contains("--takeover") && line.contains("--listen"),
            "{line}"
        );
        let no_socket = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/uwsgi-no-socket.ini"
        );
        let line = usage(&["--takeover", no_socket]);
        assert!(line.contains("no socket, http-socket"), "{line}");
        // The DevStack path is the default; on this machine it usually does not exist.
        if !std::path::Path::new(uwsgi::DEVSTACK_INI).exists() {
            let line = usage(&["--takeover"]);
            assert!(line.contains(uwsgi::DEVSTACK_INI), "{line}");
        }
    }

    #[test]
    fn the_uwsgi_front_by_flag_or_by_takeover() {
        let c = config(&["--listen", "/tmp/k.sock", "--uwsgi", "--upstream", "5000"]);
        assert_eq!(c.listen, Listen::Unix("/tmp/k.sock".into()));
        assert_eq!(c.front, Front::Uwsgi);
        let c = config(&["--listen", "3031", "--uwsgi", "--upstream", "5000"]);
        assert_eq!(
            (c.listen.to_string(), c.front),
            ("127.0.0.1:3031".into(), Front::Uwsgi)
        );
        let c = config(&["--listen", "/tmp/g.sock", "--upstream", "9292"]);
        assert_eq!(c.front, Front::Http, "a unix socket may speak HTTP too");

        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
        let c = config(&["--takeover", &format!("{data}/keystone-uwsgi-public.ini")]);
        assert_eq!(
            c.listen,
            Listen::Unix("/var/run/uwsgi/keystone-api.socket".into())
        );
        assert_eq!(c.front, Front::Uwsgi);
        assert_eq!(
            c.upstream.to_string(),
            "http://127.0.0.1:5000",
            "keystone's own port"
        );
        let c = config(&[
            "--takeover",
            &format!("{data}/glance-uwsgi-unix-socket.ini"),
        ]);
        assert_eq!(c.front, Front::Uwsgi);
        assert_eq!(c.upstream.addr.port, 9292);

        // A service's name reads its file under /etc, which this machine does not have.
        let line = usage(&["--takeover", "placement"]);
        assert!(
            line.contains("/etc/placement/placement-uwsgi.ini"),
            "{line}"
        );
        let line = usage(&["--takeover", "nova", "--uwsgi"]);
        assert!(
            line.contains("--uwsgi") && line.contains("--takeover"),
            "{line}"
        );
    }

    #[test]
    fn limits() {
        let c = config(&["--listen", "1", "--upstream", "2"]);
        assert_eq!(c.limits, crate::config::Limits::default());
        let c = config(&[
            "--listen",
            "1",
            "--upstream",
            "2",
            "--max-connections",
            "7",
            "--header-timeout",
            "5s",
            "--idle-timeout",
            "2m",
            "--max-header-bytes",
            "4096",
            "--max-headers",
            "20",
            "--max-uri-bytes",
            "100",
        ]);
        assert_eq!(c.limits.max_connections, 7);
        assert_eq!(c.limits.header_timeout, Duration::from_secs(5));
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(
            (
                c.limits.max_header_bytes,
                c.limits.max_headers,
                c.limits.max_uri_bytes
            ),
            (4096, 20, 100)
        );
        for (flag, bad) in [
            ("--max-connections", "0"),
            ("--header-timeout", "0"),
            ("--idle-timeout", "0s"),
            ("--max-header-bytes", "10"),
            ("--max-headers", "many"),
            ("--max-uri-bytes", "1"),
        ] {
            let line = usage(&["--listen", "1", "--upstream", "2", flag, bad]);
            assert!(line.contains(flag), "{line}");
        }
    }

    #[test]
    fn tls_flags() {
        let c = config(&[
            "--listen",
            "9292",
            "--upstream",
            "https://glance.example:19292",
            "--upstream-ca",
            "/ca.pem",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
        ]);
        assert_eq!(c.upstream.scheme, Scheme::Https);
        assert_eq!(
            c.upstream_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
        let line = usage(&[
            "--listen",
            "9292",
            "--upstream",
            "1",
            "--tls-cert",
            "/c.pem",
        ]);
        assert!(line.contains("--tls-key"), "{line}");
        let line = usage(&["--listen", "9292", "--upstream", "1", "--upstream-insecure"]);
        assert!(line.contains("https upstream"), "{line}");
        let line = usage(&[
            "--listen",
            "9292",
            "--upstream",
            "https://h:1",
            "--upstream-insecure",
            "--upstream-ca",
            "/x",
        ]);
        assert!(
            line.contains("--upstream-insecure") && line.contains("--upstream-ca"),
            "{line}"
        );
    }

    #[test]
    fn help_shows_both_topologies() {
        let Parsed::Print(help) = parse(["glance-shim", "--help"]) else {
            panic!("--help must print")
        };
        assert!(help.contains("--listen 9292 --upstream 60999"), "{help}");
        assert!(help.contains("--listen 60999 --upstream 9292"), "{help}");
        assert!(help.contains("GLANCE_SHIM_LISTEN"), "{help}");
    }
}
