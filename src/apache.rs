//! Apache's clock: how long the Apache in front of a taken-over address waits on a request before
//! it gives up and answers its client itself (502, or 500 through mod_proxy_uwsgi). A request held at a breakpoint past it is lost to
//! the client, while the developer, still at the breakpoint, sees nothing; the shim reads the limit
//! so that its stall notices and its completion line can say so.
//!
//! mod_proxy waits on the backend for the `timeout=` of the `ProxyPass` line, or else for
//! `ProxyTimeout`, or else for `Timeout` (300 s in Debian's and Ubuntu's apache2.conf, 60 s compiled
//! in). This reads the main configuration file and what it includes (`Include`, `IncludeOptional`,
//! with wildcards, relative to `ServerRoot`), finds the `ProxyPass` that forwards to the shim's
//! address, and the limit in force for it. Only that much of Apache's syntax is read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{FrontTimeout, Listen};

/// Where Debian and Ubuntu keep Apache's main configuration file.
pub const DEBIAN_CONF: &str = "/etc/apache2/apache2.conf";

/// Apache's `Timeout` when no file sets it.
const COMPILED_IN: Duration = Duration::from_secs(60);

/// How deep includes are followed.
const MAX_DEPTH: usize = 8;

/// A timeout directive and where it was read.
#[derive(Clone, Debug)]
struct Setting {
    secs: u64,
    what: String,
}

/// What the files say, in the order Apache reads them.
#[derive(Debug, Default)]
struct Read {
    server_root: Option<PathBuf>,
    timeout: Option<Setting>,
    proxy_timeout: Option<Setting>,
    /// The `ProxyPass` forwarding to the address, with its virtual host's own settings.
    found: Option<Found>,
}

#[derive(Debug)]
struct Found {
    site: PathBuf,
    /// What Apache answers when its time runs out, by the module that forwards.
    status: u16,
    /// `timeout=` on the `ProxyPass` line itself.
    worker: Option<Setting>,
    /// `Timeout` and `ProxyTimeout` inside its `<VirtualHost>`, so far.
    timeout: Option<Setting>,
    proxy_timeout: Option<Setting>,
}

/// The limit the Apache configured by `conf` puts on requests it forwards to `listen`; `None` when
/// no `ProxyPass` there forwards to it (or the file cannot be read: not a DevStack host).
pub fn front_timeout(conf: &Path, listen: &Listen) -> Option<FrontTimeout> {
    let mut read = Read {
        server_root: conf.parent().map(Path::to_owned),
        ..Read::default()
    };
    let mut vhost = None;
    read_file(conf, listen, &mut read, &mut vhost, 0);
    let found = read.found?;
    let (limit, directive) = match found
        .worker
        .or(found.proxy_timeout)
        .or(read.proxy_timeout)
        .or(found.timeout)
        .or(read.timeout)
    {
        Some(s) => (Duration::from_secs(s.secs), s.what),
        None => (COMPILED_IN, "Apache's compiled-in Timeout of 60".to_owned()),
    };
    Some(FrontTimeout {
        limit,
        directive,
        site: found.site,
        status: found.status,
    })
}

/// The `<VirtualHost>` being read: its own settings, and whether it holds the `ProxyPass` found.
#[derive(Debug, Default)]
struct VirtualHost {
    timeout: Option<Setting>,
    proxy_timeout: Option<Setting>,
    holds_found: bool,
}

fn read_file(
    path: &Path,
    listen: &Listen,
    read: &mut Read,
    vhost: &mut Option<VirtualHost>,
    depth: usize,
) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let args: Vec<&str> = words.map(|w| w.trim_matches('"')).collect();
        let first = args.first().copied().unwrap_or("");
        let setting = |what: &str| {
            first.parse().ok().map(|secs| Setting {
                secs,
                what: format!("{what} {secs} in {}", path.display()),
            })
        };
        match name.to_ascii_lowercase().as_str() {
            "serverroot" => read.server_root = Some(PathBuf::from(first)),
            "include" | "includeoptional" if depth < MAX_DEPTH => {
                for file in included(first, read.server_root.as_deref()) {
                    read_file(&file, listen, read, vhost, depth + 1);
                }
            }
            "<virtualhost" => *vhost = Some(VirtualHost::default()),
            "</virtualhost>" => *vhost = None,
            "timeout" => match vhost {
                Some(v) => {
                    v.timeout = setting("Timeout");
                    if let Some(found) = read.found.as_mut().filter(|_| v.holds_found) {
                        found.timeout = v.timeout.clone();
                    }
                }
                None => read.timeout = setting("Timeout"),
            },
            "proxytimeout" => match vhost {
                Some(v) => {
                    v.proxy_timeout = setting("ProxyTimeout");
                    if let Some(found) = read.found.as_mut().filter(|_| v.holds_found) {
                        found.proxy_timeout = v.proxy_timeout.clone();
                    }
                }
                None => read.proxy_timeout = setting("ProxyTimeout"),
            },
            "proxypass" if read.found.is_none() => {
                let Some(target) = args.get(1) else { continue };
                if !forwards_to(target, listen) {
                    continue;
                }
                let worker = args[2..].iter().find_map(|a| {
                    let secs = a.strip_prefix("timeout=")?.parse().ok()?;
                    Some(Setting {
                        secs,
                        what: format!("timeout={secs} on the ProxyPass in {}", path.display()),
                    })
                });
                let own = vhost.get_or_insert_with(VirtualHost::default);
                own.holds_found = true;
                read.found = Some(Found {
                    site: path.to_owned(),
                    status: if target.contains("uwsgi://") {
                        500
                    } else {
                        502
                    },
                    worker,
                    timeout: own.timeout.clone(),
                    proxy_timeout: own.proxy_timeout.clone(),
                });
            }
            _ => {}
        }
    }
}

