//! The uwsgi front (`--uwsgi`, `--takeover` of a uWSGI `socket =`): packets as Apache's
//! mod_proxy_uwsgi sends them, in raw bytes, over TCP and over unix sockets; what the upstream gets
//! and what goes back. tests/e2e/ runs the same front behind a real Apache.

mod util;

use std::os::unix::fs::PermissionsExt as _;

use glance_shim::packet;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};
use util::*;

/// The variables Apache 2.4's mod_proxy_uwsgi sends for a request to `ProxyPass "/identity" ...`
/// (measured with a raw listener; see README), for `method` and `uri` with `extra` ones.
fn apache_vars<'a>(
    method: &'a str,
    uri: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut vars = vec![
        ("HTTP_HOST", "controller"),
        ("HTTP_USER_AGENT", "openstacksdk/4.0.0"),
        ("HTTP_X_AUTH_TOKEN", "gAAAAAsecret"),
        ("HTTP_ACCEPT", "application/json"),
    ];
    vars.extend_from_slice(extra);
    vars.extend_from_slice(&[
        ("PATH", "/usr/local/bin:/usr/bin"),
        ("SERVER_SIGNATURE", ""),
        ("SERVER_SOFTWARE", "Apache/2.4.71 (Debian)"),
        ("SERVER_NAME", "controller"),
        ("SERVER_ADDR", "10.0.0.1"),
        ("SERVER_PORT", "80"),
        ("REMOTE_ADDR", "10.0.0.5"),
        ("DOCUMENT_ROOT", "/var/www/html"),
        ("REQUEST_SCHEME", "http"),
        ("REMOTE_PORT", "51234"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_METHOD", method),
        ("QUERY_STRING", query),
        ("REQUEST_URI", uri),
        ("SCRIPT_NAME", "/identity"),
        ("PATH_INFO", path.strip_prefix("/identity").unwrap_or(path)),
    ]);
    vars
}

/// Sends one packet and `body` in one write (the shim reads the body's first bytes with the
/// packet) on a new TCP connection, and reads the answer to the close.
async fn exchange(shim: &Shim, vars: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(shim.addr).await.unwrap();
    s.write_all(&[packet::encode(vars), body.to_vec()].concat())
        .await
        .unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the shim closes the connection after its answer")
        .unwrap();
    out
}

/// An answer split into its head and its body.
fn split(answer: &[u8]) -> (Head, &[u8]) {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    (Head::parse(answer[..end].to_vec()), &answer[end..])
}

