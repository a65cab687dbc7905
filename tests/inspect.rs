//! The inspector's API, event stream, guards and memory bounds, against the real binary.

mod util;

use std::net::SocketAddr;

use serde_json::Value;
use util::*;

const TOKEN: &str = "gAAAAABsecret-token-value";

/// A JSON request with a token and a password, as a client would send it.
fn patch(body: &str) -> String {
    format!(
        "PATCH /v2/images/abc HTTP/1.1\r\nHost: controller:9292\r\nX-Auth-Token: {TOKEN}\r\n\
         Content-Type: application/openstack-images-v2.1-json-patch\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A response glance might give, naming its own request id.
fn glance_answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-openstack-request-id: req-glance-own\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads Server-Sent Events from a raw connection.
struct EventReader {
    conn: Conn,
    text: String,
}

#[derive(Debug)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

impl EventReader {
    async fn open(addr: SocketAddr, path: &str, extra: &str) -> EventReader {
        Box::pin(EventReader::open_inner(addr, path, extra)).await
    }

    async fn open_inner(addr: SocketAddr, path: &str, extra: &str) -> EventReader {
        let mut conn = Conn::connect(addr).await;
        conn.send(&format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"
        ))
        .await;
        let head = conn.read_head().await;
        assert_eq!(head.status(), 200);
        assert_eq!(head.get("content-type"), Some("text/event-stream"));
        EventReader {
            conn,
            text: String::new(),
        }
    }

    /// The next event. (Boxed, as `Shim::api` is, for the test's stack.)
    fn next(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Sse> + '_>> {
        Box::pin(self.next_inner())
    }

    async fn next_inner(&mut self) -> Sse {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut sse = Sse {
                    event: String::new(),
                    id: None,
                    data: Value::Null,
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        sse.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        sse.id = Some(v.parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        sse.data = serde_json::from_str(v).unwrap();
                    }
                }
                if sse.event.is_empty() {
                    continue; // retry: and comments
                }
                return sse;
            }
            let chunk = tokio::time::timeout(PATIENCE, self.conn.read_chunk())
                .await
                .expect("no event came")
                .expect("the event stream ended");
            self.text.push_str(&String::from_utf8(chunk).unwrap());
        }
    }

    /// The next event about request `serial` (or of a kind without one).
    async fn next_for(&mut self, serial: u64) -> Sse {
        // Ticks come for as long as a request is in flight: the wait needs its own end.
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let e = self.next().await;
            if e.data["serial"] == serial {
                return e;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no event about request {serial} within {PATIENCE:?}; the last one: {e:?}"
            );
        }
    }
}