/// The files an `Include` names: a path, or a wildcard in its last part (`sites-enabled/*.conf`),
/// relative to `ServerRoot`; in name order, as Apache reads them.
fn included(pattern: &str, root: Option<&Path>) -> Vec<PathBuf> {
    let pattern = match root {
        Some(root) if !pattern.starts_with('/') => root.join(pattern),
        _ => PathBuf::from(pattern),
    };
    let Some(pattern) = pattern.to_str() else {
        return Vec::new();
    };
    match glob::glob(pattern) {
        Ok(paths) => paths
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A `ProxyPass` target that reaches `listen`: `unix:/var/run/uwsgi/x.socket|uwsgi://...` for a
/// socket, `http://127.0.0.1:60999` (or `localhost`, or the address itself) for a port.
fn forwards_to(target: &str, listen: &Listen) -> bool {
    match listen {
        Listen::Unix(path) => target
            .strip_prefix("unix:")
            .and_then(|t| t.split('|').next())
            .is_some_and(|p| Path::new(p) == path),
        Listen::Tcp(addr) => {
            let Some((_, rest)) = target.split_once("://") else {
                return false;
            };
            let authority = rest.split('/').next().unwrap_or("");
            let Some((host, port)) = authority.rsplit_once(':') else {
                return false;
            };
            let ours = addr.to_string();
            let our_host = ours.rsplit_once(':').map_or("", |(h, _)| h);
            port.parse() == Ok(addr.port)
                && (host == our_host
                    || our_host == "0.0.0.0"
                    || matches!(host, "127.0.0.1" | "localhost" | "[::1]")
                        && matches!(our_host, "127.0.0.1" | "[::1]"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPort;

    fn tree(files: &[(&str, &str)]) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("glance-shim-apache-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    fn keystone() -> Listen {
        Listen::Unix("/var/run/uwsgi/keystone-api.socket".into())
    }

    const KEYSTONE_SITE: &str = "ProxyPass \"/identity\" \"unix:/var/run/uwsgi/keystone-api.socket|uwsgi://uwsgi-uds-keystone-api\" retry=0 acquire=1\n";

    #[test]
    fn debians_layout_gives_its_timeout_of_300() {
        let dir = tree(&[
            (
                "apache2.conf",
                "Timeout 300\nKeepAlive On\nIncludeOptional mods-enabled/*.load\n\
                 IncludeOptional conf-enabled/*.conf\nIncludeOptional sites-enabled/*.conf\n",
            ),
            (
                "sites-enabled/000-default.conf",
                "<VirtualHost *:80>\n</VirtualHost>\n",
            ),
            ("sites-enabled/keystone-api.conf", KEYSTONE_SITE),
            (
                "sites-enabled/glance-wsgi-api.conf",
                "ProxyPass \"/image\" \"http://127.0.0.1:60999\" retry=0\n",
            ),
        ]);
        let t = front_timeout(&dir.join("apache2.conf"), &keystone()).unwrap();
        assert_eq!(t.limit, Duration::from_secs(300));
        assert!(
            t.directive.starts_with("Timeout 300 in "),
            "{}",
            t.directive
        );
        assert!(t.site.ends_with("sites-enabled/keystone-api.conf"));
        assert_eq!(t.status, 500, "mod_proxy_uwsgi's answer");

        let glance = Listen::Tcp(HostPort::parse("60999", false).unwrap());
        let t = front_timeout(&dir.join("apache2.conf"), &glance).unwrap();
        assert!(t.site.ends_with("glance-wsgi-api.conf"));
        assert_eq!(t.status, 502, "mod_proxy_http's answer");
        let other = Listen::Tcp(HostPort::parse("60998", false).unwrap());
        assert_eq!(front_timeout(&dir.join("apache2.conf"), &other), None);
    }

    #[test]
    fn the_nearest_setting_wins() {
        let conf = |site: &str, global: &str| {
            let dir = tree(&[
                ("apache2.conf", &format!("{global}\nInclude sites/*.conf\n")),
                ("sites/k.conf", site),
            ]);
            front_timeout(&dir.join("apache2.conf"), &keystone())
                .map(|t| (t.limit.as_secs(), t.directive))
        };
        let worker = format!(
            "<VirtualHost *:80>\nProxyTimeout 30\n{}</VirtualHost>",
            KEYSTONE_SITE.replace("acquire=1", "acquire=1 timeout=7")
        );
        assert_eq!(conf(&worker, "Timeout 300").unwrap().0, 7);
        let vhost = format!("<VirtualHost *:80>\nProxyTimeout 30\n{KEYSTONE_SITE}</VirtualHost>");
        assert_eq!(conf(&vhost, "Timeout 300\nProxyTimeout 40").unwrap().0, 30);
        let after =
            format!("<VirtualHost *:80>\n{KEYSTONE_SITE}Timeout 9\n</VirtualHost>\nTimeout 8");
        assert_eq!(
            conf(&after, "Timeout 300").unwrap().0,
            9,
            "its vhost's, set after the ProxyPass"
        );
        assert_eq!(
            conf(KEYSTONE_SITE, "Timeout 300\nProxyTimeout 40")
                .unwrap()
                .0,
            40
        );
        let (secs, what) = conf(KEYSTONE_SITE, "ServerName x").unwrap();
        assert_eq!(
            (secs, what.as_str()),
            (60, "Apache's compiled-in Timeout of 60")
        );
        assert_eq!(conf("ProxyPass /x http://127.0.0.1:1\n", "Timeout 5"), None);
        assert_eq!(
            front_timeout(Path::new("/nonexistent/apache2.conf"), &keystone()),
            None
        );
    }
}