#[tokio::test]
async fn a_packet_reaches_the_upstream_as_the_http_request_apache_was_sent() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--uwsgi", "--inspect", "off"]).await;
    let vars = apache_vars(
        "POST",
        "/identity/v3/auth/tokens?nocatalog",
        &[
            ("CONTENT_TYPE", "application/json"),
            ("CONTENT_LENGTH", "11"),
            ("HTTP_EXPECT", "100-continue"),
            ("HTTP_CONNECTION", "keep-alive"),
        ],
    );
    let client = tokio::spawn({
        let addr = shim.addr;
        let packet = packet::encode(&vars);
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&packet).await.unwrap();
            s.write_all(b"{\"auth\":{}}").await.unwrap();
            read_to_close(&mut s).await
        }
    });
    let mut conn = up.accept().await;
    let head = conn.read_head().await;
    assert_eq!(
        head.start, "POST /identity/v3/auth/tokens?nocatalog HTTP/1.1",
        "the path as the client sent it to Apache, SCRIPT_NAME included"
    );
    assert_eq!(head.get("host"), Some("controller"));
    assert_eq!(head.get("x-auth-token"), Some("gAAAAAsecret"));
    assert_eq!(head.get("content-type"), Some("application/json"));
    assert_eq!(head.get("content-length"), Some("11"));
    assert_eq!(head.get("user-agent"), Some("openstacksdk/4.0.0"));
    assert!(
        !head.has("expect"),
        "Apache answered the 100-continue itself: {head:?}"
    );
    assert_eq!(head.get("x-forwarded-for"), Some("10.0.0.5"), "REMOTE_ADDR");
    assert_eq!(head.get("x-forwarded-proto"), Some("http"));
    let id = head.get("x-openstack-request-id").unwrap().to_owned();
    assert!(id.starts_with("req-"), "{id}");
    // No CGI variable becomes a header: only HTTP_*, CONTENT_TYPE and CONTENT_LENGTH do.
    for cgi in [
        "path",
        "server-name",
        "remote-addr",
        "script-name",
        "path-info",
        "request-uri",
    ] {
        assert!(!head.has(cgi), "{cgi} in {head:?}");
    }
    assert_eq!(conn.read_exact(11).await, b"{\"auth\":{}}");
    // A chunked answer of unknown length, as a WSGI server sends a streamed body.
    conn.send(&format!(
        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Subject-Token: gAAAAAnew\r\n\
         x-openstack-request-id: {id}\r\nTransfer-Encoding: chunked\r\n\r\n\
         6\r\n{{\"a\":1\r\n1\r\n}}\r\n0\r\n\r\n"
    ))
    .await;
    let answer = client.await.unwrap();
    let (head, body) = split(&answer);
    assert_eq!(head.start, "HTTP/1.0 201 Created");
    assert!(
        !head.has("transfer-encoding") && !head.has("content-length"),
        "a body of unknown length is ended by the close, not chunked: {head:?}"
    );
    assert_eq!(
        body, b"{\"a\":1}",
        "the body byte for byte, its chunk framing gone"
    );
    assert_eq!(head.get("x-openstack-request-id"), Some(id.as_str()));

    let done = shim
        .wait_for("the completion line", |l| {
            completion(l) && field(l, "id") == id
        })
        .await;
    assert_eq!(done["status"], 201);
    assert_eq!(outcome(&done), "completed");
    let arrival = shim
        .lines()
        .into_iter()
        .find(|l| msg(l) == "arrived" && field(l, "id") == id)
        .unwrap();
    assert_eq!(
        field(&arrival, "path"),
        "/identity/v3/auth/tokens?nocatalog"
    );
    assert_eq!(
        field(&arrival, "client"),
        "10.0.0.5:51234",
        "Apache's client, not Apache"
    );
    let told = shim
        .wait_for("where Apache mounts it", |l| {
            l["script_name"] == "/identity"
        })
        .await;
    assert!(msg(&told).contains("SCRIPT_NAME=/identity"), "{told}");
    assert!(!shim.dump().contains("gAAAAAsecret"), "no token in the log");
}

#[tokio::test]
async fn bodies_stream_both_ways_and_lengths_are_kept() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &["--uwsgi"]).await;
    let n = 8 << 20;
    let upload = Pattern::body(n);
    let upload = http_body_util::BodyExt::collect(upload)
        .await
        .unwrap()
        .to_bytes();
    let len = n.to_string();
    let vars = apache_vars("PUT", "/identity/upload", &[("CONTENT_LENGTH", &len)]);
    let answer = exchange(&shim, &vars, &upload).await;
    let (head, body) = split(&answer);
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(body));
    let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(seen["body_len"], n);
    assert_eq!(seen["body_sha256"], Pattern::sha256(n));

    for (query, length) in [("", true), ("&chunked=1", false)] {
        let uri = format!("/download?bytes={n}{query}");
        let answer = exchange(&shim, &apache_vars("GET", &uri, &[]), b"").await;
        let (head, body) = split(&answer);
        assert_eq!(head.get("content-length").is_some(), length, "{head:?}");
        assert!(!head.has("transfer-encoding"), "{head:?}");
        assert_eq!(body.len() as u64, n);
        assert_eq!(sha256(body), Pattern::sha256(n));
    }
}

