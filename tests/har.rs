//! The inspector's HAR export (`/api/har`), against the real binary: HAR 1.2's fields, masking,
//! truncated bodies, requests without a response, and the filter. (`tests/har/validate.py` checks the
//! same archives against the HAR 1.2 JSON schema.)

mod util;

use serde_json::Value;
use util::*;

const TOKEN: &str = "gAAAAABsecret-token-value";

async fn har(shim: &Shim, query: &str) -> (Head, Value) {
    let (head, body) = get(shim.inspector.unwrap(), &format!("/api/har{query}")).await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    (head, serde_json::from_slice(&body).unwrap())
}

fn entries(h: &Value) -> &Vec<Value> {
    h["log"]["entries"].as_array().unwrap()
}

/// `time` is the sum of the timings that are not -1, and none is below -1.
fn assert_timings_add_up(e: &Value) {
    let t = &e["timings"];
    let mut sum = 0.0;
    for k in [
        "blocked", "dns", "connect", "ssl", "send", "wait", "receive",
    ] {
        let v = t[k].as_f64().unwrap_or_else(|| panic!("timings.{k}: {t}"));
        assert!(v >= 0.0 || v == -1.0, "timings.{k} = {v}");
        if v > 0.0 {
            sum += v;
        }
    }
    for k in ["send", "wait", "receive"] {
        assert!(t[k].as_f64().unwrap() >= 0.0, "{k} is measured: {t}");
    }
    let time = e["time"].as_f64().unwrap();
    assert!((time - sum).abs() < 0.01, "time {time} != sum {sum}: {t}");
}

