//! Reading the address DevStack's Apache targets from its uWSGI configuration
//! (`/etc/glance/glance-uwsgi.ini`), so `--takeover` needs no port typed.
//!
//! DevStack writes `http-socket = 127.0.0.1:PORT` (older DevStack: `http = 127.0.0.1:PORT`) into the
//! `[uwsgi]` section, and proxies `/image` to that address. Only that much of the INI syntax is read.

use std::path::{Path, PathBuf};

use crate::config::{AddrError, HostPort};

/// Why no address could be read from a uWSGI INI file.
#[derive(Debug, thiserror::Error)]
pub enum IniError {
    #[error("{}: {error}{}", path.display(), if error.kind() == std::io::ErrorKind::NotFound {
        " (not a DevStack host? give the file glance's uWSGI runs with, or use --listen)"
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
        "no http-socket (or http) line in its [uwsgi] section, so there is no TCP port to take over; \
         use --listen"
    )]
    NoHttpSocket,
    #[error("{key} = {value} is a unix socket; glance-shim listens on TCP only")]
    UnixSocket { key: String, value: String },
    #[error("{key} = {value}: {error}")]
    BadAddress {
        key: String,
        value: String,
        error: Box<AddrError>,
    },
}

/// Where DevStack keeps glance-api's uWSGI configuration.
pub const DEVSTACK_INI: &str = "/etc/glance/glance-uwsgi.ini";

/// The TCP address uWSGI serves HTTP on, according to the `[uwsgi]` section of `path`.
pub fn http_address(path: &Path) -> Result<HostPort, IniError> {
    let text = std::fs::read_to_string(path).map_err(|error| IniError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(&text).map_err(|problem| IniError::In {
        path: path.to_owned(),
        problem,
    })
}

/// The address from the text of a uWSGI INI file.
pub fn parse(text: &str) -> Result<HostPort, IniProblem> {
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
        // http-socket is what DevStack writes now; `http` (the router mode) is what it wrote before.
        if (key == "http-socket" || key == "http")
            && found.as_ref().is_none_or(|(k, _)| k != "http-socket")
        {
            found = Some((key, value.trim().trim_matches('"').to_owned()));
        }
    }
    let Some((key, value)) = found else {
        return Err(IniProblem::NoHttpSocket);
    };
    let value = value.split(',').next().unwrap_or("").trim().to_owned();
    if value.starts_with('/') || value.starts_with('@') {
        return Err(IniProblem::UnixSocket { key, value });
    }
    // `:PORT` means every interface to uWSGI.
    let address = match value.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => value.to_owned(),
    };
    HostPort::parse(&address, false).map_err(|error| IniProblem::BadAddress {
        key,
        value,
        error: Box::new(error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Result<String, String> {
        parse(text)
            .map(|a| a.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn devstack_sample_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let current = http_address(&root.join("glance-uwsgi.ini")).unwrap();
        assert_eq!(current.to_string(), "127.0.0.1:60999");
        let older = http_address(&root.join("glance-uwsgi-http-router.ini")).unwrap();
        assert_eq!(older.to_string(), "127.0.0.1:60998");
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
        assert!(e.contains("no http-socket"), "{e}");
        let e = addr("[other]\nhttp-socket = 127.0.0.1:1\n").unwrap_err();
        assert!(e.contains("no http-socket"), "{e}");
        let e = addr("[uwsgi]\nhttp-socket = /var/run/uwsgi/glance.socket\n").unwrap_err();
        assert!(e.contains("unix socket"), "{e}");
        let e = addr("[uwsgi]\nhttp-socket = 127.0.0.1:notaport\n").unwrap_err();
        assert!(e.contains("http-socket = 127.0.0.1:notaport"), "{e}");
        let e = http_address(Path::new("/nonexistent/glance-uwsgi.ini"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/nonexistent/glance-uwsgi.ini: ") && e.contains("--listen"),
            "{e}"
        );
    }
}