#[tokio::test]
async fn without_an_upstream_apache_gets_the_json_502() {
    let unused = Reserved::new();
    let shim = Shim::start(&unused.port_str(), &["--uwsgi", "--inspect", "off"]).await;
    let answer = exchange(&shim, &apache_vars("GET", "/identity/v3", &[]), b"").await;
    let (head, body) = split(&answer);
    assert_eq!(head.start, "HTTP/1.0 502 Bad Gateway");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert!(
        json["message"].as_str().unwrap().contains("upstream"),
        "{json}"
    );
    assert_eq!(
        head.get("content-length"),
        Some(body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn malformed_packets_get_a_log_line_and_a_closed_connection() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &["--uwsgi", "--inspect", "off"]).await;
    let good = packet::encode(&apache_vars("GET", "/identity/v3", &[]));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        ([&[5u8][..], &good[1..]].concat(), "modifier1 is 5"),
        (good[..good.len() - 3].to_vec(), "ended inside the packet"),
        (packet::encode(&[("REQUEST_URI", "/")]), "no REQUEST_METHOD"),
        (
            packet::encode(&[
                ("REQUEST_METHOD", "GET"),
                ("REQUEST_URI", "/"),
                ("HTTP_X", "a\r\nb: c"),
            ]),
            "HTTP_X variable holds a byte",
        ),
    ];
    for (i, (bytes, why)) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(shim.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        // Closed with bytes unread, the connection may end in a reset: either way, no answer.
        let mut out = Vec::new();
        let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "case {i}: the shim closes the connection");
        assert_eq!(out, b"", "case {i}: closed without an answer");
        // Each later case's warning is held back by the rate limit; the first is logged.
        if i == 0 {
            shim.wait_for("the warning", |l| msg(l).contains(why)).await;
        }
    }
    // Served on, and the request that follows is the only one upstream saw.
    let answer = exchange(&shim, &apache_vars("GET", "/identity/v3", &[]), b"").await;
    assert_eq!(split(&answer).0.status(), 200);
    assert_eq!(echo.requests().len(), 1);
}

