//! Replay (`POST /api/replay`, `glance-shim replay`), against the real binary: through the proxy with
//! a new id and the original token, edited, refused with a reason, and guarded (key, Host, Origin,
//! POST only) so that nothing reaches the upstream when it is refused.

mod util;

use std::net::SocketAddr;

use serde_json::{Value, json};
use util::*;

const TOKEN: &str = "gAAAAABreplay-token-value";

fn patch(body: &str) -> String {
    format!(
        "PATCH /v2/images/abc HTTP/1.1\r\nHost: controller:9292\r\nX-Auth-Token: {TOKEN}\r\n\
         Content-Type: application/openstack-images-v2.1-json-patch\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A raw POST to the inspector: `(status, JSON body)`. (Boxed: inline, the tests' futures would
/// outgrow a test thread's stack in debug builds.)
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    Box::pin(post_inner(addr, path, headers, body)).await
}

async fn post_inner(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Value) {
    let mut conn = Conn::connect(addr).await;
    let mut head = format!("POST {path} HTTP/1.1\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str("Host: localhost\r\n");
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    conn.send(&format!("{head}\r\n{body}")).await;
    let res = conn.read_head().await;
    let raw = conn.read_body(&res).await;
    (
        res.status(),
        serde_json::from_slice(&raw).unwrap_or(Value::Null),
    )
}

async fn replay(shim: &Shim, ask: Value) -> (u16, Value) {
    let key = shim.key.clone().unwrap();
    post(
        shim.inspector.unwrap(),
        "/api/replay",
        &[
            ("X-Glance-Shim-Key", &key),
            ("Content-Type", "application/json"),
        ],
        &ask.to_string(),
    )
    .await
}

#[tokio::test]
async fn a_replay_goes_through_the_proxy_with_a_new_id_and_the_original_token() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &["--log-headers"]).await;
    let body = r#"[{"op":"add","path":"/k","value":"v"}]"#;
    let (mut client, mut conn, first) = forwarded(&shim, &up, &patch(body)).await;
    assert_eq!(conn.read_exact(body.len()).await, body.as_bytes());
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        .await;
    let head = client.read_head().await;
    client.read_body(&head).await;
    let original = shim.wait_for("the completion line", completion).await;
    let original_id = original["id"].as_str().unwrap().to_owned();

    let (status, started) = replay(&shim, json!({"of": original_id})).await;
    assert_eq!(status, 202, "{started}");
    let new_id = started["id"].as_str().unwrap().to_owned();
    assert!(new_id.starts_with("req-") && new_id != original_id);
    assert_eq!(started["replay_of"], 0);

    // glance gets it on the pooled connection, with the token it first came with and a new id.
    let again = conn.read_head().await;
    assert_eq!(again.get("x-auth-token"), Some(TOKEN));
    assert_eq!(again.get("x-openstack-request-id"), Some(new_id.as_str()));
    assert_eq!(again.get("via"), Some("1.1 glance-shim"));
    assert_eq!(again.get("host"), first.get("host"));
    assert_eq!(again.get("content-type"), first.get("content-type"));
    assert_eq!(conn.read_exact(body.len()).await, body.as_bytes());
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        .await;

    let done = shim
        .wait_for("the replay's completion", |l| {
            completion(l) && l["id"] == new_id
        })
        .await;
    assert_eq!(done["outcome"], "completed");
    let arrived = shim
        .wait_for("the replay's arrival", |l| {
            msg(l) == "arrived" && l["id"] == new_id
        })
        .await;
    assert_eq!(arrived["replay_of"], original_id.as_str());
    assert!(
        !arrived["headers"].as_str().unwrap_or("").contains(TOKEN),
        "the token is masked in the log as ever"
    );
    let r = shim.api(&format!("/api/requests/{new_id}")).await;
    assert_eq!(r["replay_of"], 0);
    assert_eq!(r["replay_of_id"], original_id.as_str());
    assert_eq!(r["status"], 200);
    assert_eq!(r["bytes_in"], body.len());
}

