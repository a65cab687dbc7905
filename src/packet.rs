//! The uwsgi protocol's request packet, as Apache's mod_proxy_uwsgi (and nginx's `uwsgi_pass`) send
//! it to what uWSGI's `socket =` would serve: a 4-byte header (modifier1, the size of the variables
//! as a little-endian u16, modifier2), the CGI-style variables as u16-length key/value pairs, then
//! `CONTENT_LENGTH` bytes of body. One request per connection; the answer is a raw HTTP response,
//! read to the connection's end.
//!
//! The variables are turned back into the HTTP/1.0 request head they were made from, and hyper
//! serves that head and the body behind it as it serves a client of the HTTP front: the same limits,
//! ids, log lines and answers. HTTP/1.0, because hyper sends an HTTP/1.0 answer of unknown length
//! as it comes and ends it by closing, which is how mod_proxy_uwsgi reads it; to an HTTP/1.1 request
//! hyper would answer chunked, and Apache would pass the chunks' framing on as body.

use std::net::{IpAddr, SocketAddr};

/// The size of a packet's header.
pub const HEADER_LEN: usize = 4;

/// Why a packet cannot be served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error(
        "modifier1 is {0}, not 0 (a WSGI request): only the requests Apache's mod_proxy_uwsgi sends are served"
    )]
    Modifier(u8),
    #[error("the variables end inside a {0}")]
    Truncated(&'static str),
    #[error("no REQUEST_METHOD variable")]
    NoMethod,
    #[error("no REQUEST_URI or PATH_INFO variable")]
    NoTarget,
    #[error("the {0} variable holds a byte an HTTP request head cannot carry")]
    BadByte(String),
}

/// The size of the variables that follow a packet's header.
pub fn vars_len(header: [u8; HEADER_LEN]) -> Result<usize, PacketError> {
    if header[0] != 0 {
        return Err(PacketError::Modifier(header[0]));
    }
    Ok(usize::from(u16::from_le_bytes([header[1], header[2]])))
}

/// A variable: its name and its value.
pub type Var<'a> = (&'a [u8], &'a [u8]);

/// The key/value pairs of a packet's variables, in order.
pub fn vars(mut buf: &[u8]) -> Result<Vec<Var<'_>>, PacketError> {
    fn take<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], PacketError> {
        let &[lo, hi, ref rest @ ..] = *buf else {
            return Err(PacketError::Truncated(what));
        };
        let len = usize::from(u16::from_le_bytes([lo, hi]));
        if rest.len() < len {
            return Err(PacketError::Truncated(what));
        }
        let (item, rest) = rest.split_at(len);
        *buf = rest;
        Ok(item)
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = take(&mut buf, "variable's name")?;
        let value = take(&mut buf, "variable's value")?;
        out.push((key, value));
    }
    Ok(out)
}

/// A packet's request, as HTTP.
#[derive(Debug)]
pub struct Request {
    /// The HTTP/1.0 request head, ending in the blank line.
    pub head: Vec<u8>,
    /// `REMOTE_ADDR` and `REMOTE_PORT`: the client of the server in front (Apache's client).
    pub remote: Option<SocketAddr>,
    /// `SCRIPT_NAME`: where the server in front mounts the service (`/identity`).
    pub script_name: String,
}

/// The variables a request head is not made of, or that mean something else here.
fn skipped(name: &[u8]) -> bool {
    matches!(
        name,
        // Apache answered the client's `Expect: 100-continue` itself, and is sending the body: an
        // interim 100 written into the answer would end its header block.
        b"HTTP_EXPECT"
        // One request per connection: the connection ends with the answer.
        | b"HTTP_CONNECTION" | b"HTTP_KEEP_ALIVE"
        // Written from CONTENT_LENGTH and CONTENT_TYPE, which are the ones uWSGI gives the app.
        | b"HTTP_CONTENT_LENGTH" | b"HTTP_CONTENT_TYPE"
    )
}

