//! The shim as a user runs it: the real binary between a client and an in-process upstream, checked on
//! the wire (raw bytes) and in its JSON log.

mod util;

use std::time::{Duration, Instant};

use util::*;

fn completed(l: &serde_json::Value) -> bool {
    msg(l) == "completed"
        || msg(l).starts_with("completed by")
        || msg(l).starts_with("failed")
        || msg(l).starts_with("aborted")
}

// ---------------------------------------------------------------------------------------------
// Forwarding

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_query_are_forwarded_byte_for_byte() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    for target in [
        "/v2/images?name=a%20b&x=%2F&x=%2f",
        "//double//slash/",
        "/a/../b/./c",
        "/%7Euser/%E2%82%AC?q=%zz",
        "/v2/images/7a3b?",
        "/v2/images;param?a=1#",
    ] {
        let target = target.trim_end_matches('#');
        let mut client = Conn::connect(shim.addr).await;
        client
            .send(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n"))
            .await;
        let mut conn = up.accept().await;
        let head = conn.read_head().await;
        assert_eq!(head.start, format!("GET {target} HTTP/1.1"));
        conn.send("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(client.read_head().await.status(), 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_forwarded() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for method in [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "HEAD",
    ] {
        let body = if method == "GET" || method == "HEAD" {
            ""
        } else {
            "{\"a\":1}"
        };
        let (head, got) = roundtrip(
            shim.addr,
            &format!(
                "{method} /m HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert_eq!(head.status(), 200, "{method}");
        if method != "HEAD" {
            let seen: serde_json::Value = serde_json::from_slice(&got).unwrap();
            assert_eq!(seen["method"], method);
            assert_eq!(seen["body_len"], body.len());
        } else {
            assert!(got.is_empty());
            assert!(
                head.has("content-length"),
                "HEAD keeps the upstream's Content-Length"
            );
        }
    }
    assert_eq!(echo.requests().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_hop_by_hop_out_forwarding_in_host_kept() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send(
            "POST /v2/images HTTP/1.1\r\nHost: controller:9292\r\nX-Auth-Token: tok\r\n\
             Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nUpgrade: h2c\r\n\
             Via: 1.0 apache\r\nX-Forwarded-For: 192.0.2.9\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\n\r\n{}",
        )
        .await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert_eq!(conn.read_exact(2).await, b"{}");
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(!head.has(gone), "{gone} must not be forwarded: {head:?}");
    }
    assert_eq!(head.all("host"), vec!["controller:9292"]);
    assert_eq!(head.get("x-auth-token"), Some("tok"));
    assert_eq!(head.get("content-length"), Some("2"));
    assert_eq!(head.get("via"), Some("1.0 apache, 1.1 glance-shim"));
    assert_eq!(head.get("x-forwarded-for"), Some("192.0.2.9, 127.0.0.1"));
    assert_eq!(head.get("x-forwarded-proto"), Some("http"));
    assert_eq!(head.get("x-forwarded-host"), Some("controller:9292"));
    assert_eq!(head.all("x-openstack-request-id").len(), 1);
    // Field names keep the case the client wrote.
    assert_eq!(head.name_as_sent("x-auth-token"), Some("X-Auth-Token"));
    assert_eq!(head.name_as_sent("content-type"), Some("Content-Type"));
    conn.send("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert_eq!(client.read_head().await.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_come_back_unchanged_but_for_hop_by_hop_fields() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("GET /v2/images/x/file HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.send(
        "HTTP/1.1 200 Fine Thanks\r\nContent-Type: application/octet-stream\r\n\
         Content-MD5: 1B2M2Y8AsgTpgAmY7PhCfg==\r\nX-Openstack-Request-Id: req-from-glance\r\n\
         Location: http://controller:9292/v2/images/x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
         Keep-Alive: timeout=5\r\nSet-Cookie: a=b\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    let head = client.read_head().await;
    assert_eq!(head.start, "HTTP/1.1 200 Fine Thanks");
    assert_eq!(client.read_body(&head).await, b"hello");
    assert_eq!(head.get("content-md5"), Some("1B2M2Y8AsgTpgAmY7PhCfg=="));
    assert_eq!(
        head.get("location"),
        Some("http://controller:9292/v2/images/x")
    );
    assert_eq!(head.get("set-cookie"), Some("a=b"));
    assert_eq!(
        head.name_as_sent("x-openstack-request-id"),
        Some("X-Openstack-Request-Id")
    );
    assert_eq!(head.get("x-openstack-request-id"), Some("req-from-glance"));
    assert!(!head.has("x-hop") && !head.has("keep-alive"), "{head:?}");
    assert!(
        !head.has("date"),
        "the shim adds no Date of its own: {head:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for _ in 0..5 {
        let (head, _) = get(shim.addr, "/v2/images").await;
        assert_eq!(head.status(), 200);
    }
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "five client connections, one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_reached_the_upstream_is_never_retried() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let client = tokio::spawn(roundtrip(
        shim.addr,
        "POST /v2/images HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}",
    ));
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.read_exact(2).await;
    drop(conn); // glance crashed after reading the request
    let (head, body) = client.await.unwrap();
    assert_eq!(head.status(), 502);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("closed the connection"),
        "{body}"
    );
    // No second attempt reaches the upstream.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), up.accept())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_absolute_form_and_loops_get_clear_answers() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let (head, body) = roundtrip(
        shim.addr,
        "GET http://elsewhere.example/x HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await;
    assert_eq!(head.status(), 400, "{}", String::from_utf8_lossy(&body));
    let (head, _) = roundtrip(
        shim.addr,
        "CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(head.status(), 405);
    let (head, body) = roundtrip(
        shim.addr,
        "GET /x HTTP/1.1\r\nHost: h\r\nVia: 1.1 glance-shim\r\n\r\n",
    )
    .await;
    assert_eq!(head.status(), 508);
    assert!(String::from_utf8_lossy(&body).contains("already passed through glance-shim"));
    let (head, _) = roundtrip(shim.addr, "GET /x HTTP/1.1\r\n\r\n").await;
    assert_eq!(head.status(), 400, "HTTP/1.1 without Host");
    let (head, _) = roundtrip(shim.addr, "GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert_eq!(head.status(), 400, "two Hosts");
    let (head, _) = roundtrip(shim.addr, "GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(
        head.status(),
        200,
        "absolute-form naming the request's own host is fine"
    );
    assert_eq!(
        echo.requests().iter().filter(|r| r.target == "/x").count(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Streaming

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_streams_through_before_it_is_complete() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    client.write_chunk(&[b'a'; 1000]).await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert_eq!(head.get("transfer-encoding"), Some("chunked"));
    assert!(!head.has("content-length"));
    // The first chunk reaches glance while the client has not finished: nothing is gathered.
    assert_eq!(conn.read_chunk().await.unwrap(), vec![b'a'; 1000]);
    client.write_chunk(&[b'b'; 3000]).await;
    let mut rest = Vec::new();
    while rest.len() < 3000 {
        rest.extend(conn.read_chunk().await.unwrap());
    }
    assert_eq!(rest, vec![b'b'; 3000]);
    client.write_chunk(&[]).await;
    assert_eq!(conn.read_chunk().await, None);
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_chunked_body_keeps_its_body() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let (head, body) = roundtrip(
        shim.addr,
        "GET /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(head.status(), 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_len"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_streams_to_the_client_before_the_upstream_has_finished() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    for framing in ["Content-Length: 8000\r\n", "Transfer-Encoding: chunked\r\n"] {
        let mut client = Conn::connect(shim.addr).await;
        client
            .send("GET /v2/images/x/file HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let mut conn = up.accept().await;
        conn.read_head().await;
        conn.send(&format!("HTTP/1.1 200 OK\r\n{framing}\r\n"))
            .await;
        let chunked = framing.contains("chunked");
        if chunked {
            conn.write_chunk(&[b'x'; 4000]).await
        } else {
            conn.write(&[b'x'; 4000]).await
        }
        let head = client.read_head().await;
        assert_eq!(head.status(), 200);
        if chunked {
            let mut got = Vec::new();
            while got.len() < 4000 {
                got.extend(client.read_chunk().await.unwrap());
            }
            assert_eq!(
                got.len(),
                4000,
                "half the body arrived while the upstream still holds the rest"
            );
            conn.write_chunk(&[b'y'; 4000]).await;
            conn.write_chunk(&[]).await;
            let mut rest = Vec::new();
            while let Some(c) = client.read_chunk().await {
                rest.extend(c);
            }
            assert_eq!(rest, vec![b'y'; 4000]);
        } else {
            assert_eq!(head.get("content-length"), Some("8000"));
            assert_eq!(client.read_exact(4000).await, vec![b'x'; 4000]);
            conn.write(&[b'y'; 4000]).await;
            assert_eq!(client.read_exact(4000).await, vec![b'y'; 4000]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_shim_and_not_forwarded() {
    // Like uWSGI's http-socket: the upstream never sends 100 Continue.
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = client.read_head().await;
    assert_eq!(interim.start, "HTTP/1.1 100 Continue");
    client.write(b"hello").await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert!(
        !head.has("expect"),
        "the upstream must not wait for a 100 it never sends: {head:?}"
    );
    assert_eq!(conn.read_exact(5).await, b"hello");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_mid_body_aborts_the_client_connection() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    for framing in ["Content-Length: 100\r\n", "Transfer-Encoding: chunked\r\n"] {
        let mut client = Conn::connect(shim.addr).await;
        client.send("GET /file HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let mut conn = up.accept().await;
        conn.read_head().await;
        conn.send(&format!("HTTP/1.1 200 OK\r\n{framing}\r\n"))
            .await;
        if framing.contains("chunked") {
            conn.write_chunk(b"only part").await
        } else {
            conn.write(b"only part").await
        }
        drop(conn);
        let head = client.read_head().await;
        assert_eq!(head.status(), 200);
        let rest = client.read_to_close().await;
        if framing.contains("chunked") {
            assert!(
                !rest.ends_with(b"0\r\n\r\n"),
                "a broken chunked body must not be terminated: {rest:?}"
            );
        } else {
            assert!(
                rest.len() < 100,
                "a short Content-Length body cannot look complete"
            );
        }
    }
    shim.wait_for_nth("two failure lines", 2, |l| msg(l).starts_with("failed"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_garbage_is_a_502() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let client = tokio::spawn(get(shim.addr, "/v2/images"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
    let (head, body) = client.await.unwrap();
    assert_eq!(head.status(), 502);
    assert!(String::from_utf8_lossy(&body).contains("not valid HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_a_4xx() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for bad in [
        "GET /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        "GET /x HTTP/1.1\r\nHost h\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
        "NOT HTTP AT ALL\r\n\r\n",
    ] {
        let mut conn = Conn::connect(shim.addr).await;
        conn.send(bad).await;
        let head = conn.read_head().await;
        assert!((400..500).contains(&head.status()), "{bad:?} got {head:?}");
    }
    assert!(echo.requests().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Correlation and the log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_an_id_glance_will_use() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;

    // None sent: the shim's id goes to glance, and is the one on the log lines.
    let (head, _) = get(shim.addr, "/v2/images").await;
    let sent = echo.requests()[0]
        .headers
        .iter()
        .find(|(k, _)| k == "x-openstack-request-id")
        .unwrap()
        .1
        .clone();
    assert!(is_req_uuid4(&sent), "{sent}");
    assert_eq!(head.get("x-openstack-request-id"), Some(sent.as_str()));
    let arrived = shim
        .wait_for("arrival", |l| msg(l) == "arrived" && field(l, "id") == sent)
        .await;
    assert_eq!(field(&arrived, "id_from"), "shim");
    let done = shim
        .wait_for("completion", |l| {
            msg(l) == "completed" && field(l, "id") == sent
        })
        .await;
    assert_eq!(field(&done, "upstream_id"), sent);

    // A client's own id is kept and logged.
    let mine = "req-0f8a6b2c-1d3e-4f5a-8b7c-9d0e1f2a3b4c";
    roundtrip(
        shim.addr,
        &format!("GET /a HTTP/1.1\r\nHost: h\r\nX-OpenStack-Request-ID: {mine}\r\n\r\n"),
    )
    .await;
    let seen = &echo.requests()[1];
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(k, _)| k == "x-openstack-request-id")
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>(),
        vec![mine]
    );
    let arrived = shim
        .wait_for("client id", |l| {
            msg(l) == "arrived" && field(l, "id") == mine
        })
        .await;
    assert_eq!(field(&arrived, "id_from"), "client");

    // Over-long or repeated: replaced (glance would answer 500), with a warning.
    let long = "x".repeat(65);
    roundtrip(
        shim.addr,
        &format!("GET /b HTTP/1.1\r\nHost: h\r\nX-OpenStack-Request-ID: {long}\r\n\r\n"),
    )
    .await;
    roundtrip(shim.addr, "GET /c HTTP/1.1\r\nHost: h\r\nX-OpenStack-Request-ID: req-a\r\nx-openstack-request-id: req-b\r\n\r\n").await;
    for (i, path) in [(2, "/b"), (3, "/c")] {
        let seen = &echo.requests()[i];
        let ids: Vec<&str> = seen
            .headers
            .iter()
            .filter(|(k, _)| k == "x-openstack-request-id")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ids.len(), 1, "{path}: exactly one id reaches glance");
        assert!(is_req_uuid4(ids[0]));
        let arrived = shim
            .wait_for("arrival", |l| {
                msg(l) == "arrived" && field(l, "path") == path
            })
            .await;
        assert_eq!(field(&arrived, "id"), ids[0]);
        shim.wait_for("replacement warning", |l| {
            field(l, "level") == "WARN"
                && field(l, "id") == ids[0]
                && msg(l).contains("glance answers 500")
        })
        .await;
    }
}

fn is_req_uuid4(s: &str) -> bool {
    let Some(u) = s.strip_prefix("req-") else {
        return false;
    };
    u.len() == 36
        && u.as_bytes()[14] == b'4'
        && u.chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arrival_line_is_written_before_the_upstream_answers() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let client = tokio::spawn(get(shim.addr, "/v2/images?limit=20"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    // The upstream holds the request (a breakpoint): the arrival line is already there.
    let arrived = shim.wait_for("arrival", |l| msg(l) == "arrived").await;
    assert_eq!(field(&arrived, "method"), "GET");
    assert_eq!(field(&arrived, "path"), "/v2/images?limit=20");
    assert!(field(&arrived, "client").starts_with("127.0.0.1:"));
    assert_eq!(shim.count(completed), 0);
    conn.send(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-openstack-request-id: req-glance\r\n\r\n[]",
    )
    .await;
    client.await.unwrap();
    let done = shim.wait_for("completion", |l| msg(l) == "completed").await;
    assert_eq!(done["status"], 200);
    assert_eq!(done["bytes_in"], 0);
    assert_eq!(done["bytes_out"], 2);
    assert_eq!(field(&done, "upstream_id"), "req-glance");
    assert_eq!(field(&done, "id"), field(&arrived, "id"));
    assert!(done["upstream_headers_ms"].as_f64().unwrap() <= done["total_ms"].as_f64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_headers_masks_every_secret_everywhere() {
    let echo = Echo::start().await;
    let dir = tempdir();
    let file = dir.join("shim.log");
    let file_arg = file.to_str().unwrap();
    let shim = Shim::start(&echo.port(), &["--log-headers"]).await;
    let text = Shim::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &echo.port(),
            "--log-headers",
            "--log-file",
            file_arg,
        ],
        &[("RUST_LOG", "trace")],
    );
    let secrets = [
        "tok-SECRET-1",
        "subj-SECRET-2",
        "svc-SECRET-3",
        "Bearer SECRET-4",
        "Basic SECRET-5",
        "sid=SECRET-6",
    ];
    let request = format!(
        "GET /v2/images HTTP/1.1\r\nHost: h\r\nX-Auth-Token: {}\r\nX-Subject-Token: {}\r\nX-Service-Token: {}\r\n\
         Authorization: {}\r\nProxy-Authorization: {}\r\nCookie: {}\r\nUser-Agent: python-glanceclient\r\n\r\n",
        secrets[0], secrets[1], secrets[2], secrets[3], secrets[4], secrets[5]
    );
    roundtrip(shim.addr, &request).await;
    let arrived = shim.wait_for("arrival", |l| msg(l) == "arrived").await;
    let headers = field(&arrived, "headers");
    assert!(
        headers.contains("user-agent: python-glanceclient"),
        "{headers}"
    );
    assert_eq!(headers.matches("<masked>").count(), 6, "{headers}");
    // The text-format shim, at trace level, writing to a file.
    let port = wait_for_file_line(&file, "listening").await;
    let addr: std::net::SocketAddr = port.parse().unwrap();
    roundtrip(addr, &request).await;
    wait_for_file_line(&file, "completed").await;
    let all = format!(
        "{}\n{}",
        shim.dump(),
        std::fs::read_to_string(&file).unwrap()
    );
    for s in secrets {
        let needle = s.split(' ').next_back().unwrap();
        assert!(!all.contains(needle), "{needle} leaked into a log:\n{all}");
    }
    drop(text);
}

/// Waits for a line containing `needle` in a text log file; returns the `listen=` address if present.
async fn wait_for_file_line(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line
                .split("listen=")
                .nth(1)
                .map(|s| s.split(' ').next().unwrap().to_owned())
                .unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {}:\n{text}",
            path.display()
        );
        // A file has no change notification here; poll it.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "glance-shim-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_the_default_and_the_log_file_is_appended_to() {
    let echo = Echo::start().await;
    let dir = tempdir();
    let file = dir.join("shim.log");
    std::fs::write(&file, "earlier line\n").unwrap();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &echo.port(),
        "--log-file",
        file.to_str().unwrap(),
    ];
    let shim = Shim::spawn(&args, &[]);
    let addr: std::net::SocketAddr = wait_for_file_line(&file, "listening")
        .await
        .parse()
        .unwrap();
    get(addr, "/v2/images").await;
    wait_for_file_line(&file, "completed").await;
    drop(shim);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with("earlier line\n"),
        "appended, not truncated"
    );
    let arrived = text.lines().find(|l| l.contains("arrived")).unwrap();
    assert!(
        arrived.contains(" INFO ")
            && arrived.contains("method=GET")
            && arrived.contains("path=/v2/images"),
        "{arrived}"
    );
    assert!(
        !arrived.contains('\u{1b}'),
        "no colour outside a terminal: {arrived:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_by_level_and_module() {
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = spot.local_addr().unwrap().port().to_string();
    drop(spot); // a down upstream makes warnings
    let mut shim = Shim::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &port,
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "warn,glance_shim::server=info")],
    );
    let line = shim
        .wait_for("listening (server module at info)", |l| {
            msg(l) == "listening"
        })
        .await;
    shim.addr = field(&line, "listen").parse().unwrap();
    let (head, _) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 502);
    shim.wait_for("the 502's completion (a warning)", |l| {
        msg(l).starts_with("completed by")
    })
    .await;
    assert_eq!(
        shim.count(|l| msg(l) == "arrived"),
        0,
        "info lines of other modules are filtered out"
    );
}

// ---------------------------------------------------------------------------------------------
// Breakpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_upstream_earns_growing_notices_and_the_table_shows_it() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--stall-after", "300ms"]).await;
    let started = Instant::now();
    let client = tokio::spawn(get(shim.addr, "/v2/images/abc"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    let first = shim
        .wait_for("first stall notice", |l| {
            msg(l).contains("probably paused at a breakpoint")
        })
        .await;
    let after_first = started.elapsed();
    assert!(after_first >= Duration::from_millis(300), "{after_first:?}");
    assert_eq!(field(&first, "level"), "WARN");
    assert_eq!(field(&first, "method"), "GET");
    assert_eq!(field(&first, "path"), "/v2/images/abc");
    assert!(field(&first, "id").starts_with("req-"));
    assert!(first["waited_s"].as_f64().unwrap() >= 0.3);
    let second = shim
        .wait_for_nth("second notice", 2, |l| msg(l).contains("probably paused"))
        .await;
    assert!(
        second["waited_s"].as_f64().unwrap() >= 0.6,
        "the second notice comes after twice the threshold: {second}"
    );
    let third = shim
        .wait_for_nth("third notice", 3, |l| msg(l).contains("probably paused"))
        .await;
    assert!(third["waited_s"].as_f64().unwrap() >= 1.2, "{third}");

    shim.signal("USR1");
    let table = shim
        .wait_for("the in-flight table", |l| msg(l).starts_with("SIGUSR1"))
        .await;
    let text = msg(&table);
    assert!(
        text.contains("1 request(s) in flight") && text.contains("GET /v2/images/abc"),
        "{text}"
    );
    assert!(
        text.contains(field(&first, "id")) && text.contains("waiting for upstream headers"),
        "{text}"
    );

    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await;
    assert_eq!(client.await.unwrap().0.status(), 200);
    shim.wait_for("moving again", |l| msg(l).contains("moving again"))
        .await;
    shim.wait_for("completion", |l| msg(l) == "completed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_upload_is_not_mistaken_for_a_breakpoint() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--stall-after", "200ms"]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    let mut conn = up.accept().await;
    conn.read_head().await;
    assert_eq!(conn.read_exact(3).await, b"abc");
    // The client dawdles for well over the threshold; the upstream is reading, so no notice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        shim.count(|l| msg(l).contains("probably paused")),
        0,
        "{}",
        shim.dump()
    );
    client.write(b"defghij").await;
    assert_eq!(conn.read_exact(7).await, b"defghij");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_answers_504_only_when_asked_for() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(
        &up.port(),
        &["--upstream-timeout", "400ms", "--stall-after", "0"],
    )
    .await;
    let started = Instant::now();
    let client = tokio::spawn(get(shim.addr, "/slow"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    let (head, body) = client.await.unwrap();
    assert_eq!(head.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(String::from_utf8_lossy(&body).contains("--upstream-timeout"));
    assert!(conn.closed().await, "the upstream connection is given up");
}

// ---------------------------------------------------------------------------------------------
// Upstream down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_quick_json_502_logged_once_and_recovers_by_itself() {
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = spot.local_addr().unwrap().port().to_string();
    drop(spot); // nothing listens there now
    let shim = Shim::start(&port, &[]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(tokio::spawn(get(
            shim.addr,
            if i == 0 { "/first" } else { "/v2/images" },
        )));
    }
    let started = Instant::now();
    for c in clients {
        let (head, body) = c.await.unwrap();
        assert_eq!(head.status(), 502);
        assert_eq!(head.get("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], 502);
        assert_eq!(body["title"], "Bad Gateway");
        let m = body["message"].as_str().unwrap();
        assert!(
            m.contains(&format!("127.0.0.1:{port}"))
                && m.contains("nothing listens")
                && m.contains("debug glance-api running"),
            "{m}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within milliseconds, not after a timeout"
    );
    shim.wait_for_nth("20 completions", 20, |l| msg(l).starts_with("completed by"))
        .await;
    assert_eq!(
        shim.count(|l| msg(l).contains("nothing listens on the upstream")),
        1,
        "{}",
        shim.dump()
    );

    // glance comes back: the next request just works.
    let echo = Echo::start_on(
        tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
            .await
            .unwrap(),
    );
    let (head, _) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 200);
    shim.wait_for("back", |l| msg(l).contains("accepts connections again"))
        .await;
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_upstream_holds_a_request_until_glance_is_back() {
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = spot.local_addr().unwrap().port().to_string();
    drop(spot);
    let shim = Shim::start(&port, &["--wait-upstream", "20s"]).await;
    let client = tokio::spawn(roundtrip(
        shim.addr,
        "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    ));
    shim.wait_for("outage notice", |l| msg(l).contains("Holding requests"))
        .await;
    assert!(!client.is_finished());
    let echo = Echo::start_on(
        tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
            .await
            .unwrap(),
    );
    let (head, body) = client.await.unwrap();
    assert_eq!(head.status(), 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen["body_len"], 5,
        "the body held during the wait arrives whole"
    );
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_upstream_gives_up_with_a_502() {
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = spot.local_addr().unwrap().port().to_string();
    drop(spot);
    let shim = Shim::start(&port, &["--wait-upstream", "500ms"]).await;
    let started = Instant::now();
    let (head, body) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 502);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(String::from_utf8_lossy(&body).contains("after waiting"));
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let up = RawUpstream::bind().await;
    let mut shim = Shim::start(&up.port(), &["--drain", "20s"]).await;
    let client = tokio::spawn(get(shim.addr, "/in-flight"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    shim.signal("TERM");
    shim.wait_for("drain start", |l| msg(l).starts_with("shutting down"))
        .await;
    // No new connections are accepted while draining.
    assert!(
        tokio::net::TcpStream::connect(shim.addr).await.is_err(),
        "the listener is closed"
    );
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
        .await;
    let (head, body) = client.await.unwrap();
    assert_eq!((head.status(), body.as_slice()), (200, &b"done"[..]));
    assert_eq!(shim.exit_status().await.code(), Some(0));
    assert_eq!(
        shim.count(|l| msg(l) == "completed" && field(l, "path") == "/in-flight"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breakpoint_does_not_hold_shutdown_past_drain() {
    let up = RawUpstream::bind().await;
    let mut shim = Shim::start(&up.port(), &["--drain", "300ms"]).await;
    let _client = tokio::spawn(get(shim.addr, "/held"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    let started = Instant::now();
    shim.signal("INT");
    assert_eq!(shim.exit_status().await.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let last = shim
        .wait_for("drain report", |l| msg(l).contains("drain time"))
        .await;
    assert!(
        msg(&last).contains("GET /held"),
        "the cut-off request is named: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_exits_at_once() {
    let up = RawUpstream::bind().await;
    let mut shim = Shim::start(&up.port(), &["--drain", "60s"]).await;
    let _client = tokio::spawn(get(shim.addr, "/held"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    shim.signal("INT");
    shim.wait_for("drain start", |l| msg(l).starts_with("shutting down"))
        .await;
    let started = Instant::now();
    shim.signal("INT");
    assert_eq!(shim.exit_status().await.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// The command line

#[tokio::test]
async fn a_bad_flag_is_one_line_and_exit_2() {
    for args in [
        vec!["--listen", "nope", "--upstream", "60999"],
        vec!["--listen", "9292", "--upstream", "9292"],
        vec!["--listen", "9292"],
        vec![
            "--listen",
            "9292",
            "--upstream",
            "60999",
            "--stall-after",
            "soon",
        ],
        vec![
            "--listen",
            "9292",
            "--upstream",
            "60999",
            "--log-file",
            "/nonexistent/dir/shim.log",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_glance-shim"))
            .args(&args)
            .env_remove("GLANCE_SHIM_LISTEN")
            .env_remove("GLANCE_SHIM_UPSTREAM")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("glance-shim: "), "{err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_glance-shim"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--listen 9292 --upstream 60999")
            && help.contains("--listen 60999 --upstream 9292")
    );
}

#[test]
fn every_flag_and_variable_in_help_is_in_the_readme_table() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_glance-shim"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: String = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut checked = 0;
    for word in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
        let flag =
            word.starts_with("--") && word.len() > 2 && !matches!(word, "--help" | "--version");
        let variable = word.starts_with("GLANCE_SHIM_");
        if flag || variable {
            assert!(
                table.contains(&format!("`{word}")),
                "{word} is not in README's flags table"
            );
            checked += 1;
        }
    }
    assert!(
        checked > 30,
        "only {checked} flags and variables found in:\n{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_can_come_from_the_environment() {
    let echo = Echo::start().await;
    let port = echo.port();
    let shim = Shim::spawn(
        &[],
        &[
            ("GLANCE_SHIM_LISTEN", "127.0.0.1:0"),
            ("GLANCE_SHIM_UPSTREAM", &port),
            ("GLANCE_SHIM_LOG_FORMAT", "json"),
        ],
    );
    let line = shim.wait_for("listening", |l| msg(l) == "listening").await;
    assert_eq!(field(&line, "upstream"), format!("http://127.0.0.1:{port}"));
}
