//! Bad input, faults and load: limits with clear answers, no request smuggling, no lost bytes, no
//! leaked connections. Requests are raw bytes on sockets, so what is tested is what goes over the wire.

mod util;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::*;

fn status_of(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Sends `bytes` on a new connection and returns everything that comes back until the shim closes.
async fn send_raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut conn = Conn::connect(addr).await;
    conn.write(bytes).await;
    conn.read_to_close().await
}

// ---------------------------------------------------------------------------------------------
// Limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_targets_get_431_and_414() {
    let echo = Echo::start().await;
    let shim = Shim::start(
        &echo.port(),
        &[
            "--max-header-bytes",
            "8192",
            "--max-headers",
            "20",
            "--max-uri-bytes",
            "1000",
        ],
    )
    .await;
    let big_field = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    assert_eq!(
        status_of(&send_raw(shim.addr, big_field.as_bytes()).await),
        Some(431)
    );
    let many: String = (0..25).map(|i| format!("X-F{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n");
    assert_eq!(
        status_of(&send_raw(shim.addr, many.as_bytes()).await),
        Some(431)
    );
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        "x".repeat(1200)
    );
    let answer = send_raw(shim.addr, long.as_bytes()).await;
    assert_eq!(status_of(&answer), Some(414));
    assert!(String::from_utf8_lossy(&answer).contains("--max-uri-bytes"));
    // Right at the limits, everything goes through.
    let fits: String = (0..17).map(|i| format!("X-F{i}: v\r\n")).collect();
    let ok = format!(
        "GET /{} HTTP/1.1\r\nHost: h\r\n{fits}Connection: close\r\n\r\n",
        "x".repeat(990)
    );
    assert_eq!(
        status_of(&send_raw(shim.addr, ok.as_bytes()).await),
        Some(200)
    );
    assert_eq!(echo.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_as_large_as_max_header_bytes_allows_goes_through() {
    // The shim caps hyper's read buffer below hyper's default (upstream::MAX_BUFFER); a raised
    // --max-header-bytes still lets a head past that cap through, byte for byte. The head goes in
    // pieces, so that the shim reads, and tries to parse, a partial head larger than the cap.
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &["--max-header-bytes", "1048576"]).await;
    let value = "a".repeat(300_000);
    let head = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {value}\r\nConnection: close\r\n\r\n");
    let mut conn = Conn::connect(shim.addr).await;
    for piece in head.as_bytes().chunks(32 * 1024) {
        conn.write(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status_of(&conn.read_to_close().await), Some(200));
    let seen = echo.requests();
    assert_eq!(seen.len(), 1);
    let big = seen[0]
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("x-big"));
    assert_eq!(big.map(|(_, v)| v.len()), Some(value.len()));
}

/// How long after `since` the shim closed `conn`.
async fn closed_after(conn: &mut Conn, since: Instant) -> Duration {
    assert!(conn.closed().await, "the shim answered instead of closing");
    since.elapsed()
}

