//! Asking a running shim's inspector, for the commands that do: `glance-shim har`.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::cli::{HarArgs, InspectAt};
use crate::config::Inspect;

/// Why a command could not get what it asked the running shim for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the inspector is off here (--inspect off, or GLANCE_SHIM_INSPECT=off): give the running \
         shim's inspector with --inspector ADDR"
    )]
    Off,
    #[error(
        "no inspector answers at {addr} ({source}): is glance-shim running, with its inspector \
         there? Give its address with --inspector ADDR"
    )]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error("the inspector at {addr} broke off ({0})", addr = .1)]
    Http(hyper::Error, String),
    #[error("the inspector at {addr} answered {status}: {text}")]
    Status {
        addr: String,
        status: StatusCode,
        text: String,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a directory: give the DIR that --capture wrote to", .0.display())]
    NoCapture(PathBuf),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// `glance-shim har`: the archive from the inspector at `--inspector`, or from the capture in DIR,
/// to `--output` or stdout.
pub fn har(args: &HarArgs) -> Result<(), ClientError> {
    let body = match &args.dir {
        Some(dir) => from_capture(dir, args.filter.as_deref().unwrap_or(""))?,
        None => from_inspector(args)?,
    };
    let written = match &args.output {
        Some(file) => std::fs::write(file, &body).map_err(|source| (file.clone(), source)),
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(&body)
                .map_err(|source| (PathBuf::from("standard output"), source))
        }
    };
    written.map_err(|(path, source)| ClientError::Write { path, source })
}

/// The archive of what `dir` holds; what could not be read is said on stderr, one line each.
fn from_capture(dir: &std::path::Path, filter: &str) -> Result<Vec<u8>, ClientError> {
    if !dir.is_dir() {
        return Err(ClientError::NoCapture(dir.to_owned()));
    }
    let (mut records, warnings) = crate::capture::records(dir);
    for w in warnings {
        eprintln!("glance-shim har: warning: {w}");
    }
    let cx = super::view::Context::now(None, "http");
    let filter = super::har::Filter::parse(filter);
    records.retain(|e| filter.matches(&super::view::summary(e, &cx)));
    let comment = format!(
        "captured by glance-shim in {}: {} requests",
        dir.display(),
        records.len()
    );
    let archive = super::har::archive(&records, &cx, Some(comment));
    Ok(serde_json::to_vec(&archive).expect("an archive serialises"))
}

fn from_inspector(args: &HarArgs) -> Result<Vec<u8>, ClientError> {
    let addr = match &args.inspector {
        Some(InspectAt::Off) => return Err(ClientError::Off),
        Some(InspectAt::At(addr)) => addr.to_string(),
        None => Inspect::default_on().addr.to_string(),
    };
    let mut path = "/api/har".to_owned();
    if let Some(filter) = args.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        path.push_str("?filter=");
        path.extend(form_urlencoded::byte_serialize(filter.as_bytes()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    Ok(runtime.block_on(get(&addr, &path))?.to_vec())
}

/// `GET path` from the inspector at `addr`: the body of a 200.
pub async fn get(addr: &str, path: &str) -> Result<Bytes, ClientError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Unreachable {
            addr: addr.to_owned(),
            source,
        })?;
    let http = |e| ClientError::Http(e, addr.to_owned());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .expect("a GET with a valid path");
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(http)?.to_bytes();
    if status != StatusCode::OK {
        // The inspector's errors are JSON with a message; show it as it came.
        return Err(ClientError::Status {
            addr: addr.to_owned(),
            status,
            text: crate::correlation::printable(&body[..body.len().min(500)]),
        });
    }
    Ok(body)
}
