//! Where the shim accepts connections: a TCP port, or a unix socket file made and removed as uWSGI
//! would with DevStack's settings: mode 0666 (`chmod-socket = 666`, so Apache's user can connect),
//! a stale file that nothing listens on replaced, a live one refused with the unit to stop.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::{Config, Listen};
use crate::error::StartError;

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, SocketFile),
}

/// An accepted connection.
pub enum Conn {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    /// Binds `config.listen`. A unix socket's refusal names the systemd unit whose uWSGI holds it,
    /// when the socket or `--takeover`'s file says which service it is.
    pub fn bind(config: &Config) -> Result<Listener, StartError> {
        match &config.listen {
            Listen::Tcp(addr) => addr
                .bind(1024)
                .map(Listener::Tcp)
                .map_err(|error| StartError::bind(&config.listen, error)),
            Listen::Unix(path) => {
                let service = config
                    .takeover
                    .as_deref()
                    .and_then(crate::uwsgi::service)
                    .or_else(|| crate::uwsgi::service(path));
                let (listener, file) = SocketFile::bind(path, service.map(|s| s.unit)).map_err(
                    |error| match error {
                        Bound::Live => StartError::SocketInUse {
                            path: path.clone(),
                            unit: service.map(|s| s.unit),
                        },
                        Bound::Io(error) => StartError::bind(&config.listen, error),
                    },
                )?;
                Ok(Listener::Unix(listener, file))
            }
        }
    }

    pub async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| Conn::Tcp(s, peer)),
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }

    /// The bound address, for the log: `127.0.0.1:9292` or `unix:/var/run/uwsgi/nova-api.socket`.
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, file) => format!("unix:{}", file.path.display()),
        }
    }

    /// Reachable from other machines: a TCP listener not on loopback.
    pub fn is_exposed(&self) -> bool {
        match self {
            Listener::Tcp(l) => l.local_addr().is_ok_and(|a| !a.ip().is_loopback()),
            Listener::Unix(..) => false,
        }
    }
}

/// Why a socket file could not be bound.
enum Bound {
    /// A server accepts connections on it.
    Live,
    Io(std::io::Error),
}

/// A unix socket file this shim made; removed when dropped, unless another server has replaced it
/// meanwhile.
pub struct SocketFile {
    path: PathBuf,
    /// The file's device and inode, to know it is still ours.
    id: (u64, u64),
}

impl SocketFile {
    fn bind(path: &Path, unit: Option<&str>) -> Result<(UnixListener, SocketFile), Bound> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(Bound::Live),
                    // uWSGI leaves its socket behind when it stops: nothing listens on it.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::info!(
                            path = %path.display(),
                            unit,
                            "replacing a socket file nothing listens on (left by a stopped uWSGI?)"
                        );
                        std::fs::remove_file(path).map_err(Bound::Io)?;
                    }
                    Err(e) => return Err(Bound::Io(e)),
                }
            }
            Ok(_) => {
                return Err(Bound::Io(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; glance-shim does not replace it",
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Bound::Io(e)),
        }
        let listener = UnixListener::bind(path).map_err(Bound::Io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(Bound::Io)?;
        let meta = std::fs::metadata(path).map_err(Bound::Io)?;
        let file = SocketFile {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        };
        Ok((listener, file))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
