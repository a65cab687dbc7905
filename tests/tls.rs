//! TLS on both sides of the shim, with certificates made at test time: clients over TLS to the shim,
//! the shim to an https upstream, and the ways that goes wrong (wrong CA, expired certificate, plain
//! HTTP on the TLS port, unusable files).

mod util;

use util::*;

const GET: &str = "GET /v2/images HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

async fn shim_with_tls(upstream: &str, ca: &TestCa, extra: &[&str]) -> Shim {
    let (cert, key) = ca.leaf(false);
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Shim::start(upstream, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_1_2_and_1_3_to_the_shim() {
    let echo = Echo::start().await;
    let ca = TestCa::new("client side CA");
    let shim = shim_with_tls(&echo.port(), &ca, &[]).await;
    let listening = shim.wait_for("listening", |l| msg(l) == "listening").await;
    assert_eq!(listening["tls"], true);
    for (versions, want) in [
        (
            &[&rustls::version::TLS13][..],
            rustls::ProtocolVersion::TLSv1_3,
        ),
        (
            &[&rustls::version::TLS12][..],
            rustls::ProtocolVersion::TLSv1_2,
        ),
    ] {
        let (version, alpn, head, body) = tls_roundtrip(shim.addr, ca.client_config(versions), GET)
            .await
            .unwrap();
        assert_eq!(version, Some(want));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(head.status(), 200);
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let proto = seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "x-forwarded-proto")
            .unwrap();
        assert_eq!(
            proto[1], "https",
            "the upstream learns the client came over TLS"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_gets_a_clear_400_and_the_port_keeps_working() {
    let echo = Echo::start().await;
    let ca = TestCa::new("plain mistake CA");
    let shim = shim_with_tls(&echo.port(), &ca, &[]).await;
    let (head, body) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 400);
    assert!(
        String::from_utf8_lossy(&body).contains("speaks TLS"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (_, _, head, _) =
        tls_roundtrip(shim.addr, ca.client_config(&[&rustls::version::TLS13]), GET)
            .await
            .unwrap();
    assert_eq!(head.status(), 200);
    assert!(
        echo.requests().len() == 1,
        "the plain request never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failed_handshakes_is_logged_once_and_stops_nothing() {
    let echo = Echo::start().await;
    let ca = TestCa::new("flood CA");
    let stranger = TestCa::new("stranger CA");
    let shim = shim_with_tls(&echo.port(), &ca, &[]).await;
    let started = std::time::Instant::now();
    for _ in 0..40 {
        // A client that does not trust the shim's certificate aborts the handshake.
        assert!(
            tls_roundtrip(
                shim.addr,
                stranger.client_config(&[&rustls::version::TLS13]),
                GET
            )
            .await
            .is_err()
        );
    }
    for _ in 0..10 {
        let mut conn = Conn::connect(shim.addr).await;
        conn.write(b"\x16\x03\x01\x00\x05hello").await; // a handshake record that is garbage
        drop(conn);
    }
    let (_, _, head, _) =
        tls_roundtrip(shim.addr, ca.client_config(&[&rustls::version::TLS13]), GET)
            .await
            .unwrap();
    assert_eq!(head.status(), 200, "the accept loop is still serving");
    let warnings = shim.count(|l| field(l, "level") == "WARN" && msg(l).contains("TLS handshake"));
    // One line at once, then at most one per 10 s: one line, unless the machine was slow enough to
    // spread the 50 failures over more than 10 s.
    let allowed = 1 + started.elapsed().as_secs() / 10;
    assert!(
        (1..=allowed).contains(&(warnings as u64)),
        "50 failures, {warnings} lines:\n{}",
        shim.dump()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_speaks_tls_to_an_https_upstream_with_a_private_ca() {
    let ca = TestCa::new("upstream CA");
    let echo = Echo::start_tls(ca.server_config(false)).await;
    let upstream = format!("https://localhost:{}", echo.port());
    let shim = Shim::start(&upstream, &["--upstream-ca", ca.pem.to_str().unwrap()]).await;
    let (head, body) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["target"], "/v2/images");
    let sni = echo.sni.lock().unwrap().clone();
    assert_eq!(
        sni,
        [Some("localhost".to_owned())],
        "SNI from the host name"
    );
    // An IP literal is checked against the certificate's IP address, with no SNI.
    let by_ip = Shim::start(
        &format!("https://127.0.0.1:{}", echo.port()),
        &["--upstream-ca", ca.pem.to_str().unwrap()],
    )
    .await;
    assert_eq!(get(by_ip.addr, "/v2/images").await.0.status(), 200);
    assert_eq!(echo.sni.lock().unwrap().last(), Some(&None));
}

async fn refused(upstream: &str, extra: &[&str]) -> (Shim, String) {
    let shim = Shim::start(upstream, extra).await;
    let (head, body) = get(shim.addr, "/v2/images").await;
    assert_eq!(head.status(), 502);
    assert_eq!(head.get("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (shim, body["message"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_is_a_502_that_names_the_name() {
    let ca = TestCa::new("real CA");
    let other = TestCa::new("other CA");
    let echo = Echo::start_tls(ca.server_config(false)).await;
    let upstream = format!("https://localhost:{}", echo.port());
    let (_shim, message) =
        refused(&upstream, &["--upstream-ca", other.pem.to_str().unwrap()]).await;
    assert!(message.contains("not trusted for localhost"), "{message}");
    assert!(
        message.contains("signed by a CA glance-shim does not trust"),
        "{message}"
    );
    assert!(message.contains("--upstream-ca"), "{message}");
    assert!(echo.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_upstream_certificate_is_a_502() {
    let ca = TestCa::new("expiry CA");
    let echo = Echo::start_tls(ca.server_config(true)).await;
    let upstream = format!("https://localhost:{}", echo.port());
    let (_shim, message) = refused(&upstream, &["--upstream-ca", ca.pem.to_str().unwrap()]).await;
    assert!(
        message.contains("not trusted for localhost") && message.contains("expired"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_speaks_plain_http_is_a_502_not_a_hang() {
    let echo = Echo::start().await;
    let (_shim, message) = refused(&format!("https://localhost:{}", echo.port()), &[]).await;
    assert!(
        message.contains("TLS handshake with the upstream"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_insecure_accepts_any_certificate_and_says_so() {
    let stranger = TestCa::new("self-signed somewhere");
    let echo = Echo::start_tls(stranger.server_config(true)).await;
    let shim = Shim::start(
        &format!("https://localhost:{}", echo.port()),
        &["--upstream-insecure"],
    )
    .await;
    shim.wait_for("the warning", |l| {
        field(l, "level") == "WARN" && msg(l).contains("--upstream-insecure")
    })
    .await;
    assert_eq!(get(shim.addr, "/v2/images").await.0.status(), 200);
}

#[tokio::test]
async fn unusable_tls_files_are_one_line_and_exit_2() {
    let ca = TestCa::new("files CA");
    let (cert, key) = ca.leaf(false);
    let (_, other_key) = ca.leaf(false);
    let dir = tempdir("tls-files");
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not pem\n").unwrap();
    let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    for (args, want) in [
        (
            vec![
                "--tls-cert".into(),
                p(&dir.join("missing.pem")),
                "--tls-key".into(),
                p(&key),
            ],
            "--tls-cert",
        ),
        (
            vec!["--tls-cert".into(), p(&junk), "--tls-key".into(), p(&key)],
            "no certificate",
        ),
        (
            vec!["--tls-cert".into(), p(&cert), "--tls-key".into(), p(&junk)],
            "no private key",
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&other_key),
            ],
            "does not belong",
        ),
        (vec!["--upstream-ca".into(), p(&junk)], "--upstream-ca"),
    ] {
        let upstream = if want == "--upstream-ca" {
            "https://localhost:1"
        } else {
            "1"
        };
        let out = shim_command()
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
