//! DevStack's uWSGI services: where each one's configuration lives, which systemd unit runs it, and
//! the address its Apache site targets, read from that configuration (`--takeover`), so no address
//! is typed.
//!
//! DevStack writes glance's address as `http-socket = 127.0.0.1:PORT` (older DevStack: `http =
//! 127.0.0.1:PORT`), where uWSGI speaks HTTP, and every other service's as `socket =
//! /var/run/uwsgi/NAME.socket`, where uWSGI speaks the uwsgi protocol to Apache's mod_proxy_uwsgi.
//! Only that much of the INI syntax is read.

use std::path::{Path, PathBuf};

use crate::config::{AddrError, Front, HostPort, Listen};

/// Why no address could be read from a uWSGI INI file.
#[derive(Debug, thiserror::Error)]
pub enum IniError {
    #[error("{}: {error}{}", path.display(), if error.kind() == std::io::ErrorKind::NotFound {
        " (not a DevStack host? give the file the service's uWSGI runs with, or use --listen)"
    } else { "" })]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    In { path: PathBuf, problem: IniProblem },
}

/// What is wrong inside the file.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IniProblem {
    #[error(
        "no socket, http-socket (or http) line in its [uwsgi] section, so there is no address to \
         take over; use --listen"
    )]
    NoSocket,
    #[error(
        "{key} = {value} is an abstract unix socket; glance-shim listens on paths and TCP only"
    )]
    Abstract { key: String, value: String },
    #[error("{key} = {value}: {error}")]
    BadAddress {
        key: String,
        value: String,
        error: Box<AddrError>,
    },
}

/// A DevStack API service that runs under uWSGI.
#[derive(Debug, PartialEq, Eq)]
pub struct Service {
    /// What `--takeover` takes: `keystone`.
    pub name: &'static str,
    /// Its uWSGI configuration, the same path since DevStack Zed.
    pub ini: &'static str,
    /// The systemd unit that runs its uWSGI, to stop before taking its place.
    pub unit: &'static str,
    /// The port the service's own HTTP server listens on by default: where its debug server is
    /// looked for unless `--upstream` says otherwise.
    pub port: u16,
}

/// The services, by the names DevStack's `lib/` files give them.
pub const SERVICES: &[Service] = &[
    Service {
        name: "glance",
        ini: "/etc/glance/glance-uwsgi.ini",
        unit: "devstack@g-api",
        port: 9292,
    },
    Service {
        name: "keystone",
        ini: "/etc/keystone/keystone-uwsgi-public.ini",
        unit: "devstack@keystone",
        port: 5000,
    },
    Service {
        name: "nova",
        ini: "/etc/nova/nova-api-uwsgi.ini",
        unit: "devstack@n-api",
        port: 8774,
    },
    Service {
        name: "placement",
        ini: "/etc/placement/placement-uwsgi.ini",
        unit: "devstack@placement-api",
        port: 8778,
    },
    Service {
        name: "cinder",
        ini: "/etc/cinder/cinder-api-uwsgi.ini",
        unit: "devstack@c-api",
        port: 8776,
    },
    Service {
        name: "neutron",
        ini: "/etc/neutron/neutron-api-uwsgi.ini",
        unit: "devstack@neutron-api (devstack@q-svc on older releases)",
        port: 9696,
    },
];

/// Where DevStack keeps glance-api's uWSGI configuration: `--takeover` with no value.
pub const DEVSTACK_INI: &str = "/etc/glance/glance-uwsgi.ini";

/// The service `arg` names (`keystone`), or whose configuration or socket it is: a path holding the
/// service's name (`/etc/nova/nova-api-uwsgi.ini`, `/var/run/uwsgi/keystone-wsgi-public.socket`).
pub fn service(arg: &Path) -> Option<&'static Service> {
    let text = arg.to_string_lossy();
    if let Some(s) = SERVICES.iter().find(|s| text == s.name) {
        return Some(s);
    }
    let file = arg.file_name()?.to_string_lossy();
    SERVICES.iter().find(|s| file.contains(s.name))
}