/// The HTTP request a packet's variables describe. Header names come back in lower case (the
/// variables do not keep their case), `_` in them as `-`.
pub fn to_http(vars: &[Var<'_>]) -> Result<Request, PacketError> {
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v)
    };
    let text = |name: &str| get(name).and_then(|v| std::str::from_utf8(v).ok());
    let method = get("REQUEST_METHOD")
        .filter(|m| !m.is_empty())
        .ok_or(PacketError::NoMethod)?;
    if !method.iter().all(|&b| is_token(b)) {
        return Err(PacketError::BadByte("REQUEST_METHOD".into()));
    }
    let script_name = text("SCRIPT_NAME").unwrap_or_default().to_owned();
    let target = match get("REQUEST_URI").filter(|u| !u.is_empty()) {
        Some(raw) => raw.to_vec(),
        None => {
            // Without the raw target, rebuild it as a WSGI server does: SCRIPT_NAME, PATH_INFO
            // (both decoded, so encoded again), and the raw query.
            let path = get("PATH_INFO").ok_or(PacketError::NoTarget)?;
            let mut target = encode_path(script_name.as_bytes());
            target.extend(encode_path(path));
            if target.is_empty() {
                target.push(b'/');
            }
            if let Some(query) = get("QUERY_STRING").filter(|q| !q.is_empty()) {
                target.push(b'?');
                target.extend_from_slice(query);
            }
            target
        }
    };
    if !target.iter().all(|&b| b > b' ' && b != 0x7f) {
        return Err(PacketError::BadByte("REQUEST_URI".into()));
    }

    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(method);
    head.push(b' ');
    head.extend_from_slice(&target);
    head.extend_from_slice(b" HTTP/1.0\r\n");
    let mut header = |name: &[u8], value: &[u8], var: &[u8]| {
        if value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(PacketError::BadByte(
                String::from_utf8_lossy(var).into_owned(),
            ));
        }
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
        Ok(())
    };
    let (mut has_host, mut has_proto) = (false, false);
    for &(key, value) in vars {
        let name: Vec<u8> = match key {
            b"CONTENT_TYPE" => b"content-type".to_vec(),
            b"CONTENT_LENGTH" if value.is_empty() => continue,
            b"CONTENT_LENGTH" => b"content-length".to_vec(),
            _ => match key.strip_prefix(b"HTTP_") {
                Some(rest) if !rest.is_empty() && !skipped(key) => rest
                    .iter()
                    .map(|&b| {
                        if b == b'_' {
                            b'-'
                        } else {
                            b.to_ascii_lowercase()
                        }
                    })
                    .collect(),
                _ => continue,
            },
        };
        if !name.iter().all(|&b| is_token(b)) {
            return Err(PacketError::BadByte(
                String::from_utf8_lossy(key).into_owned(),
            ));
        }
        has_host |= name == b"host";
        has_proto |= name == b"x-forwarded-proto";
        header(&name, value, key)?;
    }
    if !has_host {
        // The name the server in front answers to, as a WSGI app would rebuild it.
        if let (Some(name), Some(port)) = (get("SERVER_NAME"), get("SERVER_PORT")) {
            let mut host = name.to_vec();
            host.push(b':');
            host.extend_from_slice(port);
            header(b"host", &host, b"SERVER_NAME")?;
        }
    }
    // How the client reached the server in front, which uWSGI gives the app as its URL scheme: over
    // HTTP, `X-Forwarded-Proto` carries it (gunicorn reads it from a proxy on 127.0.0.1).
    let https = get("REQUEST_SCHEME") == Some(b"https")
        || get("HTTPS").is_some_and(|v| v.eq_ignore_ascii_case(b"on") || v == b"1");
    if https && !has_proto {
        header(b"x-forwarded-proto", b"https", b"REQUEST_SCHEME")?;
    }
    head.extend_from_slice(b"\r\n");

    let remote = text("REMOTE_ADDR")
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| {
            let port = text("REMOTE_PORT").and_then(|p| p.parse().ok());
            SocketAddr::new(ip, port.unwrap_or(0))
        });
    Ok(Request {
        head,
        remote,
        script_name,
    })
}