async fn recent(shim: &Shim) -> Vec<Value> {
    shim.api("/api/requests").await["recent"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_request_whole_with_its_secrets_masked_and_glances_id() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let body = r#"[{"op":"add","path":"/k","value":"v"},{"op":"add","path":"/admin_password","value":"hunter2"}]"#;
    let (mut client, mut conn, at_glance) = forwarded(&shim, &up, &patch(body)).await;
    conn.read_exact(body.len()).await;
    let answer = r#"{"id":"abc","name":"cirros","token":"t0ken"}"#;
    conn.send(&glance_answer(answer)).await;
    let head = client.read_head().await;
    assert_eq!(head.status(), 200);
    client.read_body(&head).await;

    let done = shim.wait_for("the completion line", completion).await;
    let recent = recent(&shim).await;
    assert_eq!(recent.len(), 1);
    let r = &recent[0];
    assert_eq!(r["id"], done["id"]);
    assert_eq!(r["method"], "PATCH");
    assert_eq!(r["target"], "/v2/images/abc");
    assert_eq!(r["status"], 200);
    assert_eq!(r["outcome"], "completed");
    assert_eq!(r["upstream_id"], "req-glance-own");
    assert_eq!(r["bytes_in"], body.len());
    assert_eq!(r["bytes_out"], answer.len());
    assert_eq!(r["in_flight"], false);
    assert_eq!(r["host"], "controller:9292");
    for t in [
        "request_body_done_ms",
        "sent_upstream_ms",
        "upstream_headers_ms",
        "done_ms",
    ] {
        assert!(r["timings"][t].as_f64().is_some(), "{t}: {r}");
    }

    // One request whole, by serial and by id: the same record.
    let serial = r["serial"].as_u64().unwrap();
    let (head, raw) = get(shim.inspector.unwrap(), &format!("/api/requests/{serial}")).await;
    assert_eq!(head.status(), 200);
    let text = String::from_utf8(raw).unwrap();
    for secret in [TOKEN, "hunter2", "t0ken"] {
        assert!(!text.contains(secret), "{secret} was served: {text}");
    }
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        shim.api(&format!("/api/requests/{}", r["id"].as_str().unwrap()))
            .await["serial"],
        serial
    );
    let headers = d["request"]["headers"].as_array().unwrap();
    // Exactly the fields glance got, in order, the token masked.
    let shown: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_owned(),
                h[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let got: Vec<(String, String)> = at_glance
        .fields
        .iter()
        .map(|(k, v)| {
            let k = k.to_ascii_lowercase();
            let v = if k == "x-auth-token" {
                "<masked>".to_owned()
            } else {
                v.clone()
            };
            (k, v)
        })
        .collect();
    assert_eq!(shown, got);
    assert!(
        shown
            .iter()
            .any(|(k, v)| k == "via" && v == "1.1 glance-shim")
    );
    let token = headers.iter().find(|h| h[0] == "x-auth-token").unwrap();
    assert_eq!(token[1], "<masked>");
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "x-openstack-request-id" && h[1] == r["id"])
    );
    let req_body = &d["request"]["body"];
    assert_eq!(req_body["complete"], true);
    assert_eq!(req_body["json"][0]["value"], "v");
    assert_eq!(
        req_body["json"][1]["value"], "<masked>",
        "a JSON-patch value whose path names a password"
    );
    let resp = &d["response"];
    assert_eq!(resp["body"]["json"]["name"], "cirros");
    assert_eq!(resp["body"]["json"]["token"], "<masked>");
    assert!(
        resp["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-openstack-request-id" && h[1] == "req-glance-own")
    );
}

#[tokio::test]
async fn the_events_of_one_request_come_in_order_and_a_reconnect_misses_nothing() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--stall-after", "200ms"]).await;
    let inspector = shim.inspector.unwrap();
    let seq = shim.api("/api/requests").await["seq"].as_u64().unwrap();
    let mut events = EventReader::open(inspector, &format!("/api/events?since={seq}"), "").await;
    let kept = events.next().await;
    assert_eq!(kept.event, "kept");
    assert_eq!(kept.data["serials"], serde_json::json!([]));

    // glance holds the request, as at a breakpoint.
    let (mut client, mut conn, _) =
        forwarded(&shim, &up, "GET /v2/images HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let arrived = events.next().await;
    assert_eq!(arrived.event, "arrived");
    assert_eq!(arrived.data["in_flight"], true);
    assert_eq!(arrived.data["phase"], "awaiting_headers");
    let serial = arrived.data["serial"].as_u64().unwrap();
    // While it is held, the tick shows it in flight, and stalled once --stall-after has passed.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no tick showed the held request stalled within {PATIENCE:?}"
        );
        let tick = events.next().await;
        assert_eq!(tick.event, "inflight", "{tick:?}");
        assert!(tick.id.is_none(), "ticks do not move Last-Event-ID");
        let r = &tick.data["requests"][0];
        assert_eq!(r["serial"], serial);
        if r["stalled"] == true {
            assert!(r["idle_ms"].as_f64().unwrap() >= 200.0, "{r}");
            break;
        }
    }
    conn.send(&glance_answer("{}")).await;
    let headers = events.next_for(serial).await;
    assert_eq!(headers.event, "headers");
    let head = client.read_head().await;
    client.read_body(&head).await;
    let done = events.next_for(serial).await;
    assert_eq!(done.event, "done");
    assert_eq!(done.data["in_flight"], false);
    assert_eq!(done.data["status"], 200);
    assert_eq!(done.data["outcome"], "completed");
    let ids = [arrived.id.unwrap(), headers.id.unwrap(), done.id.unwrap()];
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids rise: {ids:?}");

    // A reader that reconnects with the id it saw last is sent what changed since.
    let mut again = EventReader::open(
        inspector,
        "/api/events",
        &format!("Last-Event-ID: {}\r\n", ids[0]),
    )
    .await;
    let kept = again.next().await;
    assert_eq!(kept.event, "kept");
    assert_eq!(kept.data["serials"], serde_json::json!([serial]));
    let update = again.next().await;
    assert_eq!(update.event, "update");
    assert_eq!(update.id, Some(ids[2]));
    assert_eq!(update.data["status"], 200);
    // Reconnecting with the latest id brings nothing old back.
    let mut current = EventReader::open(
        inspector,
        "/api/events",
        &format!("Last-Event-ID: {}\r\n", ids[2]),
    )
    .await;
    assert_eq!(current.next().await.event, "kept");
    // (glance's connection is kept alive and used again.)
    let mut client = Conn::connect(shim.addr).await;
    client
        .send("GET /v2/schemas/image HTTP/1.1\r\nHost: h\r\n\r\n")
        .await;
    conn.read_head().await;
    let next = current.next().await;
    assert_eq!(next.event, "arrived", "the next thing is new: {next:?}");
    assert_eq!(next.data["target"], "/v2/schemas/image");
    conn.send(&glance_answer("{}")).await;
    client.read_head().await;
}

