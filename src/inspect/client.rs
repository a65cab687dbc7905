//! Asking a running shim's inspector, for the commands that do: `glance-shim har` and
//! `glance-shim replay`.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::cli::{HarArgs, InspectAt, ReplayArgs};
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
    #[error(
        "no key for the inspector at {0}: give --key (the key= in the inspector's address on \
         glance-shim's start-up line)"
    )]
    NoKey(String),
    #[error("the key is not a valid field value")]
    BadKey,
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
    let filter = super::view::Filter::parse(filter);
    records.retain(|e| filter.matches(&super::view::summary(e, &cx)));
    let comment = format!(
        "captured by glance-shim in {}: {} requests",
        dir.display(),
        records.len()
    );
    let archive = super::har::archive(&records, &cx, Some(comment));
    Ok(serde_json::to_vec(&archive).expect("an archive serialises"))
}

/// The inspector's address: `--inspector`, or the default.
fn inspector_addr(given: &Option<InspectAt>) -> Result<String, ClientError> {
    match given {
        Some(InspectAt::Off) => Err(ClientError::Off),
        Some(InspectAt::At(addr)) => Ok(addr.to_string()),
        None => Ok(Inspect::default_on().addr.to_string()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)
}

/// `glance-shim replay`: asks the running shim to send a request again, then (unless `--no-wait`)
/// waits for glance's answer and says what it was. Exits 0 when the replay completed.
pub fn replay(args: &ReplayArgs) -> Result<std::process::ExitCode, ClientError> {
    let addr = inspector_addr(&args.inspector)?;
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let key = match &args.key {
        Some(key) => key.clone(),
        None => super::key::file(port)
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|k| k.trim().to_owned())
            .ok_or(ClientError::NoKey(addr.clone()))?,
    };
    let ask = serde_json::json!({"of": args.of, "token": args.token});
    runtime()?.block_on(async {
        let started = call(&addr, "POST", "/api/replay", Some((&key, ask.to_string()))).await?;
        let started: serde_json::Value = serde_json::from_slice(&started).unwrap_or_default();
        let (serial, id) = (
            started["serial"].as_u64().unwrap_or(0),
            started["id"].as_str().unwrap_or(""),
        );
        println!("{id}");
        eprintln!(
            "glance-shim replay: {} sent again as {id} (serial {serial})",
            args.of
        );
        if args.no_wait {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        loop {
            let now = call(&addr, "GET", &format!("/api/requests/{serial}"), None).await?;
            let now: serde_json::Value = serde_json::from_slice(&now).unwrap_or_default();
            if now["in_flight"] == false {
                let status = now["status"].as_u64().unwrap_or(0);
                let outcome = now["outcome"].as_str().unwrap_or("");
                eprintln!(
                    "glance-shim replay: {id}: {status}, {outcome}, {} ms",
                    now["timings"]["done_ms"].as_f64().unwrap_or(0.0)
                );
                if status == 401 {
                    eprintln!(
                        "glance-shim replay: glance answered 401: the token has probably expired \
                         (keystone's tokens last 1 h by default); replay with \
                         --token \"$(openstack token issue -f value -c id)\""
                    );
                }
                return Ok(match outcome {
                    "completed" => std::process::ExitCode::SUCCESS,
                    _ => std::process::ExitCode::FAILURE,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

fn from_inspector(args: &HarArgs) -> Result<Vec<u8>, ClientError> {
    let addr = inspector_addr(&args.inspector)?;
    let mut path = "/api/har".to_owned();
    if let Some(filter) = args.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        path.push_str("?filter=");
        path.extend(form_urlencoded::byte_serialize(filter.as_bytes()));
    }
    Ok(runtime()?
        .block_on(call(&addr, "GET", &path, None))?
        .to_vec())
}

/// `GET path` from the inspector at `addr`, or a `POST` of JSON with its key: the body of a 2xx.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    post: Option<(&str, String)>,
) -> Result<Bytes, ClientError> {
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
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr);
    let body = match post {
        Some((key, json)) => {
            req = req
                .header("x-glance-shim-key", key)
                .header(header::CONTENT_TYPE, "application/json");
            Bytes::from(json)
        }
        None => Bytes::new(),
    };
    let req = req.body(Full::new(body)).map_err(|_| ClientError::BadKey)?;
    let res = sender.send_request(req).await.map_err(http)?;
    let status = res.status();
    let body = res.into_body().collect().await.map_err(http)?.to_bytes();
    if !status.is_success() {
        // The inspector's errors are JSON with a message: show the message.
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned));
        return Err(ClientError::Status {
            addr: addr.to_owned(),
            status,
            text: message.unwrap_or_else(|| {
                crate::correlation::printable(&body[..body.len().min(500)]).into_owned()
            }),
        });
    }
    Ok(body)
}