/// A byte of a token (RFC 9110 5.6.2): header names and methods.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A decoded path percent-encoded again: what a path cannot carry as it is.
fn encode_path(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if b.is_ascii_graphic() && !matches!(b, b'%' | b'?' | b'#') {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// A packet made of `vars`, with `modifier1` 0: what a test or the fuzzer sends.
pub fn encode(vars: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in vars {
        for part in [k, v] {
            let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
            body.extend_from_slice(&len.to_le_bytes());
            body.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
        }
    }
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut packet = vec![0, 0, 0, 0];
    packet[1..3].copy_from_slice(&len.to_le_bytes());
    packet.extend_from_slice(&body[..usize::from(len)]);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Apache 2.4's mod_proxy_uwsgi sent for `POST /identity/v3/auth/tokens?nocatalog`
    /// (the variables measured with a raw listener on the socket, abridged).
    fn apache() -> Vec<(&'static str, &'static str)> {
        vec![
            ("HTTP_HOST", "controller"),
            ("HTTP_USER_AGENT", "openstacksdk/1.0"),
            ("HTTP_X_AUTH_TOKEN", "gAAAA"),
            ("HTTP_EXPECT", "100-continue"),
            ("HTTP_CONNECTION", "keep-alive"),
            ("CONTENT_TYPE", "application/json"),
            ("CONTENT_LENGTH", "2"),
            ("SERVER_NAME", "controller"),
            ("SERVER_PORT", "80"),
            ("REMOTE_ADDR", "10.0.0.5"),
            ("REMOTE_PORT", "51234"),
            ("REQUEST_SCHEME", "http"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_METHOD", "POST"),
            ("QUERY_STRING", "nocatalog"),
            ("REQUEST_URI", "/identity/v3/auth/tokens?nocatalog"),
            ("SCRIPT_NAME", "/identity"),
            ("PATH_INFO", "/v3/auth/tokens"),
        ]
    }

    fn request(v: &[(&str, &str)]) -> Result<Request, PacketError> {
        let packet = encode(v);
        let len = vars_len(packet[..4].try_into().unwrap())?;
        assert_eq!(len, packet.len() - 4);
        to_http(&vars(&packet[4..])?)
    }

    #[test]
    fn apaches_variables_become_the_request_head_the_client_sent() {
        let r = request(&apache()).unwrap();
        assert_eq!(
            String::from_utf8(r.head).unwrap(),
            "POST /identity/v3/auth/tokens?nocatalog HTTP/1.0\r\n\
             host: controller\r\nuser-agent: openstacksdk/1.0\r\nx-auth-token: gAAAA\r\n\
             content-type: application/json\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(r.remote, Some("10.0.0.5:51234".parse().unwrap()));
        // Apache serving https (DevStack's tls-proxy): the app is told so.
        let tls: Vec<_> = apache()
            .into_iter()
            .map(|(k, v)| (k, if k == "REQUEST_SCHEME" { "https" } else { v }))
            .collect();
        let head = String::from_utf8(request(&tls).unwrap().head).unwrap();
        assert!(head.ends_with("x-forwarded-proto: https\r\n\r\n"), "{head}");
        assert_eq!(r.script_name, "/identity");
    }

    #[test]
    fn without_request_uri_the_target_is_rebuilt_encoded() {
        let v = [
            ("REQUEST_METHOD", "GET"),
            ("SCRIPT_NAME", "/placement"),
            ("PATH_INFO", "/resource providers/ä"),
            ("QUERY_STRING", "name=a%20b"),
            ("SERVER_NAME", "h"),
            ("SERVER_PORT", "8080"),
        ];
        let head = String::from_utf8(request(&v).unwrap().head).unwrap();
        assert_eq!(
            head,
            "GET /placement/resource%20providers/%C3%A4?name=a%20b HTTP/1.0\r\nhost: h:8080\r\n\r\n"
        );
    }

    #[test]
    fn malformed_packets_are_named() {
        assert_eq!(vars_len([5, 0, 0, 0]), Err(PacketError::Modifier(5)));
        assert_eq!(vars_len([0, 0x10, 0x01, 0]), Ok(0x110));
        assert_eq!(
            vars(&[3, 0, b'A']),
            Err(PacketError::Truncated("variable's name"))
        );
        assert_eq!(
            vars(&[1, 0, b'A', 4, 0, b'x']),
            Err(PacketError::Truncated("variable's value"))
        );
        assert_eq!(vars(&[1]), Err(PacketError::Truncated("variable's name")));
        assert_eq!(
            request(&[("PATH_INFO", "/")]).unwrap_err(),
            PacketError::NoMethod
        );
        assert_eq!(
            request(&[("REQUEST_METHOD", "GET")]).unwrap_err(),
            PacketError::NoTarget
        );
        let split = [
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/"),
            ("HTTP_X", "a\r\nb: c"),
        ];
        assert_eq!(
            request(&split).unwrap_err(),
            PacketError::BadByte("HTTP_X".into())
        );
        let space = [("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/a b")];
        assert_eq!(
            request(&space).unwrap_err(),
            PacketError::BadByte("REQUEST_URI".into())
        );
        let method = [("REQUEST_METHOD", "GET /"), ("REQUEST_URI", "/")];
        assert_eq!(
            request(&method).unwrap_err(),
            PacketError::BadByte("REQUEST_METHOD".into())
        );
        let name = [
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/"),
            ("HTTP_A:B", "c"),
        ];
        assert_eq!(
            request(&name).unwrap_err(),
            PacketError::BadByte("HTTP_A:B".into())
        );
    }
}