#[tokio::test]
async fn only_localhost_and_its_own_address_are_answered_and_nothing_is_written() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let addr = shim.inspector.unwrap();
    let ask = |host: String, extra: String, method: &'static str| async move {
        roundtrip(
            addr,
            &format!("{method} /api/requests HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n"),
        )
        .await
    };
    for host in [
        addr.to_string(),
        format!("localhost:{}", addr.port()),
        "LOCALHOST:1".into(),
        "[::1]:8080".into(),
    ] {
        let (head, _) = ask(host.clone(), String::new(), "GET").await;
        assert_eq!(head.status(), 200, "Host: {host}");
        assert!(
            head.fields
                .iter()
                .all(|(k, _)| !k.to_ascii_lowercase().starts_with("access-control-")),
            "no CORS header: {:?}",
            head.fields
        );
        let csp = head.get("content-security-policy").unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
    }
    // DNS rebinding: a name that resolves to 127.0.0.1 is still not ours.
    for host in [
        "evil.example",
        "evil.example:9293",
        "127.0.0.1.nip.io",
        "10.0.0.1",
    ] {
        let (head, body) = ask(host.into(), String::new(), "GET").await;
        assert_eq!(head.status(), 403, "Host: {host}");
        assert!(String::from_utf8_lossy(&body).contains("localhost"));
    }
    let (head, _) = ask(
        addr.to_string(),
        "Origin: http://evil.example\r\n".into(),
        "GET",
    )
    .await;
    assert_eq!(head.status(), 403, "a page from elsewhere");
    let (head, _) = ask(
        addr.to_string(),
        format!("Origin: http://localhost:{}\r\n", addr.port()),
        "GET",
    )
    .await;
    assert_eq!(head.status(), 200, "its own page");
    let (head, _) = roundtrip(addr, "GET /api/requests HTTP/1.0\r\n\r\n").await;
    assert_eq!(head.status(), 403, "no Host at all");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (head, _) = ask(addr.to_string(), "Content-Length: 0\r\n".into(), method).await;
        assert_eq!(head.status(), 405, "{method}");
        assert_eq!(head.get("allow"), Some("GET, HEAD"));
    }
    let (head, body) = get(addr, "/").await;
    assert_eq!(head.status(), 200);
    assert!(head.get("content-type").unwrap().starts_with("text/html"));
    let page = String::from_utf8(body).unwrap();
    // Nothing loaded from anywhere: no src=, no stylesheet link, no url() or @import in its style.
    for external in ["src=", "rel=\"stylesheet"] {
        assert!(
            !page.contains(external),
            "the page loads something: {external}"
        );
    }
    let style = page
        .split("<style>")
        .nth(1)
        .unwrap()
        .split("</style>")
        .next()
        .unwrap();
    for external in ["url(", "@import"] {
        assert!(
            !style.contains(external),
            "the style loads something: {external}"
        );
    }
    assert_eq!(
        echo.requests().len(),
        0,
        "the inspector never reaches the upstream"
    );
}