/// The client address the shim sees for `conn`, as its log writes it.
fn client_of(conn: &Conn) -> String {
    conn.stream.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_and_an_idle_keep_alive_connection_are_closed() {
    // Which timeout closed a connection shows in the shim's log, and in a lower bound (a timer never
    // fires early); no upper bound, which a loaded machine could overrun. The two timeouts far apart,
    // so that each lower bound tells them apart too.
    const HEAD: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(6);
    let echo = Echo::start().await;
    let shim = Shim::start_with_env(
        &echo.port(),
        &["--header-timeout", "1s", "--idle-timeout", "6s"],
        // A close for --idle-timeout is a debug line naming the client.
        &[("RUST_LOG", "info,glance_shim::server=debug")],
    )
    .await;
    let addr = shim.addr;
    let idle_close = |client: &str| {
        let client = client.to_owned();
        move |l: &serde_json::Value| {
            msg(l).contains("closed a connection: it was idle") && field(l, "client") == client
        }
    };
    // Trickles a byte every 100 ms, never finishing its head: closed by the head timeout.
    let slowloris = tokio::spawn(async move {
        let mut slow = Conn::connect(addr).await;
        let client = client_of(&slow);
        let started = Instant::now();
        slow.write(b"GET / HTTP/1.1\r\n").await;
        loop {
            assert!(
                started.elapsed() < PATIENCE,
                "the slow client was still connected after {PATIENCE:?}"
            );
            if slow.stream.write_all(b"X").await.is_err() {
                break;
            }
            // The client's own pace: this is what a slowloris does, not a wait for the shim.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.stream.try_read(&mut [0u8; 1]).is_ok_and(|n| n == 0) {
                break;
            }
        }
        (started.elapsed(), client)
    });
    // Connected and silent: idle, so closed after --idle-timeout, not --header-timeout.
    // Each clock starts before the step that lets the shim start its own timer, so that the lower
    // bounds hold however late this task is scheduled after that step.
    let silent = tokio::spawn(async move {
        let connecting = Instant::now();
        let mut silent = Conn::connect(addr).await;
        let client = client_of(&silent);
        (closed_after(&mut silent, connecting).await, client)
    });
    // Idle after a request, then the next head starts but never ends: timed from its first byte.
    let late = tokio::spawn(async move {
        let mut late = Conn::connect(addr).await;
        let client = client_of(&late);
        late.send("GET /a HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let head = late.read_head().await;
        late.read_body(&head).await;
        // The client's own pause before its next head, what is tested: timed from the end of the
        // response instead, the head would be cut 200 ms after its first byte; by the idle timeout,
        // over 5 s after it, and the log would say so.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let first_byte = Instant::now();
        late.send("GET /b HTTP/1.1\r\n").await;
        (closed_after(&mut late, first_byte).await, client)
    });
    // An idle keep-alive connection after one request.
    let idle = tokio::spawn(async move {
        let mut idle = Conn::connect(addr).await;
        let client = client_of(&idle);
        // The shim's idle timer starts when it has written the response, which can be before this
        // task has read it: the clock starts at the request.
        let asked = Instant::now();
        idle.send("GET /a HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let head = idle.read_head().await;
        idle.read_body(&head).await;
        (closed_after(&mut idle, asked).await, client)
    });
    let (slowloris, slow_client) = slowloris.await.unwrap();
    assert!(slowloris >= HEAD, "the slow client was held {slowloris:?}");
    let (silent, silent_client) = silent.await.unwrap();
    assert!(
        silent >= IDLE,
        "a silent connection was closed after {silent:?}"
    );
    let (late, late_client) = late.await.unwrap();
    assert!(
        late >= Duration::from_millis(700),
        "a late, incomplete head was closed {late:?} after its first byte"
    );
    let (idle, idle_client) = idle.await.unwrap();
    assert!(
        idle >= IDLE,
        "an idle keep-alive connection was closed after {idle:?}"
    );
    shim.wait_for(
        "the silent connection's idle close",
        idle_close(&silent_client),
    )
    .await;
    shim.wait_for(
        "the keep-alive connection's idle close",
        idle_close(&idle_client),
    )
    .await;
    // The shim logs a close in the same step as it closes the connection, so the two slow heads'
    // lines (closed after 1 s and about 2 s) were written seconds before the idle ones above (6 s):
    // a margin that no scheduling noise covers. Neither was closed as idle, nor by an error.
    for (what, client) in [
        ("the slow client", &slow_client),
        ("the late head", &late_client),
    ] {
        let about: Vec<_> = shim
            .lines()
            .into_iter()
            .filter(|l| field(l, "client") == client.as_str())
            .filter(|l| msg(l).contains("it was idle") || msg(l).contains("ended with an error"))
            .collect();
        assert!(about.is_empty(), "{what} was closed otherwise: {about:?}");
    }
    // Repeats within 10 s are held back: the first slow head closed is named.
    let warning = shim
        .wait_for("the slow head's warning", |l| {
            msg(l).contains("did not arrive within --header-timeout")
        })
        .await;
    assert!(
        [&slow_client, &late_client].contains(&&field(&warning, "client").to_owned()),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_longer_than_every_timeout_is_not_cut_off() {
    // glance at a breakpoint: no byte moves for longer than either timeout, before the response head
    // and again in the middle of its body.
    let upstream = RawUpstream::bind().await;
    let shim = Shim::start(
        &upstream.port(),
        &["--header-timeout", "1s", "--idle-timeout", "1s"],
    )
    .await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("GET /v2/images HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let mut glance = upstream.accept().await;
    glance.read_head().await;
    // glance's pause, longer than both timeouts: its length is what is tested.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    glance
        .send("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        .await;
    let head = client.read_head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(client.read_exact(5).await, b"hello");
    // And again in the middle of the body.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    glance.send("world").await;
    assert_eq!(client.read_exact(5).await, b"world");
    // The connection is still good for the next request.
    client
        .send("GET /v2/images HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    glance.read_head().await;
    glance.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(client.read_head().await.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_ones_get_503_and_open_ones_keep_working() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &["--max-connections", "3"]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = Conn::connect(shim.addr).await;
        c.send("GET /held HTTP/1.1\r\nHost: h\r\n\r\n").await;
        let head = c.read_head().await;
        c.read_body(&head).await;
        open.push(c);
    }
    let refused = send_raw(shim.addr, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").await;
    assert_eq!(
        status_of(&refused),
        Some(503),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    assert!(String::from_utf8_lossy(&refused).contains("--max-connections"));
    for c in &mut open {
        c.send("GET /again HTTP/1.1\r\nHost: h\r\n\r\n").await;
        assert_eq!(
            c.read_head().await.status(),
            200,
            "an open connection keeps working"
        );
    }
    drop(open);
    // Slots come back when connections close. The shim frees a slot when it reads the close, and
    // nothing tells the client when that happened: ask again until a new connection is served.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = send_raw(
            shim.addr,
            b"GET /y HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        )
        .await;
        if status_of(&answer) == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a new connection is served once the others closed: still refused {PATIENCE:?} after \
             they closed, with {}",
            String::from_utf8_lossy(&answer)
        );
        // The pace of the retries, not a wait for a signal: there is none to wait for.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shim.wait_for("the refusal warning", |l| {
        msg(l).contains("--max-connections (3) reached")
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Smuggling

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_chunked_wins_and_the_connection_closes() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("POST /v2/images HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert!(!head.has("content-length"), "CL is dropped: {head:?}");
    assert_eq!(head.get("transfer-encoding"), Some("chunked"));
    assert_eq!(conn.read_chunked().await, b"hello");
    conn.send("HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        .await;
    let response = client.read_to_close().await;
    assert_eq!(status_of(&response), Some(201));
    assert_eq!(
        response.windows(5).filter(|w| w == b"HTTP/").count(),
        1,
        "nothing after the closing response"
    );
    // Had the smuggled request been forwarded, it would have gone before the client's connection
    // closed, on the idle upstream connection: the next request there must be this marker.
    let marker = tokio::spawn(get(shim.addr, "/marker"));
    assert_eq!(
        conn.read_head().await.start,
        "GET /marker HTTP/1.1",
        "the trailing request is not forwarded"
    );
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(marker.await.unwrap().0.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_and_malformed_fields_get_400() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Bad\x01Name: v\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n",
    ] {
        let answer = send_raw(shim.addr, bad).await;
        assert_eq!(
            status_of(&answer),
            Some(400),
            "{:?} -> {:?}",
            String::from_utf8_lossy(bad),
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        echo.requests().is_empty(),
        "none of them reached the upstream: {:?}",
        echo.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_response_with_broken_framing_is_a_502_and_its_connection_is_not_reused() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    for (n, broken) in [
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let mut client = Conn::connect(shim.addr).await;
        client
            .send("GET /v2/images HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let mut conn = up.accept().await;
        conn.read_head().await;
        conn.send(broken).await;
        let head = client.read_head().await;
        if broken.contains("chunked") {
            // Broken after a good head: the head was relayed as it came, and the body is aborted,
            // never ended as if it were complete.
            assert_eq!(head.status(), 200, "{broken:?}");
            let rest = client.read_to_close().await;
            assert!(!rest.ends_with(b"0\r\n\r\n"), "{rest:?}");
        } else {
            assert_eq!(head.status(), 502, "{broken:?}");
            let body = client.read_body(&head).await;
            assert!(
                String::from_utf8_lossy(&body).contains("not valid HTTP/1.1"),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        let done = shim
            .wait_for_nth("the completion", n + 1, |l| {
                completion(l) && field(l, "path") == "/v2/images"
            })
            .await;
        assert_eq!(outcome(&done), "upstream_invalid", "{done}");
        // The next request must not go to the broken connection.
        let next = tokio::spawn(get(shim.addr, "/next"));
        let mut fresh = up.accept().await;
        assert_eq!(fresh.read_head().await.start, "GET /next HTTP/1.1");
        fresh
            .send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await;
        assert_eq!(next.await.unwrap().0.status(), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_upload_is_a_502_when_nothing_was_answered() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    client.write_chunk(&[7u8; 65536]).await;
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.read_chunk().await;
    drop(conn); // glance dies with the upload half read
    let head = client.read_head().await;
    assert_eq!(head.status(), 502);
    let body = client.read_body(&head).await;
    assert!(
        String::from_utf8_lossy(&body).contains("closed the connection"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_download_closes_the_upstream_connection() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("GET /v2/images/x/file HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.send(&format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
        1u64 << 30
    ))
    .await;
    let block = vec![1u8; 1 << 20];
    for _ in 0..4 {
        conn.write(&block).await;
    }
    client.read_head().await;
    client.read_exact(1 << 20).await;
    drop(client);
    // Keep streaming as glance would: the shim must close the connection instead of reading the
    // rest of the gigabyte. What the socket buffers hold is a few MiB at most.
    let mut written_after = 0u64;
    while written_after < 1 << 30 {
        let wrote = tokio::time::timeout(PATIENCE, conn.stream.write_all(&block))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the shim neither read nor closed the upstream connection within {PATIENCE:?} \
                     after the client left"
                )
            });
        if wrote.is_err() {
            break;
        }
        written_after += block.len() as u64;
    }
    assert!(
        written_after < 64 << 20,
        "the upstream could still write {} MiB after the client left",
        written_after >> 20
    );
    let line = shim
        .wait_for("the aborted line", |l| outcome(l) == "client_gone")
        .await;
    assert_eq!(field(&line, "ended_in"), "streaming");
    assert!(line["bytes_out"].as_u64().unwrap() >= 1 << 20);
    shim.signal("USR1");
    shim.wait_for("an empty table", |l| {
        msg(l).starts_with("SIGUSR1: 0 request(s) in flight")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_upstream_with_64_requests_waiting_answers_them_all_after_it_resumes() {
    paused_upstream_with_64_requests(Duration::from_secs(2)).await;
}

/// The same for two minutes (the long tier: `cargo test -- --ignored`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: a 120 s pause"]
async fn a_paused_upstream_with_64_requests_waiting_answers_them_all_after_120_s() {
    paused_upstream_with_64_requests(Duration::from_secs(120)).await;
}

async fn paused_upstream_with_64_requests(pause: Duration) {
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--stall-after", "1s"]).await;
    let mut clients = Vec::new();
    for i in 0..64 {
        let addr = shim.addr;
        clients.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "PUT /v2/images/{i}/file HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nConnection: close\r\n\r\nimage"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            // Waits through the whole pause: longer than the harness's usual patience.
            let mut answer = Vec::new();
            tokio::time::timeout(pause + PATIENCE, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
            answer
        }));
    }
    let mut servers = Vec::new();
    for _ in 0..64 {
        let mut conn = up.accept().await;
        let mut gate = gate.clone();
        servers.push(tokio::spawn(async move {
            let head = conn.read_head().await;
            let body = conn.read_exact(5).await;
            gate.wait_for(|open| *open).await.unwrap(); // paused, as at a breakpoint
            let path = head.start.split(' ').nth(1).unwrap().to_owned();
            conn.send(&format!(
                "HTTP/1.1 204 No Content\r\nX-Path: {path}\r\n\r\n"
            ))
            .await;
            body
        }));
    }
    shim.wait_for_nth("stall notices for all 64", 64, |l| {
        msg(l).contains("probably paused")
    })
    .await;
    tokio::time::sleep(pause).await; // the length of the pause is what is tested
    open_gate.send(true).unwrap();
    for (i, c) in clients.into_iter().enumerate() {
        let answer = String::from_utf8(c.await.unwrap()).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 204 No Content\r\n"),
            "request {i}: {answer}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("x-path: /v2/images/{i}/file\r\n")),
            "request {i}: {answer}"
        );
    }
    for s in servers {
        assert_eq!(s.await.unwrap(), b"image");
    }
}

/// glibc keeps freed memory in the process: without the shim's give-back (`server::give_back_memory`),
/// what 64 connections at once left would stay resident after they closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_a_burst_of_connections_left_is_given_back() {
    let echo = Echo::start().await;
    let shim = Shim::start_with_env(
        &echo.port(),
        &[],
        &[("RUST_LOG", "info,glance_shim::server=debug")],
    )
    .await;
    let mut conns = Vec::new();
    for _ in 0..64 {
        conns.push(Conn::connect(shim.addr).await);
    }
    // Every connection busy at once, each with a 64 KiB response in flight.
    for conn in &mut conns {
        conn.send("GET /download?bytes=65536 HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
    }
    for conn in &mut conns {
        let head = conn.read_head().await;
        conn.read_body(&head).await;
    }
    drop(conns);
    let line = shim
        .wait_for("the give-back line", |l| {
            msg(l).starts_with("gave back the memory")
        })
        .await;
    assert!(line["connections"].as_u64().unwrap() >= 64, "{line}");
    let (rss, peak) = (shim.rss(), shim.peak_rss());
    assert!(
        rss + (1 << 20) <= peak,
        "RSS {rss} after the give-back, {peak} at the peak: less than 1 MiB given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_its_connections_does_not_fail_the_next_request() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    // uWSGI: every answer says Connection: close, then closes.
    let first = tokio::spawn(get(shim.addr, "/one"));
    let mut conn = up.accept().await;
    conn.read_head().await;
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .await;
    drop(conn);
    assert_eq!(first.await.unwrap().0.status(), 200);
    let second = tokio::spawn(get(shim.addr, "/two"));
    let mut conn = up.accept().await;
    assert_eq!(conn.read_head().await.start, "GET /two HTTP/1.1");
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await;
    assert_eq!(second.await.unwrap().0.status(), 200);
    // An idle keep-alive connection the upstream closes without a word (eventlet's idle timeout).
    drop(conn);
    // The shim learns of the close when its connection task reads the EOF; a retry covers the race.
    let third = tokio::spawn(get(shim.addr, "/three"));
    let mut conn = up.accept().await;
    assert_eq!(conn.read_head().await.start, "GET /three HTTP/1.1");
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await;
    assert_eq!(third.await.unwrap().0.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Security

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listen_address_is_spelled_out_and_warned_about() {
    let echo = Echo::start().await;
    let mut shim = Shim::spawn(
        &[
            "--listen",
            "0.0.0.0:0",
            "--upstream",
            &echo.port(),
            "--log-format",
            "json",
        ],
        &[],
    );
    let line = shim
        .wait_for("the warning", |l| msg(l).contains("non-loopback"))
        .await;
    assert_eq!(field(&line, "level"), "WARN");
    let listening = shim.wait_for("listening", |l| msg(l) == "listening").await;
    shim.addr = field(&listening, "listen")
        .replace("0.0.0.0", "127.0.0.1")
        .parse()
        .unwrap();
    assert_eq!(get(shim.addr, "/").await.0.status(), 200);
    // A bare port is loopback.
    let local = Shim::start(&echo.port(), &[]).await;
    assert!(local.addr.ip().is_loopback());
    assert_eq!(local.count(|l| msg(l).contains("non-loopback")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_headers_and_bodies_reach_no_log_at_any_level_or_format() {
    let echo = Echo::start().await;
    let dir = tempdir("secrets");
    let secrets = [
        "gAAAAA-token-SECRET-a1",
        "subject-SECRET-b2",
        "service-SECRET-c3",
        "Bearer bearer-SECRET-d4",
        "Basic cHJveHk6U0VDUkVULWU1",
        "sid=cookie-SECRET-f6",
        "pass-SECRET-g7",
        "cred-SECRET-h8",
    ];
    let body = format!(
        r#"{{"auth": {{"identity": {{"methods": ["password"], "password": {{"user": {{"name": "admin", "password": "{}"}}}}}}, "token": {{"id": "{}"}}}}, "secret": "{}", "credential": "{}"}}"#,
        secrets[6], secrets[0], secrets[2], secrets[7]
    );
    let request = format!(
        "POST /v3/auth/tokens HTTP/1.1\r\nHost: h\r\nX-Auth-Token: {}\r\nX-Subject-Token: {}\r\nX-Service-Token: {}\r\n\
         Authorization: {}\r\nProxy-Authorization: {}\r\nCookie: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        secrets[0],
        secrets[1],
        secrets[2],
        secrets[3],
        secrets[4],
        secrets[5],
        body.len()
    );
    let mut logs = Vec::new();
    for (format, level) in [
        ("json", "trace"),
        ("text", "trace"),
        ("json", "info"),
        ("text", "debug"),
    ] {
        let file = dir.join(format!("{format}-{level}.log"));
        let shim = Shim::spawn(
            &[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                &echo.port(),
                "--log-headers",
                "--log-format",
                format,
                "--log-file",
                file.to_str().unwrap(),
            ],
            &[("RUST_LOG", level)],
        );
        let addr = wait_for_file(&file, "listening line with an address", |text| {
            let line = text.lines().find(|l| l.contains("listening"))?;
            let at = line.find("127.0.0.1:")?;
            let end = line[at..].find(['"', ' ']).map_or(line.len(), |e| at + e);
            line[at..end].parse::<std::net::SocketAddr>().ok()
        })
        .await;
        roundtrip(addr, &request).await;
        wait_for_file(&file, "completion line", |text| {
            text.contains("completed").then_some(())
        })
        .await;
        drop(shim);
        logs.push((file.clone(), std::fs::read_to_string(&file).unwrap()));
    }
    for (file, text) in &logs {
        assert!(
            text.contains("<masked>"),
            "{}: the headers were logged, masked",
            file.display()
        );
        for s in secrets {
            let needle = s.rsplit(' ').next().unwrap();
            assert!(
                !text.contains(needle),
                "{} leaked into {}",
                needle,
                file.display()
            );
        }
    }
}