#[tokio::test]
async fn an_edited_replay_sends_the_edits_and_keeps_a_masked_token() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let (mut client, mut conn, _) = forwarded(&shim, &up, &patch("[]")).await;
    conn.read_exact(2).await;
    conn.send("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        .await;
    let head = client.read_head().await;
    client.read_body(&head).await;
    shim.wait_for("the completion line", completion).await;

    let edited = r#"[{"op":"add","path":"/k","value":"edited"}]"#;
    let (status, started) = replay(
        &shim,
        json!({
            "of": "0",
            "method": "PATCH",
            "target": "/v2/images/other?x=1",
            "headers": [["Host", "controller:9292"], ["X-Auth-Token", "<masked>"],
                        ["Content-Type", "application/openstack-images-v2.1-json-patch"],
                        ["X-Extra", "yes"], ["Content-Length", "999"]],
            "body": edited,
        }),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let head = conn.read_head().await;
    assert_eq!(head.start, "PATCH /v2/images/other?x=1 HTTP/1.1");
    assert_eq!(
        head.get("x-auth-token"),
        Some(TOKEN),
        "<masked> keeps the original"
    );
    assert_eq!(head.get("x-extra"), Some("yes"));
    assert_eq!(
        head.get("content-length"),
        Some(edited.len().to_string().as_str()),
        "the length is the edited body's"
    );
    assert_eq!(conn.read_exact(edited.len()).await, edited.as_bytes());
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
    shim.wait_for_nth("both completions", 2, completion).await;

    // A fresh token replaces the one it came with.
    let (status, _) = replay(&shim, json!({"of": "0", "token": "fresh-token-123"})).await;
    assert_eq!(status, 202);
    let head = conn.read_head().await;
    assert_eq!(head.get("x-auth-token"), Some("fresh-token-123"));
    conn.read_exact(2).await;
    conn.send("HTTP/1.1 204 No Content\r\n\r\n").await;
}

#[tokio::test]
async fn refused_replays_say_why_and_reach_nothing() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let mib = 1 << 20;
    let (head, _) = roundtrip(
        shim.addr,
        &format!(
            "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {mib}\r\n\r\n{}",
            "x".repeat(mib)
        ),
    )
    .await;
    assert_eq!(head.status(), 200);
    assert_eq!(get(shim.addr, "/v2/images").await.0.status(), 200);
    shim.wait_for_nth("both completions", 2, completion).await;
    let seen = echo.requests().len();
    let key = shim.key.clone().unwrap();
    let inspector = shim.inspector.unwrap();
    let ask = json!({"of": "1"}).to_string();
    let json_ct = ("Content-Type", "application/json");

    // The guards.
    // What is sent, the fields it carries, the status it gets, a word the answer says.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no key", vec![json_ct], 403, "key"),
        (
            "a wrong key",
            vec![("X-Glance-Shim-Key", "nope"), json_ct],
            403,
            "key",
        ),
        (
            "a foreign Host",
            vec![
                ("Host", "evil.example:9293"),
                ("X-Glance-Shim-Key", &key),
                json_ct,
            ],
            403,
            "localhost",
        ),
        (
            "another origin",
            vec![
                ("Origin", "http://evil.example"),
                ("X-Glance-Shim-Key", &key),
                json_ct,
            ],
            403,
            "evil.example",
        ),
        (
            "a form post",
            vec![("X-Glance-Shim-Key", &key), ("Content-Type", "text/plain")],
            415,
            "JSON",
        ),
    ];
    for (what, headers, want, says) in cases {
        let (status, body) = post(inspector, "/api/replay", &headers, &ask).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{what}: {body}"
        );
    }
    let (res, _) = get(inspector, "/api/replay").await;
    assert_eq!(res.status(), 405);
    assert_eq!(res.get("allow"), Some("POST"));

    // What cannot be sent as it was.
    let cases = [
        (json!({"of": "0"}), 409, "streamed, not kept"),
        (json!({"of": "0"}), 409, "--capture-body"),
        (
            json!({"of": "1", "target": "http://elsewhere/"}),
            400,
            "not a path",
        ),
        (json!({"of": "99"}), 404, "no request 99"),
        (
            json!({"of": "1", "method": "BAD METHOD"}),
            400,
            "not a method",
        ),
        (json!({"of": "1", "surprise": 1}), 400, "unknown field"),
    ];
    for (ask, want, says) in cases {
        let (status, body) = replay(&shim, ask.clone()).await;
        assert_eq!(status, want, "{ask}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{ask}: {body}"
        );
    }
    assert_eq!(
        shim.api("/api/requests").await["recent"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "a refused replay is no request"
    );

    // Then one that is sent, through the same path. A replay is numbered before its answer goes back
    // and before anything of it goes upstream, so this one's number, next after the two requests
    // above, shows that no refused one entered the path; and by its completion, what glance got is
    // counted up to and including it.
    let (status, sent) = replay(&shim, json!({"of": "1"})).await;
    assert_eq!(status, 202, "{sent}");
    assert_eq!(sent["serial"], 2, "no refused replay took a number: {sent}");
    let id = sent["id"].as_str().unwrap().to_owned();
    shim.wait_for("the replay's completion", |l| {
        completion(l) && l["id"] == id
    })
    .await;
    let got = echo.requests();
    assert_eq!(got.len(), seen + 1, "a refused replay reaches nothing");
    assert!(
        got.last()
            .unwrap()
            .headers
            .iter()
            .any(|(k, v)| { k.eq_ignore_ascii_case("x-openstack-request-id") && *v == id }),
        "what glance got last is the replay that was sent"
    );
    assert_eq!(
        shim.api("/api/requests").await["recent"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "and is no request"
    );
}

#[tokio::test]
async fn a_request_still_in_flight_is_not_replayed() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let (_client, _conn, _) =
        forwarded(&shim, &up, "GET /v2/images HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let (status, body) = replay(&shim, json!({"of": "0"})).await;
    assert_eq!(status, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("still in flight"),
        "{body}"
    );
}

#[tokio::test]
async fn a_request_read_back_from_disk_needs_a_fresh_token() {
    let echo = Echo::start().await;
    let dir = tempdir("replay").join("capture");
    let dir_s = dir.to_str().unwrap();
    let mut first = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    let (head, _) = roundtrip(first.addr, &patch("[]")).await;
    assert_eq!(head.status(), 200);
    first.wait_for("the completion line", completion).await;
    // A graceful stop writes every record handed to the capture, and a record is handed to it
    // before its completion line is logged.
    first.signal("TERM");
    assert!(first.exit_status().await.success(), "{}", first.dump());
    drop(first);

    let second = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    second
        .wait_for("the history", |l| msg(l).starts_with("read 1 captured"))
        .await;
    let serial = second.api("/api/requests").await["recent"][0]["serial"]
        .as_u64()
        .unwrap();
    let seen = echo.requests().len();
    let (status, body) = replay(&second, json!({"of": serial.to_string()})).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("give a fresh one"),
        "{body}"
    );
    assert_eq!(echo.requests().len(), seen);

    let (status, body) = replay(
        &second,
        json!({"of": serial.to_string(), "token": "fresh-token-456"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // A replay is numbered before its answer goes back: this one's number, next after the request
    // read back, shows the refused one entered no path; and by its completion, what glance got is
    // counted up to and including it.
    assert_eq!(body["serial"], serial + 1, "the refused one took no number");
    let id = body["id"].as_str().unwrap().to_owned();
    second
        .wait_for("the replay's completion", |l| {
            completion(l) && l["id"] == id
        })
        .await;
    assert_eq!(
        echo.requests().len(),
        seen + 1,
        "the refused one reached nothing"
    );
    let got = echo.requests().pop().unwrap();
    assert!(
        got.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x-auth-token") && v == "fresh-token-456"),
        "{:?}",
        got.headers
    );
}

#[tokio::test]
async fn glance_shim_replay_asks_the_running_shim_and_waits_for_the_answer() {
    let echo = Echo::start().await;
    let run = tempdir("replay-run");
    let run_s = run.to_str().unwrap();
    let shim = Shim::start_with_env(&echo.port(), &[], &[("XDG_RUNTIME_DIR", run_s)]).await;
    let (head, _) = roundtrip(shim.addr, &patch("[]")).await;
    assert_eq!(head.status(), 200);
    let original = shim.wait_for("the completion line", completion).await;
    let inspector = shim.inspector.unwrap().to_string();

    // The key is read from the file the shim wrote, 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let key_file = run.join(format!(
        "glance-shim/inspector-{}.key",
        shim.inspector.unwrap().port()
    ));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);
    assert_eq!(mode(key_file.parent().unwrap()), 0o700);

    // Run beside this test's runtime, which serves the upstream meanwhile.
    let mut cmd = shim_command();
    cmd.env("XDG_RUNTIME_DIR", run_s).args([
        "replay",
        original["id"].as_str().unwrap(),
        "--inspector",
        &inspector,
    ]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let new_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        new_id.starts_with("req-") && new_id != original["id"],
        "{new_id}"
    );
    assert!(
        stderr.contains(&format!("{new_id}: 200, completed")),
        "{stderr}"
    );
    assert_eq!(echo.requests().len(), 2);

    // A wrong key: refused, one line, status 1, nothing sent.
    let out = shim_command()
        .args(["replay", "0", "--inspector", &inspector, "--key", "wrong"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("403") && err.contains("key"), "{err}");
    assert_eq!(echo.requests().len(), 2);

    // The key goes with the run: no key of a run that is over stays on disk.
    let mut shim = shim;
    shim.signal("TERM");
    assert!(shim.exit_status().await.success());
    assert!(!key_file.exists(), "the key file outlived the shim");
}