/// Sends `n` requests made by `request(i)` over `conns` keep-alive connections, reading each answer.
async fn load(addr: SocketAddr, n: usize, conns: usize, request: fn(usize) -> String) {
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(addr).await;
            for i in (c..n).step_by(conns) {
                conn.send(&request(i)).await;
                let head = conn.read_head().await;
                assert_eq!(head.status(), 200);
                conn.read_body(&head).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn small_get(i: usize) -> String {
    format!("GET /v2/images?marker={i} HTTP/1.1\r\nHost: h\r\n\r\n")
}

#[tokio::test]
async fn the_last_n_are_kept() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &["--inspect-keep", "3"]).await;
    load(shim.addr, 5, 1, small_get).await;
    let serials: Vec<u64> = recent(&shim)
        .await
        .iter()
        .map(|r| r["serial"].as_u64().unwrap())
        .collect();
    assert_eq!(serials, vec![4, 3, 2], "newest first");
    let (head, body) = get(shim.inspector.unwrap(), "/api/requests/0").await;
    assert_eq!(head.status(), 404);
    assert!(String::from_utf8_lossy(&body).contains("--inspect-keep"));
}

#[tokio::test]
async fn bodies_are_kept_up_to_the_cap_and_the_oldest_requests_make_room() {
    let echo = Echo::start().await;
    // Room for two 64 KiB bodies and their heads, not three.
    let shim = Shim::start(&echo.port(), &["--inspect-memory", "150KiB"]).await;
    let mib = 1 << 20;
    let mut conn = Conn::connect(shim.addr).await;
    conn.send(&format!(
        "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {mib}\r\n\r\n"
    ))
    .await;
    conn.write(&vec![7u8; mib]).await;
    let head = conn.read_head().await;
    assert_eq!(head.status(), 200);
    conn.read_body(&head).await;
    shim.wait_for("the upload's completion", completion).await;
    let upload = shim.api("/api/requests/0").await;
    let body = &upload["request"]["body"];
    assert_eq!(body["size"], mib, "the real size");
    assert_eq!(
        body["kept"], 65536,
        "image data is kept only up to --inspect-body"
    );
    assert_eq!(body["complete"], false);
    assert_eq!(body["json"], Value::Null);
    assert_eq!(body["content_type"], "application/octet-stream");
    assert!(
        body["note"].as_str().unwrap().contains("first 65536 bytes"),
        "{body}"
    );

    for _ in 0..2 {
        conn.send(&format!(
            "GET /download?bytes={mib} HTTP/1.1\r\nHost: h\r\n\r\n"
        ))
        .await;
        let head = conn.read_head().await;
        assert_eq!(conn.read_body(&head).await.len(), mib);
    }
    shim.wait_for_nth("the downloads' completions", 3, completion)
        .await;
    let list = shim.api("/api/requests").await;
    let used = list["memory_used"].as_u64().unwrap();
    assert!(used <= 150 * 1024, "{used} bytes kept");
    assert!(used >= 2 * 65536, "both downloads' bodies are kept: {used}");
    let serials: Vec<u64> = list["recent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["serial"].as_u64().unwrap())
        .collect();
    assert_eq!(serials, vec![2, 1], "the oldest went first");
    let download = shim.api("/api/requests/2").await;
    assert_eq!(download["response"]["body"]["kept"], 65536);
    assert_eq!(download["response"]["body"]["size"], mib);
}

#[tokio::test]
async fn a_json_body_longer_than_the_cap_is_not_shown() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--inspect-body", "1KiB"]).await;
    let long = format!(
        r#"[{{"op":"add","path":"/note","value":"{}"}}]"#,
        "x".repeat(2000)
    );
    let (mut client, mut conn, _) = forwarded(&shim, &up, &patch(&long)).await;
    conn.read_exact(long.len()).await;
    conn.send(&glance_answer("{}")).await;
    client.read_head().await;
    shim.wait_for("the completion line", completion).await;
    let d = shim.api("/api/requests/0").await;
    let body = &d["request"]["body"];
    assert_eq!(body["kept"], 1024);
    assert_eq!(
        body["json"],
        Value::Null,
        "a cut JSON body could hide a secret past the cut"
    );
    assert_eq!(d["response"]["body"]["json"], serde_json::json!({}));
}

