//! The benchmark's upstream: a small JSON answer, a large download, and an upload endpoint that reads
//! the whole body before it answers (answering before reading would measure nothing).
//!
//! `BENCH_FILE=F bench-upstream PORT`:
//! - `GET /small`: an image-show sized JSON body;
//! - `GET /file`: the file F, read in 64 KiB chunks on the serving thread and sent as read, the way
//!   glance's filesystem store serves image data (`filesystem_store_chunk_size`);
//! - `GET /synthetic?bytes=N`: N bytes written from one cached buffer, an upstream that costs nothing
//!   per byte (an upper bound no real glance comes near);
//! - `PUT|POST /upload`: reads the body, answers `{"bytes": N}`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// An image-show answer of glance's usual size.
const SMALL: &[u8] = br#"{"id": "4c1f8f38-4b7f-4c6e-9d0a-0f2b6c1d7e55", "name": "cirros-0.6.2-x86_64-disk", "status": "active", "visibility": "public", "size": 21430272, "virtual_size": 117440512, "checksum": "c8fc807773e5354afe61636071771906", "os_hash_algo": "sha512", "os_hash_value": "1103b92ce8ad966e41235a4de260deb791ff571670c0342666c8582fbb9caefe6af07ebb11d34f44f8414b609b29c1bdf1d72ffa6faa39c88e8721d09847952b", "container_format": "bare", "disk_format": "qcow2", "owner": "7b5e5b4c8c1c4b6f9b5d1e0f2a3b4c5d", "min_ram": 0, "min_disk": 0, "protected": false, "os_hidden": false, "tags": [], "created_at": "2026-11-25T10:00:00Z", "updated_at": "2026-11-25T10:00:03Z", "self": "/v2/images/4c1f8f38-4b7f-4c6e-9d0a-0f2b6c1d7e55", "file": "/v2/images/4c1f8f38-4b7f-4c6e-9d0a-0f2b6c1d7e55/file", "schema": "/v2/schemas/image"}"#;

type Out = BoxBody<Bytes, Infallible>;

struct Large {
    block: Bytes,
    left: u64,
}

impl Body for Large {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let take = self.left.min(self.block.len() as u64) as usize;
        self.left -= take as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..take)))))
    }
}

async fn serve(req: Request<Incoming>, block: Bytes) -> Result<Response<Out>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/small" {
        let mut res = Response::new(Full::new(Bytes::from_static(SMALL)).boxed());
        res.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return Ok(res);
    }
    if path == "/synthetic" {
        let n: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 30);
        let mut res = Response::new(Large { block, left: n }.boxed());
        res.headers_mut().insert("content-length", n.into());
        res.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return Ok(res);
    }
    if path == "/file" {
        let Some(file) = std::env::var("BENCH_FILE")
            .ok()
            .and_then(|f| std::fs::File::open(f).ok())
        else {
            let mut res =
                Response::new(Full::new(Bytes::from_static(b"BENCH_FILE is not set\n")).boxed());
            *res.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(res);
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut res = Response::new(FileBody { file }.boxed());
        res.headers_mut().insert("content-length", len.into());
        res.headers_mut()
            .insert("content-type", "application/octet-stream".parse().unwrap());
        return Ok(res);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => break,
            }
        }
        let json = format!("{{\"bytes\": {n}}}");
        return Ok(Response::new(Full::new(Bytes::from(json)).boxed()));
    }
    let mut res = Response::new(Full::new(Bytes::from_static(b"not found\n")).boxed());
    *res.status_mut() = hyper::StatusCode::NOT_FOUND;
    Ok(res)
}

/// glance's filesystem store: read a 64 KiB chunk (`filesystem_store_chunk_size`), send it, read the
/// next, all on the thread that serves the request.
struct FileBody {
    file: std::fs::File,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        use std::io::Read;
        let mut buf = vec![0u8; 64 << 10];
        match self.file.read(&mut buf) {
            Ok(0) | Err(_) => Poll::Ready(None),
            Ok(n) => {
                buf.truncate(n);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
        }
    }
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: bench-upstream PORT");
    let threads: usize = std::env::var("BENCH_UPSTREAM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let block = Bytes::from(vec![0x5au8; 256 << 10]);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let block = block.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| serve(req, block.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
