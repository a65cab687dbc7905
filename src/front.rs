//! The uwsgi front (`--uwsgi`, or `--takeover` of a uWSGI `socket =`): each connection's packet is
//! read, checked, and turned into the HTTP/1.0 request head it describes (`packet`), which hyper then
//! reads ahead of the body (`server`'s connection wrapper hands it over first), as if the client had
//! sent it. Everything after that is the HTTP front's.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt as _;
use tracing::{debug, info};

use crate::exchange::Client;
use crate::logging::RateLimited;
use crate::packet::{self, PacketError};
use crate::tls::Stream;

/// What reads packets for every connection of the uwsgi front.
pub struct Packets {
    /// How long a packet's variables may take to arrive (`--header-timeout`).
    timeout: Duration,
    malformed: RateLimited,
    /// The last `SCRIPT_NAME` a request came with, to tell the developer once where Apache mounts
    /// the service.
    script_name: Mutex<Option<String>>,
}

/// Why a connection's packet was not served.
#[derive(Debug, thiserror::Error)]
enum Unread {
    #[error("{0}")]
    Malformed(#[from] PacketError),
    #[error("the connection ended inside the packet's variables")]
    Cut,
    #[error("the packet's variables did not arrive within {0:?}")]
    Slow(Duration),
    #[error("{0}")]
    Io(io::Error),
}

impl Packets {
    pub fn new(timeout: Duration) -> Packets {
        Packets {
            timeout,
            malformed: RateLimited::default(),
            script_name: Mutex::new(None),
        }
    }

    /// Reads the packet that starts `io`. Returns what hyper is to read before the rest of the
    /// connection (the request's HTTP head, then the body bytes read with the packet), and the
    /// client Apache served (`REMOTE_ADDR`), or the connection's own when the packet names none. A
    /// malformed packet is logged, and the connection closed.
    pub async fn read(&self, io: &mut Stream, conn: &Arc<Client>) -> Option<(Bytes, Arc<Client>)> {
        // Apache writes the header and the variables at once: one read usually takes both, and the
        // body's first bytes with them, which hyper then reads after the head.
        let read = async {
            let mut buf = BytesMut::with_capacity(8192);
            let need = loop {
                if let Some(header) = buf.first_chunk::<{ packet::HEADER_LEN }>() {
                    let need = packet::HEADER_LEN + packet::vars_len(*header)?;
                    if buf.len() >= need {
                        break need;
                    }
                    buf.reserve(need - buf.len());
                }
                match io.read_buf(&mut buf).await {
                    // Connected and closed: a check that the socket is live.
                    Ok(0) if buf.is_empty() => return Ok(None),
                    Ok(0) => return Err(Unread::Cut),
                    Ok(_) => {}
                    Err(e) => return Err(Unread::Io(e)),
                }
            };
            let body = buf.split_off(need);
            let request = packet::to_http(&packet::vars(&buf[packet::HEADER_LEN..])?)?;
            Ok(Some((request, body)))
        };
        let (request, body) = match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(Some(read))) => read,
            Ok(Ok(None)) => return None,
            Ok(Err(Unread::Io(e))) => {
                debug!(client = %conn.text, error = %e, "a uwsgi connection failed before its packet");
                return None;
            }
            Ok(Err(why)) => {
                self.malformed
                    .warn(&conn.text, &format!("closed a uwsgi connection: {why}"));
                return None;
            }
            Err(_) => {
                let why = Unread::Slow(self.timeout);
                self.malformed
                    .warn(&conn.text, &format!("closed a uwsgi connection: {why}"));
                return None;
            }
        };
        self.tell_script_name(&request.script_name);
        let client = request.remote.map_or_else(|| conn.clone(), Client::new);
        let mut head = request.head;
        head.extend_from_slice(&body);
        Some((Bytes::from(head), client))
    }

    /// Says where Apache mounts the service, the first time and whenever it changes: the debug
    /// server has to know it, or its routes and links miss the prefix.
    fn tell_script_name(&self, script_name: &str) {
        let mut last = self.script_name.lock().unwrap_or_else(|e| e.into_inner());
        if script_name.is_empty() || last.as_deref() == Some(script_name) {
            return;
        }
        *last = Some(script_name.to_owned());
        drop(last);
        info!(
            script_name,
            "the server in front mounts this service at {script_name}: the request goes on with its \
             full path, so the debug server needs SCRIPT_NAME={script_name} in its environment \
             (gunicorn then strips it from PATH_INFO, as uWSGI does)"
        );
    }
}
