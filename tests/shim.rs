//! The shim as a user runs it: the real binary between a client and an in-process upstream, checked on
//! the wire (raw bytes) and in its JSON log.

mod util;

use std::time::{Duration, Instant};

use util::*;

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
    // Absolute-form (which only proxies are sent) goes on in origin-form, path and query untouched.
    let request = "GET http://h/v2/images?a=%2F HTTP/1.1\r\nHost: h\r\n\r\n";
    let (mut client, mut conn, head) = forwarded(&shim, &up, request).await;
    assert_eq!(head.start, "GET /v2/images?a=%2F HTTP/1.1");
    conn.send("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(client.read_head().await.status(), 204);
    // The asterisk-form of OPTIONS, too.
    let request = "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n";
    let (mut client, mut conn, head) = forwarded(&shim, &up, request).await;
    assert_eq!(head.start, "OPTIONS * HTTP/1.1");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
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

    // The one change hyper makes: a 204 must not carry Content-Length (RFC 9110 §8.6), so the
    // `Content-Length: 0` some servers send with it is not relayed.
    client
        .send("DELETE /v2/images/x HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    conn.read_head().await;
    conn.send("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Kept: yes\r\n\r\n")
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status(), 204);
    assert_eq!(head.get("x-kept"), Some("yes"));
    assert!(!head.has("content-length"), "{head:?}");
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
    let done = shim.wait_for("the completion", completion).await;
    assert_eq!(outcome(&done), "upstream_broke_off");
    // A second attempt would have connected before the 502 was sent, so it would be the next
    // connection in the upstream's accept queue, ahead of this marker request.
    let marker = tokio::spawn(get(shim.addr, "/marker"));
    let mut next = up.accept().await;
    assert_eq!(
        next.read_head().await.start,
        "GET /marker HTTP/1.1",
        "the POST was not sent again"
    );
    next.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(marker.await.unwrap().0.status(), 204);
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
async fn glanceclients_1_mib_chunks_reach_glance_in_chunks_uwsgi_accepts() {
    // uWSGI refuses chunks of 1 MiB or more (chunked-input-limit); glanceclient sends exactly 1 MiB.
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let sender = tokio::spawn(async move {
        for i in 0..3 {
            client.write_chunk(&Pattern::block(i)).await;
        }
        client.write_chunk(&[]).await;
        client
    });
    let mut conn = up.accept().await;
    conn.read_head().await;
    let mut got = Vec::new();
    let mut largest = 0;
    while let Some(chunk) = conn.read_chunk().await {
        largest = largest.max(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), 3 * BLOCK);
    assert_eq!(sha256(&got), Pattern::sha256(3 * BLOCK as u64));
    assert!(
        largest <= glance_shim::body::MAX_FRAME,
        "a chunk of {largest} bytes reached the upstream"
    );
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    let mut client = sender.await.unwrap();
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

/// Starts a PUT with `Expect: 100-continue` and holds its 5-byte body back, as curl does.
async fn put_expecting_continue(shim: &Shim, path: &str) -> Conn {
    let mut client = Conn::connect(shim.addr).await;
    client
        .send(&format!(
            "PUT {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        ))
        .await;
    client
}

/// glance answers `100 Continue` and the client's body follows: glance gets it whole, and answers.
async fn glance_asks_for_the_body(client: &mut Conn, conn: &mut Conn) {
    conn.send("HTTP/1.1 100 Continue\r\n\r\n").await;
    assert_eq!(client.read_head().await.start, "HTTP/1.1 100 Continue");
    client.write(b"hello").await;
    assert_eq!(conn.read_exact(5).await, b"hello");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_glances_refusal_reaches_the_client_and_the_body_is_never_sent() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = put_expecting_continue(&shim, "/v2/images/x/file").await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert_eq!(
        head.get("expect"),
        Some("100-continue"),
        "the Expect goes to glance"
    );
    // glance refuses at once without reading the body (413, or 403 for a bad token).
    conn.send("HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        .await;
    let head = client.read_head().await;
    assert_eq!(
        head.status(),
        413,
        "the final answer, with no 100 Continue first"
    );
    assert_eq!(client.read_body(&head).await, b"big!");
    assert!(
        client.closed().await,
        "the client is never asked for its body: the connection closes after the answer"
    );
    let done = shim.wait_for("the completion", completion).await;
    assert_eq!(outcome(&done), "completed");
    assert_eq!(done["status"], 413);
    assert_eq!(done["bytes_in"], 0);
    assert_eq!(field(&done, "expect_100"), "not_sent");
    assert!(
        conn.closed().await,
        "glance's connection, owed a body that will not come, is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_glances_100_is_relayed_before_the_body() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = put_expecting_continue(&shim, "/v2/images/x/file").await;
    let mut conn = up.accept().await;
    assert!(conn.read_head().await.has("expect"));
    glance_asks_for_the_body(&mut client, &mut conn).await;
    let done = shim.wait_for("the completion", completion).await;
    assert_eq!(field(&done, "expect_100"), "relayed");
    assert_eq!(done["bytes_in"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continues_second_is_counted_from_when_glance_has_the_request() {
    // glance is restarting: --wait-upstream holds the request longer than the second glance has to
    // answer 100 Continue, which only starts once glance has the request.
    let down = Reserved::new();
    let shim = Shim::start(&down.port_str(), &["--wait-upstream", "20s"]).await;
    let mut client = put_expecting_continue(&shim, "/v2/images/x/file").await;
    shim.wait_for("the outage", |l| msg(l).contains("Holding requests"))
        .await;
    // The restart takes longer than the second glance has to answer 100 Continue: the length of the
    // outage is the subject of this test, not a wait for the shim. Whether the shim sent a 100 of its
    // own meanwhile, the completion line says below ("relayed", not "timed_out").
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let up = RawUpstream::on(down.listen());
    let mut conn = up.accept().await;
    assert!(conn.read_head().await.has("expect"));
    glance_asks_for_the_body(&mut client, &mut conn).await;
    let done = shim.wait_for("the completion", completion).await;
    assert_eq!(field(&done, "expect_100"), "relayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_to_a_silent_upstream_sends_the_body_after_a_second_then_at_once() {
    // Like uWSGI's http-socket: it never answers 100 Continue, it waits for the body.
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let started = Instant::now();
    let mut client = put_expecting_continue(&shim, "/first").await;
    let mut conn = up.accept().await;
    assert!(conn.read_head().await.has("expect"));
    assert_eq!(client.read_head().await.start, "HTTP/1.1 100 Continue");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "glance had a second to answer first"
    );
    client.write(b"hello").await;
    assert_eq!(conn.read_exact(5).await, b"hello");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
    let first = shim.wait_for("the first completion", completion).await;
    assert_eq!(field(&first, "expect_100"), "timed_out");
    shim.wait_for("what was learnt", |l| {
        msg(l).contains("does not answer Expect: 100-continue")
    })
    .await;

    // Learnt: the next upload's body is asked for at once. This upstream happens to answer 100 this
    // time, which unlearns it.
    let mut client = put_expecting_continue(&shim, "/second").await;
    assert_eq!(client.read_head().await.start, "HTTP/1.1 100 Continue");
    client.write(b"hello").await;
    assert_eq!(conn.read_head().await.start, "PUT /second HTTP/1.1");
    conn.send("HTTP/1.1 100 Continue\r\n\r\n").await;
    assert_eq!(conn.read_exact(5).await, b"hello");
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
    let second = shim
        .wait_for("the second completion", |l| {
            completion(l) && field(l, "path") == "/second"
        })
        .await;
    assert_eq!(field(&second, "expect_100"), "at_once");

    let mut client = put_expecting_continue(&shim, "/third").await;
    assert_eq!(conn.read_head().await.start, "PUT /third HTTP/1.1");
    glance_asks_for_the_body(&mut client, &mut conn).await;
    let third = shim
        .wait_for("the third completion", |l| {
            completion(l) && field(l, "path") == "/third"
        })
        .await;
    assert_eq!(field(&third, "expect_100"), "relayed");
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
    shim.wait_for_nth("two completions that say so", 2, |l| {
        outcome(l) == "upstream_broke_off" && field(l, "ended_in") == "streaming"
    })
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
            outcome(l) == "completed" && field(l, "id") == sent
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
    assert_eq!(shim.count(completion), 0);
    conn.send(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-openstack-request-id: req-glance\r\n\r\n[]",
    )
    .await;
    client.await.unwrap();
    let done = shim.wait_for("completion", completion).await;
    assert_eq!(outcome(&done), "completed");
    assert_eq!(msg(&done), "completed");
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
    wait_for_file(path, &format!("line with {needle:?}"), |text| {
        let line = text.lines().find(|l| l.contains(needle))?;
        Some(
            line.split("listen=")
                .nth(1)
                .map(|s| s.split(' ').next().unwrap().to_owned())
                .unwrap_or_default(),
        )
    })
    .await
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
    let (shim, addr) = spawn_logging_to(&echo.port(), &file).await;
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

/// A shim forwarding to `upstream` with its log in `file`, and the address it listens on, read from
/// the file.
async fn spawn_logging_to(upstream: &str, file: &std::path::Path) -> (Shim, std::net::SocketAddr) {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--log-file",
        file.to_str().unwrap(),
    ];
    let shim = Shim::spawn(&args, &[]);
    let addr = wait_for_file_line(file, "listening").await.parse().unwrap();
    (shim, addr)
}

/// With `--log-file`, the arrival line of a request glance holds is in the file while glance holds
/// it, and its completion line once it ends, with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_in_the_log_file_while_glance_holds_it() {
    let up = RawUpstream::bind().await;
    let dir = tempdir();
    let file = dir.join("shim.log");
    let (_shim, addr) = spawn_logging_to(&up.port(), &file).await;
    let client = tokio::spawn(get(addr, "/v2/images?held"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    // glance holds it (a breakpoint): the arrival line is in the file, the completion line is not.
    let held = wait_for_file(&file, "the held request's arrival line", |text| {
        text.lines()
            .find(|l| l.contains("arrived") && l.contains("path=/v2/images?held"))
            .map(str::to_owned)
    })
    .await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("outcome="), "not completed yet:\n{text}");
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        .await;
    client.await.unwrap();
    let done = wait_for_file(&file, "the completion line", |text| {
        text.lines()
            .find(|l| l.contains("outcome=completed"))
            .map(str::to_owned)
    })
    .await;
    let id = |line: &str| {
        line.split(' ')
            .find_map(|w| w.strip_prefix("id="))
            .map(str::to_owned)
    };
    assert!(id(&held).is_some());
    assert_eq!(id(&done), id(&held), "{held}\n{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_filters_by_level_and_module() {
    let down = Reserved::new(); // a down upstream makes warnings
    let port = down.port_str();
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
        outcome(l) == "upstream_unreachable"
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
    shim.wait_for("completion", |l| outcome(l) == "completed")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_is_relayed_at_once_and_a_pause_after_it_is_reported_as_such() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--stall-after", "300ms"]).await;
    let request = "GET /v2/images/x/file HTTP/1.1\r\nHost: h\r\n\r\n";
    let (mut client, mut conn, _) = forwarded(&shim, &up, request).await;
    // glance sends its head, then stops at a breakpoint before the first body byte.
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        .await;
    let head = client.read_head().await;
    assert_eq!(
        head.status(),
        200,
        "the head reached the client before any body byte"
    );
    let notice = shim
        .wait_for("a stall notice", |l| msg(l).contains("probably paused"))
        .await;
    assert!(
        msg(&notice).contains("has sent nothing more of its response"),
        "{notice}"
    );
    assert_eq!(field(&notice, "phase"), "streaming");
    shim.signal("USR1");
    let table = shim
        .wait_for("the table", |l| msg(l).starts_with("SIGUSR1"))
        .await;
    assert!(msg(&table).contains("waiting for upstream body"), "{table}");
    conn.send("hello").await;
    assert_eq!(client.read_exact(5).await, b"hello");
    let done = shim.wait_for("completion", completion).await;
    assert_eq!(outcome(&done), "completed");
    assert!(done["upstream_headers_ms"].as_f64().unwrap() < done["total_ms"].as_f64().unwrap());
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
    // The client dawdles for well over the threshold (its own pace, what is tested); the upstream is
    // reading, so no notice.
    tokio::time::sleep(Duration::from_millis(800)).await;
    client.write(b"defghij").await;
    assert_eq!(conn.read_exact(7).await, b"defghij");
    // Now glance is the slow one: the watchdog, silent above, does speak. One task logs every
    // notice, in the order it finds them due, and glance's falls due after the dawdle: had the
    // dawdle earned one (phase receiving_body), it would be the first in the log.
    let notice = shim
        .wait_for("a notice for glance's pause", |l| {
            msg(l).contains("probably paused")
        })
        .await;
    assert_eq!(
        field(&notice, "phase"),
        "awaiting_headers",
        "the first notice is for glance's pause, none for the client's dawdle: {}",
        shim.dump()
    );
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
    let done = shim.wait_for("completion", completion).await;
    assert_eq!(done["bytes_in"], 10);
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
    let done = shim.wait_for("the 504's completion", completion).await;
    assert_eq!(
        (outcome(&done), field(&done, "ended_in")),
        ("timed_out", "awaiting_headers")
    );
    assert_eq!(done["status"], 504);

    // After the head has gone to the client, the same rule can no longer change the status: the
    // client's connection is aborted, so the short body cannot look complete.
    let request = "GET /half HTTP/1.1\r\nHost: h\r\n\r\n";
    let (mut client, mut conn, _) = forwarded(&shim, &up, request).await;
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status(), 200);
    let rest = client.read_to_close().await;
    assert_eq!(rest, b"half", "four bytes of ten, then the connection ends");
    let done = shim
        .wait_for("the aborted completion", |l| {
            completion(l) && field(l, "path") == "/half"
        })
        .await;
    assert_eq!(
        (outcome(&done), field(&done, "ended_in")),
        ("timed_out", "streaming")
    );
    assert_eq!(done["bytes_out"], 4);
    drop(conn);
}

// ---------------------------------------------------------------------------------------------
// Upstream down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_quick_json_502_logged_once_and_recovers_by_itself() {
    let down = Reserved::new(); // nothing listens there
    let port = down.port_str();
    let shim = Shim::start(&port, &[]).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(tokio::spawn(get(
            shim.addr,
            if i == 0 { "/first" } else { "/v2/images" },
        )));
    }
    // At once, not after the 10 s a connection attempt may take: the refusal is the answer. The
    // message shows it, not a clock: only a refused connect says "nothing listens" (one that timed
    // out says it "did not accept a connection within 10 s").
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
    shim.wait_for_nth("20 completions", 20, |l| {
        outcome(l) == "upstream_unreachable"
    })
    .await;
    assert_eq!(
        shim.count(|l| msg(l).contains("nothing listens on the upstream")),
        1,
        "{}",
        shim.dump()
    );

    // glance comes back: the next request just works.
    let echo = Echo::start_on(down.listen());
    let (head, _) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 200);
    shim.wait_for("back", |l| msg(l).contains("accepts connections again"))
        .await;
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_upstream_holds_a_request_until_glance_is_back() {
    let down = Reserved::new();
    let port = down.port_str();
    let shim = Shim::start(&port, &["--wait-upstream", "20s"]).await;
    let client = tokio::spawn(roundtrip(
        shim.addr,
        "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    ));
    shim.wait_for("outage notice", |l| msg(l).contains("Holding requests"))
        .await;
    assert!(!client.is_finished());
    let echo = Echo::start_on(down.listen());
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
    let down = Reserved::new();
    let port = down.port_str();
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
        shim.count(|l| outcome(l) == "completed" && field(l, "path") == "/in-flight"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breakpoint_does_not_hold_shutdown_past_drain() {
    let up = RawUpstream::bind().await;
    let mut shim = Shim::start(&up.port(), &["--drain", "300ms"]).await;
    let client = tokio::spawn(get(shim.addr, "/held"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    // And one whose head was relayed before the breakpoint caught the rest.
    let request = "GET /streaming HTTP/1.1\r\nHost: h\r\n\r\n";
    let (mut streaming, mut conn2, _) = forwarded(&shim, &up, request).await;
    conn2
        .send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        .await;
    assert_eq!(streaming.read_head().await.status(), 200);
    let started = Instant::now();
    shim.signal("INT");
    assert_eq!(shim.exit_status().await.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let last = shim
        .wait_for("drain report", |l| msg(l).contains("drain time"))
        .await;
    assert!(
        msg(&last).contains("GET /held") && msg(&last).contains("GET /streaming"),
        "the cut-off requests are named: {last}"
    );
    // Each still gets its completion line, which says it was cut off, and how far it had come.
    for (path, phase) in [("/held", "awaiting_headers"), ("/streaming", "streaming")] {
        let done = shim
            .wait_for("a cut-off completion", |l| {
                completion(l) && field(l, "path") == path
            })
            .await;
        assert_eq!(
            (outcome(&done), field(&done, "ended_in")),
            ("drained", phase)
        );
    }
    let (head, body) = client.await.unwrap();
    assert_eq!(head.status(), 503, "cut off before glance answered");
    assert!(String::from_utf8_lossy(&body).contains("--drain"));
    assert_eq!(
        streaming.read_to_close().await,
        b"half",
        "aborted, not completed"
    );
    drop((conn, conn2));
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
    shim.signal("INT");
    assert_eq!(
        shim.exit_status().await.code(),
        Some(130),
        "not the 60 s drain"
    );
    let done = shim
        .wait_for("the held request's completion", completion)
        .await;
    assert_eq!(outcome(&done), "drained");
}

// ---------------------------------------------------------------------------------------------
// The command line

#[tokio::test]
async fn a_bad_flag_is_one_line_and_exit_2() {
    type Env<'a> = &'a [(&'a str, &'a str)];
    let bad: [(&[&str], Env); 6] = [
        (&["--listen", "nope", "--upstream", "60999"], &[]),
        (&["--listen", "9292", "--upstream", "9292"], &[]),
        (&["--listen", "9292"], &[]),
        (
            &[
                "--listen",
                "9292",
                "--upstream",
                "60999",
                "--stall-after",
                "soon",
            ],
            &[],
        ),
        (
            &[
                "--listen",
                "9292",
                "--upstream",
                "60999",
                "--log-file",
                "/nonexistent/dir/shim.log",
            ],
            &[],
        ),
        // A bad value from the environment names its flag too.
        (
            &["--listen", "9292", "--upstream", "60999"],
            &[("GLANCE_SHIM_STALL_AFTER", "later")],
        ),
    ];
    for (args, env) in bad {
        let out = shim_command()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("glance-shim: "), "{err}");
        if !env.is_empty() {
            assert!(
                err.contains("--stall-after") && err.contains("later"),
                "{err}"
            );
        }
    }
    let out = shim_command().arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--listen 9292 --upstream 60999")
            && help.contains("--listen 60999 --upstream 9292")
    );
}

/// One row of the flags table (docs/flags.md): the flag with its value, the variable, the default.
#[derive(Debug, PartialEq, Eq)]
struct FlagRow {
    flag: String,
    variable: String,
    default: String,
}

#[test]
fn the_flags_table_and_help_agree_row_for_row() {
    use clap::CommandFactory;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/flags.md")).unwrap();
    let documented: Vec<FlagRow> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").map(|c| c.trim_matches(['|', ' '])).collect();
            FlagRow {
                flag: cells[0].to_owned(),
                variable: cells[1].to_owned(),
                default: cells[2].to_owned(),
            }
        })
        .collect();
    // What --help is made from.
    let command = glance_shim::cli::Args::command();
    let mut expected = Vec::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let value = if !takes_value {
            String::new()
        } else if !arg.get_possible_values().is_empty() {
            let names: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            format!(" {}", names.join("\\|"))
        } else {
            // A `|` in a value's name is escaped in a Markdown table.
            let name = arg.get_value_names().unwrap()[0].replace('|', "\\|");
            if arg.get_num_args().is_some_and(|n| n.min_values() == 0) {
                format!(" [{name}]")
            } else {
                format!(" {name}")
            }
        };
        let mut default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if arg.get_num_args().is_some_and(|n| n.min_values() == 0) {
            // A flag whose value may be left out: README gives the value it then takes.
            let bare = format!("--{long}");
            let matches = glance_shim::cli::Args::command()
                .mut_args(|a| a.env(None).required(false))
                .try_get_matches_from(["glance-shim", bare.as_str()])
                .unwrap();
            default.extend(
                matches
                    .get_raw(arg.get_id().as_str())
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string_lossy().into_owned()),
            );
        }
        expected.push((
            FlagRow {
                flag: format!("`--{long}{value}`"),
                variable: format!("`{}`", arg.get_env().unwrap().to_string_lossy()),
                default: String::new(),
            },
            default.first().cloned().filter(|_| takes_value),
        ));
    }
    assert!(expected.len() >= 20, "{expected:?}");
    for (row, default) in &expected {
        let found = documented
            .iter()
            .find(|d| d.flag == row.flag)
            .unwrap_or_else(|| panic!("{} is not in README's flags table as such", row.flag));
        assert_eq!(found.variable, row.variable, "{}", row.flag);
        match default {
            Some(value) => assert_eq!(found.default, format!("`{value}`"), "{}", row.flag),
            None => assert!(
                !found.default.starts_with('`'),
                "{}: README gives a default value, --help none: {}",
                row.flag,
                found.default
            ),
        }
    }
    for d in &documented {
        assert!(
            expected.iter().any(|(row, _)| row.flag == d.flag),
            "README's row {} is not a flag of glance-shim",
            d.flag
        );
    }
    assert_eq!(documented.len(), expected.len(), "one row per flag");
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