#[tokio::test]
async fn a_reader_that_stops_reading_slows_nothing_and_is_told_to_resync() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    // A reader with a small receive buffer that reads the stream's head and then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(shim.inspector.unwrap()).await.unwrap();
    let mut conn = Conn::new(stream);
    conn.send("GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    assert_eq!(conn.read_head().await.status(), 200);
    let mut reader = EventReader {
        conn,
        text: String::new(),
    };

    // 3,000 requests while it does not read: 9,000 events, more than the stream's ring keeps and
    // than the buffers between it and the reader hold. Every one completes.
    tokio::time::timeout(PATIENCE, load(shim.addr, 3000, 8, small_get))
        .await
        .expect("the proxy was slowed down by a reader that does not read");
    assert_eq!(echo.requests().len(), 3000);

    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no resync event within {PATIENCE:?}"
        );
        let e = reader.next().await;
        if e.event == "resync" {
            assert!(e.data["missed"].as_u64().unwrap() > 0);
            assert!(e.data["reason"].as_str().unwrap().contains("/api/requests"));
            break;
        }
    }
}

#[tokio::test]
async fn the_default_port_taken_is_a_warning_and_the_shim_proxies_anyway() {
    // Hold the default port (if something else already does, it is taken all the same).
    let _holder = std::net::TcpListener::bind(("127.0.0.1", 9293));
    let echo = Echo::start().await;
    let port = echo.port();
    let shim = Shim::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &port,
            "--log-format",
            "json",
        ],
        &[("GLANCE_SHIM_INSPECT", "")],
    );
    let listening = shim
        .wait_for("the listening line", |l| msg(l) == "listening")
        .await;
    assert_eq!(listening["inspector"], Value::Null);
    let warnings = shim.count(|l| msg(l).contains("the inspector cannot listen on 127.0.0.1:9293"));
    assert_eq!(warnings, 1, "{}", shim.dump());
    let addr = listening["listen"].as_str().unwrap().parse().unwrap();
    let (head, _) = get(addr, "/v2/images").await;
    assert_eq!(head.status(), 200, "proxying goes on");
}

#[tokio::test]
async fn an_address_given_and_taken_stops_the_shim_with_status_2_naming_the_flag() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().to_string();
    let mut shim = Shim::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "1",
            "--inspect",
            &taken,
        ],
        &[],
    );
    assert_eq!(shim.exit_status().await.code(), Some(2));
    let line = shim
        .wait_for("the error", |l| {
            l.as_str().is_some_and(|s| s.contains("--inspect"))
        })
        .await;
    let line = line.as_str().unwrap();
    assert!(
        line.contains(&taken) && line.contains("--inspect off"),
        "{line}"
    );
}

#[tokio::test]
async fn off_is_off_and_a_non_loopback_address_is_warned_about() {
    let echo = Echo::start().await;
    let off = Shim::start(&echo.port(), &["--inspect", "off"]).await;
    assert!(off.inspector.is_none());
    assert_eq!(get(off.addr, "/").await.0.status(), 200);

    let open = Shim::start(&echo.port(), &["--inspect", "0.0.0.0:0"]).await;
    let warning = open
        .wait_for("the warning", |l| {
            msg(l).contains("the inspector listens on a non-loopback address")
        })
        .await;
    assert!(warning["inspect"].as_str().unwrap().starts_with("0.0.0.0:"));
}