#[tokio::test]
async fn an_exchange_as_har_masked_with_glances_id_and_the_time_glance_took() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let body = r#"[{"op":"add","path":"/k","value":"v"},{"op":"add","path":"/admin_password","value":"hunter2"}]"#;
    let request = format!(
        "PATCH /v2/images/abc?limit=2&os_token=qs-secret HTTP/1.1\r\nHost: controller:9292\r\n\
         X-Auth-Token: {TOKEN}\r\nContent-Type: application/openstack-images-v2.1-json-patch\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut client, mut conn, _) = forwarded(&shim, &up, &request).await;
    conn.read_exact(body.len()).await;
    // glance "at a breakpoint": the wait is what HAR's `wait` shows.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let answer = r#"{"id":"abc","name":"cirros","token":"t0ken"}"#;
    conn.send(&format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-openstack-request-id: req-glance-own\r\n\
         Content-Length: {}\r\n\r\n{answer}",
        answer.len()
    ))
    .await;
    let head = client.read_head().await;
    client.read_body(&head).await;
    let done = shim.wait_for("the completion line", completion).await;

    let (head, h) = har(&shim, "").await;
    assert!(
        head.get("content-disposition").is_some_and(|d| d
            .starts_with("attachment; filename=\"glance-shim-")
            && d.ends_with(".har\"")),
        "{:?}",
        head.get("content-disposition")
    );
    let text = h.to_string();
    for secret in [TOKEN, "hunter2", "t0ken", "qs-secret"] {
        assert!(!text.contains(secret), "{secret} is in the archive: {text}");
    }
    assert_eq!(h["log"]["version"], "1.2");
    assert_eq!(h["log"]["creator"]["name"], "glance-shim");
    let e = &entries(&h)[0];
    assert_eq!(entries(&h).len(), 1);
    assert!(e["startedDateTime"].as_str().unwrap().ends_with('Z'));
    assert_timings_add_up(e);
    let wait = e["timings"]["wait"].as_f64().unwrap();
    assert!(wait >= 300.0, "wait is the time glance took: {wait}");
    assert_eq!(e["_request_id"], done["id"]);
    assert_eq!(e["_upstream_request_id"], "req-glance-own");
    assert_eq!(e["_outcome"], "completed");
    assert_eq!(e["_in_flight"], false);

    let req = &e["request"];
    assert_eq!(req["method"], "PATCH");
    assert_eq!(
        req["url"],
        "http://controller:9292/v2/images/abc?limit=2&os_token=%3Cmasked%3E"
    );
    assert_eq!(req["httpVersion"], "HTTP/1.1");
    assert_eq!(req["bodySize"], body.len());
    let qs: Vec<(&str, &str)> = req["queryString"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["value"].as_str().unwrap()))
        .collect();
    assert_eq!(qs, [("limit", "2"), ("os_token", "<masked>")]);
    let header = |m: &Value, name: &str| -> Option<String> {
        m["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .map(|h| h["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(header(req, "x-auth-token").as_deref(), Some("<masked>"));
    assert_eq!(
        header(req, "via").as_deref(),
        Some("1.1 glance-shim"),
        "what glance got"
    );
    let post = &req["postData"];
    assert_eq!(
        post["mimeType"],
        "application/openstack-images-v2.1-json-patch"
    );
    let sent: Value = serde_json::from_str(post["text"].as_str().unwrap()).unwrap();
    assert_eq!(sent[0]["value"], "v");
    assert_eq!(sent[1]["value"], "<masked>");
    assert!(post["comment"].as_str().unwrap().contains("masked"));
    assert_eq!(post["_kept"], body.len());
    assert!(post.get("_truncated").is_none());

    let res = &e["response"];
    assert_eq!(res["status"], 200);
    assert_eq!(res["statusText"], "OK");
    assert_eq!(res["content"]["size"], answer.len());
    assert_eq!(res["content"]["mimeType"], "application/json");
    let got: Value = serde_json::from_str(res["content"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(got["name"], "cirros");
    assert_eq!(got["token"], "<masked>");
    assert_eq!(
        header(res, "x-openstack-request-id").as_deref(),
        Some("req-glance-own")
    );
    assert_eq!(res["redirectURL"], "");
}

#[tokio::test]
async fn a_body_kept_in_part_keeps_its_real_size_and_says_it_was_cut() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let mib = 1 << 20;
    let mut conn = Conn::connect(shim.addr).await;
    conn.send(&format!(
        "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {mib}\r\n\r\n"
    ))
    .await;
    // Not UTF-8, so carried as base64.
    conn.write(&vec![0xffu8; mib]).await;
    let head = conn.read_head().await;
    assert_eq!(head.status(), 200);
    conn.read_body(&head).await;
    conn.send(&format!(
        "GET /download?bytes={mib} HTTP/1.1\r\nHost: h\r\n\r\n"
    ))
    .await;
    let head = conn.read_head().await;
    assert_eq!(conn.read_body(&head).await.len(), mib);
    shim.wait_for_nth("both completions", 2, completion).await;

    let (_, h) = har(&shim, "").await;
    let [upload, download] = &entries(&h)[..] else {
        panic!("two entries, oldest first: {h}")
    };
    assert_eq!(upload["request"]["bodySize"], mib, "the real size");
    let post = &upload["request"]["postData"];
    assert_eq!(post["_truncated"], true);
    assert_eq!(post["_kept"], 65536);
    assert_eq!(post["_encoding"], "base64");
    assert_eq!(post["mimeType"], "application/octet-stream");
    assert!(
        post["comment"]
            .as_str()
            .unwrap()
            .contains(&format!("first 65536 of {mib} bytes")),
        "{post}"
    );
    use base64::Engine as _;
    let kept = base64::engine::general_purpose::STANDARD
        .decode(post["text"].as_str().unwrap())
        .unwrap();
    assert_eq!(kept, vec![0xffu8; 65536], "the kept start, as it was");

    let content = &download["response"]["content"];
    assert_eq!(content["size"], mib);
    assert_eq!(download["response"]["bodySize"], mib);
    assert_eq!(content["_truncated"], true);
    assert_eq!(content["_kept"], 65536);
    assert!(
        content["text"].is_string(),
        "the kept start is carried: {content}"
    );
    for e in [upload, download] {
        assert_timings_add_up(e);
    }
}

#[tokio::test]
async fn a_request_without_a_response_has_status_0_and_an_error() {
    let up = RawUpstream::bind().await;
    let shim = Shim::start(&up.port(), &[]).await;
    let (client, _conn, _) = forwarded(
        &shim,
        &up,
        "GET /v2/images/held HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await;
    // Held: in the archive, in flight, without a response yet.
    let (_, h) = har(&shim, "").await;
    let e = &entries(&h)[0];
    assert_eq!(e["_in_flight"], true);
    assert_eq!(e["response"]["status"], 0);
    assert!(
        e["response"]["_error"]
            .as_str()
            .unwrap()
            .contains("still in flight"),
        "{e}"
    );
    assert_eq!(e["_outcome"], Value::Null);
    assert_timings_add_up(e);

    // The client gives up: it never got a response.
    drop(client);
    shim.wait_for("the completion line", completion).await;
    let (_, h) = har(&shim, "").await;
    let e = &entries(&h)[0];
    assert_eq!(e["_in_flight"], false);
    assert_eq!(e["_outcome"], "client_gone");
    assert_eq!(e["response"]["status"], 0);
    assert!(
        e["response"]["_error"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    assert_timings_add_up(e);
}

#[tokio::test]
async fn the_filter_is_the_pages() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for path in ["/v2/images/a", "/v2/images/b", "/v2/schemas/image"] {
        let (head, _) = get(shim.addr, path).await;
        assert_eq!(head.status(), 200);
    }
    shim.wait_for_nth("three completions", 3, completion).await;
    let urls = |h: &Value| -> Vec<String> {
        entries(h)
            .iter()
            .map(|e| {
                e["request"]["url"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(urls(&har(&shim, "").await.1), ["a", "b", "image"]);
    assert_eq!(urls(&har(&shim, "?filter=images").await.1), ["a", "b"]);
    assert_eq!(urls(&har(&shim, "?filter=path%3A%2Fb").await.1), ["b"]);
    assert_eq!(
        urls(&har(&shim, "?filter=STATUS:200+schemas").await.1),
        ["image"]
    );
    assert!(urls(&har(&shim, "?filter=method:put").await.1).is_empty());
}

#[tokio::test]
async fn glance_shim_har_fetches_the_archive_and_says_when_no_inspector_answers() {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    for path in ["/v2/images/a", "/v2/images/b"] {
        assert_eq!(get(shim.addr, path).await.0.status(), 200);
    }
    shim.wait_for_nth("two completions", 2, completion).await;
    let inspector = shim.inspector.unwrap().to_string();
    let dir = tempdir("har");
    let file = dir.join("session.har");
    let out = shim_command()
        .args([
            "har",
            "--inspector",
            &inspector,
            "--filter",
            "path:/b",
            "-o",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let urls: Vec<&str> = entries(&h)
        .iter()
        .map(|e| e["request"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls.len(), 1);
    assert!(urls[0].ends_with("/v2/images/b"), "{urls:?}");

    // To standard output, everything.
    let out = shim_command()
        .args(["har", "--inspector", &inspector])
        .output()
        .unwrap();
    assert!(out.status.success());
    let h: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(entries(&h).len(), 2);

    // Nothing there: one line that says what to do, and status 1.
    let nobody = Reserved::new();
    let out = shim_command()
        .args(["har", "--inspector", &nobody.port_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no inspector answers at 127.0.0.1:") && err.contains("--inspector"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // A bad flag is a usage error, status 2, as for the proxy's own flags.
    let out = shim_command().args(["har", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // And the proxy's flags do not mix with it.
    let out = shim_command()
        .args(["--listen", "1", "har"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