/// The file `--takeover ARG` reads: ARG itself, or the configuration of the service it names.
pub fn ini_for(arg: &Path) -> PathBuf {
    match SERVICES.iter().find(|s| arg.as_os_str() == s.name) {
        Some(service) => PathBuf::from(service.ini),
        None => arg.to_owned(),
    }
}

/// Where a uWSGI configuration has uWSGI listen, and the protocol it speaks there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub listen: Listen,
    pub front: Front,
}

/// The address in the `[uwsgi]` section of `path`.
pub fn address(path: &Path) -> Result<Address, IniError> {
    let text = std::fs::read_to_string(path).map_err(|error| IniError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(&text).map_err(|problem| IniError::In {
        path: path.to_owned(),
        problem,
    })
}

/// The address from the text of a uWSGI INI file. `http-socket` wins over `socket`, and both over
/// the router's `http`.
pub fn parse(text: &str) -> Result<Address, IniProblem> {
    const RANK: [&str; 4] = ["http-socket", "socket", "uwsgi-socket", "http"];
    let rank = |key: &str| RANK.iter().position(|k| *k == key);
    let mut section = String::from("uwsgi"); // uWSGI reads keys before any header as [uwsgi]
    let mut found: Option<(String, String)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_ascii_lowercase();
            continue;
        }
        if section != "uwsgi" {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().replace('_', "-").to_ascii_lowercase();
        let Some(new) = rank(&key) else {
            continue;
        };
        if found.as_ref().is_none_or(|(k, _)| rank(k) > Some(new)) {
            found = Some((key, value.trim().trim_matches('"').to_owned()));
        }
    }
    let Some((key, value)) = found else {
        return Err(IniProblem::NoSocket);
    };
    let front = match key.as_str() {
        "socket" | "uwsgi-socket" => Front::Uwsgi,
        _ => Front::Http,
    };
    let value = value.split(',').next().unwrap_or("").trim().to_owned();
    if value.starts_with('@') {
        return Err(IniProblem::Abstract { key, value });
    }
    if value.starts_with('/') {
        let listen = Listen::Unix(PathBuf::from(&value));
        return Ok(Address { listen, front });
    }
    // `:PORT` means every interface to uWSGI.
    let address = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_owned(),
    };
    match HostPort::parse(&address, false) {
        Ok(addr) => Ok(Address {
            listen: Listen::Tcp(addr),
            front,
        }),
        Err(error) => Err(IniProblem::BadAddress {
            key,
            value,
            error: Box::new(error),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Result<String, String> {
        parse(text)
            .map(|a| a.listen.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn devstack_sample_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let current = address(&root.join("glance-uwsgi.ini")).unwrap();
        assert_eq!(current.listen.to_string(), "127.0.0.1:60999");
        assert_eq!(current.front, Front::Http);
        let older = address(&root.join("glance-uwsgi-http-router.ini")).unwrap();
        assert_eq!(older.listen.to_string(), "127.0.0.1:60998");
        let keystone = address(&root.join("keystone-uwsgi-public.ini")).unwrap();
        assert_eq!(
            keystone.listen.to_string(),
            "unix:/var/run/uwsgi/keystone-api.socket"
        );
        assert_eq!(keystone.front, Front::Uwsgi);
    }

    #[test]
    fn forms_of_the_line() {
        assert_eq!(
            addr("[uwsgi]\nhttp-socket = 127.0.0.1:60999\n").unwrap(),
            "127.0.0.1:60999"
        );
        assert_eq!(
            addr("[uwsgi]\nhttp_socket=127.0.0.1:1234 ; comment\n")
                .map_err(|e| e.contains("1234 ; comment")),
            Err(true)
        );
        assert_eq!(
            addr("http-socket = 127.0.0.1:5\n").unwrap(),
            "127.0.0.1:5",
            "keys before a header"
        );
        assert_eq!(
            addr("[uwsgi]\nhttp-socket = :60999\n").unwrap(),
            "0.0.0.0:60999"
        );
        assert_eq!(
            addr("[uwsgi]\nhttp-socket = [::1]:60999\n").unwrap(),
            "[::1]:60999"
        );
        assert_eq!(
            addr("[UWSGI]\nHTTP-Socket = \"127.0.0.1:7\"\n").unwrap(),
            "127.0.0.1:7"
        );
        assert_eq!(
            addr("[uwsgi]\nhttp = 127.0.0.1:8\nhttp-socket = 127.0.0.1:9\n").unwrap(),
            "127.0.0.1:9",
            "http-socket wins over the router's http"
        );
        assert_eq!(
            addr("[uwsgi]\nhttp-socket = 127.0.0.1:9\nhttp = 127.0.0.1:8\n").unwrap(),
            "127.0.0.1:9"
        );
    }

    #[test]
    fn clear_errors() {
        let e = addr("[uwsgi]\nmodule = glance.wsgi.api:application\n").unwrap_err();
        assert!(e.contains("no socket, http-socket"), "{e}");
        let e = addr("[other]\nhttp-socket = 127.0.0.1:1\n").unwrap_err();
        assert!(e.contains("no socket, http-socket"), "{e}");
        let e = addr("[uwsgi]\nsocket = @glance\n").unwrap_err();
        assert!(e.contains("abstract unix socket"), "{e}");
        let e = addr("[uwsgi]\nhttp-socket = 127.0.0.1:notaport\n").unwrap_err();
        assert!(e.contains("http-socket = 127.0.0.1:notaport"), "{e}");
        let e = address(Path::new("/nonexistent/glance-uwsgi.ini"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/glance-uwsgi.ini: ") && e.contains("--listen"),
            "{e}"
        );
    }

    #[test]
    fn the_socket_line_is_a_uwsgi_front() {
        let a = parse("[uwsgi]\nsocket = /var/run/uwsgi/nova-api.socket\nchmod-socket = 666\n")
            .unwrap();
        assert_eq!(
            a.listen,
            Listen::Unix("/var/run/uwsgi/nova-api.socket".into())
        );
        assert_eq!(a.front, Front::Uwsgi);
        let a = parse("[uwsgi]\nsocket = 127.0.0.1:3031\n").unwrap();
        assert_eq!(
            (a.listen.to_string(), a.front),
            ("127.0.0.1:3031".into(), Front::Uwsgi)
        );
        let a = parse("[uwsgi]\nhttp-socket = /run/g.sock\n").unwrap();
        assert_eq!(
            (a.listen.to_string(), a.front),
            ("unix:/run/g.sock".into(), Front::Http)
        );
        let a = parse("[uwsgi]\nsocket = /run/a.sock\nhttp-socket = :9\n").unwrap();
        assert_eq!(
            (a.listen.to_string(), a.front),
            ("0.0.0.0:9".into(), Front::Http)
        );
    }

    #[test]
    fn services_by_name_file_or_socket() {
        assert_eq!(
            ini_for(Path::new("keystone")),
            Path::new("/etc/keystone/keystone-uwsgi-public.ini")
        );
        assert_eq!(ini_for(Path::new("/tmp/x.ini")), Path::new("/tmp/x.ini"));
        let unit = |p: &str| service(Path::new(p)).map(|s| s.unit);
        assert_eq!(unit("nova"), Some("devstack@n-api"));
        assert_eq!(
            unit("/etc/placement/placement-uwsgi.ini"),
            Some("devstack@placement-api")
        );
        assert_eq!(
            unit("/var/run/uwsgi/keystone-wsgi-public.socket"),
            Some("devstack@keystone")
        );
        assert_eq!(
            unit("/var/run/uwsgi/cinder-api.socket"),
            Some("devstack@c-api")
        );
        assert_eq!(unit("/tmp/other.sock"), None);
        for s in SERVICES {
            assert_eq!(ini_for(Path::new(s.name)), Path::new(s.ini));
            assert_eq!(service(Path::new(s.ini)), Some(s), "{}", s.ini);
        }
    }
}