fn json_post(i: usize) -> String {
    // Mostly 1 KiB bodies; every 20th is 60 KiB, so that the kept bytes reach --inspect-memory.
    let pad = if i.is_multiple_of(20) {
        60 * 1024
    } else {
        1024
    };
    let body = format!(
        r#"{{"name":"image-{i}","password":"p{i}","padding":"{}"}}"#,
        "x".repeat(pad)
    );
    format!(
        "POST /v2/images HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nX-Auth-Token: t{i}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100,000 requests"]
async fn after_100000_json_requests_memory_stays_under_the_cap_plus_16_mib() {
    // With the defaults, and with a cap small enough for these requests to reach it.
    for flags in [&[][..], &["--inspect-memory", "8MiB"][..]] {
        let echo = Echo::start().await;
        let shim = Shim::start(&echo.port(), flags).await;
        load(shim.addr, 100_000, 16, json_post).await;
        let list = shim.api("/api/requests").await;
        let used = list["memory_used"].as_u64().unwrap();
        let max = list["shim"]["memory_max"].as_u64().unwrap();
        assert!(used <= max, "{used} bytes kept, over {max}");
        let kept = list["recent"].as_array().unwrap().len();
        assert!(kept > 100 && kept <= 1000, "{kept} kept");
        let rss = shim.peak_rss();
        eprintln!(
            "100,000 requests, {flags:?}: {kept} kept in {:.1} MiB; shim peak RSS {:.1} MiB",
            used as f64 / (1 << 20) as f64,
            rss as f64 / (1 << 20) as f64
        );
        assert!(rss < max + (16 << 20), "peak RSS {rss} bytes");
    }
}

#[tokio::test]
async fn the_shims_own_answer_is_kept_once_as_it_was_sent() {
    let down = Reserved::new();
    let shim = Shim::start(&down.port_str(), &[]).await;
    let (head, body) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 502);
    shim.wait_for("the completion line", completion).await;
    let d = shim.api("/api/requests/0").await;
    assert_eq!(d["outcome"], "upstream_unreachable");
    let kept = &d["response"]["body"];
    assert_eq!(kept["size"], body.len());
    assert_eq!(kept["kept"], body.len());
    assert_eq!(kept["complete"], true);
    let sent: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(kept["json"], sent, "the JSON the client got");
    let headers = d["response"]["headers"].as_array().unwrap();
    assert!(
        headers
            .iter()
            .any(|h| h[0] == "content-type" && h[1] == "application/json")
    );
}

#[tokio::test]
async fn a_refused_request_is_shown_with_its_fields_as_they_came() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let (head, _) = roundtrip(
        shim.addr,
        "GET /v2/images HTTP/1.1\r\nHost: h\r\nVia: 1.1 glance-shim\r\nX-Auth-Token: secret-t\r\n\r\n",
    )
    .await;
    assert_eq!(head.status(), 508, "a loop");
    shim.wait_for("the completion line", completion).await;
    let d = shim.api("/api/requests/0").await;
    assert_eq!(d["outcome"], "refused");
    let fields: Vec<(&str, &str)> = d["request"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap(), h[1].as_str().unwrap()))
        .collect();
    assert!(fields.contains(&("via", "1.1 glance-shim")));
    assert!(fields.contains(&("x-auth-token", "<masked>")));
    assert!(
        !fields.iter().any(|(k, _)| *k == "x-forwarded-for"),
        "never forwarded: {fields:?}"
    );
    assert_eq!(d["response"]["body"]["json"]["code"], 508);
    assert_eq!(echo.requests().len(), 0);
}

#[tokio::test]
async fn a_token_echoed_in_a_body_is_masked_there_too() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let (mut client, mut conn, _) = forwarded(&shim, &up, &patch("[]")).await;
    conn.read_exact(2).await;
    // An upstream that echoes the request's fields back: the token is in no field named as a secret.
    let answer =
        format!(r#"{{"headers": [["x-auth-token", "{TOKEN}"]], "note": "seen {TOKEN} here"}}"#);
    conn.send(&glance_answer(&answer)).await;
    let head = client.read_head().await;
    client.read_body(&head).await;
    shim.wait_for("the completion line", completion).await;
    let (_, raw) = get(shim.inspector.unwrap(), "/api/requests/0").await;
    let text = String::from_utf8(raw).unwrap();
    assert!(!text.contains(TOKEN), "{text}");
    let d: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["response"]["body"]["json"]["headers"][0][1], "<masked>");
    assert_eq!(d["response"]["body"]["json"]["note"], "seen <masked> here");
    let (_, raw) = get(shim.inspector.unwrap(), "/api/har").await;
    assert!(!String::from_utf8(raw).unwrap().contains(TOKEN));
}