#[tokio::test]
async fn the_socket_file_is_made_0666_replaces_a_stale_one_and_is_removed_at_stop() {
    let echo = Echo::start().await;
    let dir = tempdir("uwsgi-socket");
    let path = dir.join("keystone-api.socket");
    // What a stopped uWSGI leaves: a socket file nothing listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let path_arg = path.to_str().unwrap();
    let args = [
        "--listen",
        path_arg,
        "--uwsgi",
        "--upstream",
        &echo.port(),
        "--log-format",
        "json",
        "--inspect",
        "off",
    ];
    let mut shim = Shim::spawn(&args, &[]);
    let line = shim
        .wait_for("the listening line", |l| msg(l) == "listening")
        .await;
    assert_eq!(field(&line, "listen"), format!("unix:{}", path.display()));
    assert!(shim.count(|l| msg(l).contains("replacing a socket file nothing listens on")) == 1);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o666,
        "Apache's user (www-data) must be able to connect"
    );

    let mut s = UnixStream::connect(&path).await.unwrap();
    s.write_all(&packet::encode(&apache_vars("GET", "/identity/v3", &[])))
        .await
        .unwrap();
    let answer = read_to_close(&mut s).await;
    assert_eq!(split(&answer).0.status(), 200);
    let done = shim.wait_for("the completion line", completion).await;
    let arrival = shim
        .lines()
        .into_iter()
        .find(|l| msg(l) == "arrived" && field(l, "id") == field(&done, "id"))
        .unwrap();
    assert_eq!(field(&arrival, "client"), "10.0.0.5:51234");

    // A second shim on the live socket: one line naming the unit whose uWSGI would hold it.
    let out = shim_command()
        .args([
            "--listen",
            path_arg,
            "--uwsgi",
            "--upstream",
            "1",
            "--inspect",
            "off",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("a server accepts connections there")
            && err.contains("sudo systemctl stop devstack@keystone"),
        "{err}"
    );
    assert!(
        path.exists(),
        "the refused shim leaves the live socket alone"
    );

    shim.signal("TERM");
    assert!(shim.exit_status().await.success());
    assert!(!path.exists(), "the socket is removed when the shim stops");
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_never_replaced() {
    let dir = tempdir("uwsgi-not-socket");
    let path = dir.join("nova-api.socket");
    std::fs::write(&path, "data").unwrap();
    let out = shim_command()
        .args([
            "--listen",
            path.to_str().unwrap(),
            "--uwsgi",
            "--upstream",
            "1",
            "--inspect",
            "off",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
}

#[tokio::test]
async fn takeover_of_a_socket_line_serves_uwsgi_there() {
    let echo = Echo::start().await;
    let dir = tempdir("uwsgi-takeover");
    let socket = dir.join("placement-api.socket");
    let ini = dir.join("placement-uwsgi.ini");
    std::fs::write(
        &ini,
        format!(
            "[uwsgi]\nmodule = placement.wsgi.api:application\nsocket = {}\nchmod-socket = 666\n",
            socket.display()
        ),
    )
    .unwrap();
    let args = [
        "--takeover",
        ini.to_str().unwrap(),
        "--upstream",
        &echo.port(),
        "--log-format",
        "json",
        "--inspect",
        "off",
    ];
    let shim = Shim::spawn(&args, &[]);
    let line = shim
        .wait_for("the listening line", |l| msg(l) == "listening")
        .await;
    assert_eq!(line["uwsgi"], true);
    let mut s = UnixStream::connect(&socket).await.unwrap();
    let vars = [
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", "/placement/resource_providers"),
        ("SCRIPT_NAME", "/placement"),
        ("PATH_INFO", "/resource_providers"),
        ("HTTP_HOST", "controller"),
    ];
    s.write_all(&packet::encode(&vars)).await.unwrap();
    let answer = read_to_close(&mut s).await;
    let (head, body) = split(&answer);
    assert_eq!(head.status(), 200);
    let seen: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(seen["target"], "/placement/resource_providers");
}

#[tokio::test]
async fn apaches_clock_is_in_the_stall_notice_and_names_what_ended_the_request() {
    let up = RawUpstream::bind().await;
    let dir = tempdir("uwsgi-apache-clock");
    let sock = dir.join("keystone-api.socket");
    let conf = dir.join("apache2.conf");
    std::fs::write(&conf, "Timeout 2\nIncludeOptional sites-enabled/*.conf\n").unwrap();
    std::fs::create_dir(dir.join("sites-enabled")).unwrap();
    std::fs::write(
        dir.join("sites-enabled/keystone-api.conf"),
        format!(
            "ProxyPass \"/identity\" \"unix:{}|uwsgi://uwsgi-uds-keystone-api\" retry=0 acquire=1\n",
            sock.display()
        ),
    )
    .unwrap();
    let args = [
        "--listen",
        sock.to_str().unwrap(),
        "--uwsgi",
        "--upstream",
        &up.port(),
        "--apache-config",
        conf.to_str().unwrap(),
        "--stall-after",
        "500ms",
        "--log-format",
        "json",
        "--inspect",
        "off",
    ];
    let shim = Shim::spawn(&args, &[]);
    let line = shim
        .wait_for("Apache's clock at start-up", |l| l["apache_timeout_s"] == 2)
        .await;
    assert!(msg(&line).contains("Timeout 2 in"), "{line}");

    // Apache's side: the packet, then nothing until its Timeout, then it closes.
    let mut apache = UnixStream::connect(&sock).await.unwrap();
    apache
        .write_all(&packet::encode(&apache_vars(
            "GET",
            "/identity/v3/auth/tokens",
            &[],
        )))
        .await
        .unwrap();
    let mut held = up.accept().await; // glance... keystone, at its breakpoint
    let _ = held.read_head().await;
    let notice = shim
        .wait_for("a stall notice", |l| msg(l).contains("probably paused"))
        .await;
    assert!(
        msg(&notice).contains("Apache gives up on it in 2 s (Timeout 2 in"),
        "{notice}"
    );
    assert!(
        notice["apache_gives_up_in_s"].as_f64().unwrap() <= 1.5,
        "{notice}"
    );
    // Apache's Timeout runs out while the upstream still holds the request: the notice at 2 s says
    // so, and then Apache (this test) closes, as it does.
    let late = shim
        .wait_for("the notice at 2 s", |l| {
            msg(l).contains("probably paused") && l["waited_s"].as_f64().unwrap_or(0.0) >= 2.0
        })
        .await;
    assert!(
        msg(&late).contains("Apache's timeout has run out (Timeout 2 in"),
        "{late}"
    );
    drop(apache);
    let done = shim.wait_for("the completion line", completion).await;
    assert_eq!(outcome(&done), "client_gone");
    let error = field(&done, "error");
    assert!(
        error.starts_with("Apache gave up on it after 2 s (Timeout 2 in ")
            && error.contains("raise it, or set ProxyTimeout"),
        "{done}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_early_is_not_blamed_on_apaches_clock() {
    let up = RawUpstream::bind().await;
    let dir = tempdir("uwsgi-apache-early");
    let sock = dir.join("keystone-api.socket");
    let conf = dir.join("apache2.conf");
    std::fs::write(
        &conf,
        format!(
            "Timeout 300\nProxyPass /identity unix:{}|uwsgi://k\n",
            sock.display()
        ),
    )
    .unwrap();
    let args = [
        "--listen",
        sock.to_str().unwrap(),
        "--uwsgi",
        "--upstream",
        &up.port(),
        "--apache-config",
        conf.to_str().unwrap(),
        "--log-format",
        "json",
        "--inspect",
        "off",
    ];
    let shim = Shim::spawn(&args, &[]);
    shim.wait_for("Apache's clock", |l| l["apache_timeout_s"] == 300)
        .await;
    let mut apache = UnixStream::connect(&sock).await.unwrap();
    apache
        .write_all(&packet::encode(&apache_vars("GET", "/identity/v3", &[])))
        .await
        .unwrap();
    let mut held = up.accept().await;
    let _ = held.read_head().await;
    drop(apache); // a client that gave up (Ctrl-C), long before Apache's 300 s
    let done = shim.wait_for("the completion line", completion).await;
    assert_eq!(outcome(&done), "client_gone");
    assert!(!field(&done, "error").contains("Apache"), "{done}");
}

#[tokio::test]
async fn the_inspector_capture_har_and_replay_work_for_uwsgi_requests_and_mask_the_token() {
    let echo = Echo::start().await;
    let capture = tempdir("uwsgi-capture").join("capture"); // made by the shim, mode 0700
    let mut shim = Shim::start(
        &echo.port(),
        &["--uwsgi", "--capture", capture.to_str().unwrap()],
    )
    .await;
    let body = r#"{"auth": {"identity": {"password": {"user": {"password": "s3cret"}}}}}"#;
    let len = body.len().to_string();
    let vars = apache_vars(
        "POST",
        "/identity/v3/auth/tokens",
        &[
            ("CONTENT_TYPE", "application/json"),
            ("CONTENT_LENGTH", &len),
        ],
    );
    let answer = exchange(&shim, &vars, body.as_bytes()).await;
    assert_eq!(split(&answer).0.status(), 200);
    let done = shim.wait_for("the completion line", completion).await;
    let id = field(&done, "id").to_owned();

    let shown = shim.api(&format!("/api/requests/{id}")).await;
    assert_eq!(shown["client"], "10.0.0.5:51234");
    let headers = shown["request"]["headers"].to_string();
    assert!(
        headers.contains("<masked>") && !headers.contains("gAAAAAsecret"),
        "{headers}"
    );
    assert_eq!(
        shown["request"]["body"]["json"]["auth"]["identity"]["password"]["user"]["password"],
        "<masked>"
    );

    // Replayed through the proxy to the upstream, with the token it came with and a new id.
    let key = shim.key.clone().unwrap();
    let ask = serde_json::json!({ "of": id }).to_string();
    let mut conn = Conn::connect(shim.inspector.unwrap()).await;
    conn.send(&format!(
        "POST /api/replay HTTP/1.1\r\nHost: localhost\r\nX-Glance-Shim-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{ask}",
        ask.len()
    ))
    .await;
    let head = conn.read_head().await;
    let started: serde_json::Value = serde_json::from_slice(&conn.read_body(&head).await).unwrap();
    assert_eq!(head.status(), 202, "{started}");
    let new_id = started["id"].as_str().unwrap().to_owned();
    shim.wait_for("the replay's completion", |l| {
        completion(l) && l["id"] == new_id.as_str()
    })
    .await;
    let seen = echo.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body_sha256, seen[1].body_sha256);
    let header = |s: &Seen, name: &str| {
        s.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header(&seen[1], "x-auth-token").as_deref(),
        Some("gAAAAAsecret")
    );
    assert_eq!(
        header(&seen[1], "x-openstack-request-id"),
        Some(new_id.clone())
    );
    assert_eq!(seen[1].target, "/identity/v3/auth/tokens");

    let (_, har) = get(shim.inspector.unwrap(), "/api/har").await;
    let har = String::from_utf8(har).unwrap();
    assert!(
        har.contains(&id) && har.contains(&new_id),
        "both in the HAR"
    );
    assert!(
        !har.contains("gAAAAAsecret") && !har.contains("s3cret"),
        "no secret in the HAR"
    );

    shim.signal("TERM");
    assert!(shim.exit_status().await.success(), "drained and stopped");
    let mut captured = String::new();
    for entry in std::fs::read_dir(&capture).unwrap() {
        captured.push_str(&String::from_utf8_lossy(
            &std::fs::read(entry.unwrap().path()).unwrap(),
        ));
    }
    assert!(
        captured.contains(&id) && captured.contains(&new_id),
        "both captured"
    );
    assert!(
        !captured.contains("gAAAAAsecret"),
        "no token in the capture"
    );
}
