//! bench-hyper-alone PORT UPSTREAM_PORT: the least a proxy built on the shim's libraries can be. hyper's
//! server and hyper-util's pooled client on one tokio thread, as the shim runs, forwarding each request
//! as it came, with no log, no inspector, no header rules and no error pages (an unreachable upstream
//! gets an empty 502). `bench/run.py` measures it as the peer "hyper alone": what the libraries
//! themselves add to a request, below which no change to the shim can go.
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(port), Some(upstream)) = (
        args.next().and_then(|a| a.parse::<u16>().ok()),
        args.next().and_then(|a| a.parse::<u16>().ok()),
    ) else {
        eprintln!("usage: bench-hyper-alone PORT UPSTREAM_PORT");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .retry_canceled_requests(false)
            .build(connector);
        let authority: http::uri::Authority = format!("127.0.0.1:{upstream}").parse().unwrap();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (client, authority) = (client.clone(), authority.clone());
            tokio::spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let client = client.clone();
                    let authority = authority.clone();
                    async move {
                        // The absolute form the pool picks a connection by, built from parts as the
                        // shim builds it: no text formatted and parsed again per request.
                        let mut parts = http::uri::Parts::default();
                        parts.scheme = Some(http::uri::Scheme::HTTP);
                        parts.authority = Some(authority);
                        parts.path_and_query = req.uri().path_and_query().cloned();
                        let sent = match Uri::from_parts(parts) {
                            Ok(uri) => {
                                *req.uri_mut() = uri;
                                client.request(req).await.ok()
                            }
                            Err(_) => None,
                        };
                        Ok::<_, Infallible>(match sent {
                            Some(res) => res.map(Either::Left),
                            None => {
                                let mut res = Response::new(Either::Right(Empty::<Bytes>::new()));
                                *res.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                                res
                            }
                        })
                    }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
