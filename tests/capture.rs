//! Capture to disk (`--capture DIR`), against the real binary: file modes and masking, history after a
//! restart, SIGKILL, truncated and corrupt files, the size bound, `--capture-body`, and
//! `glance-shim har DIR`.

mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use util::*;

const TOKEN: &str = "gAAAAABcaptured-token-value";

/// Every record in the capture files in `dir`, oldest file first (whole records only), read here
/// from the format's description rather than by the shim's reader: the first line's JSON, with
/// each head as its text, each body's bytes as `text` (and as `json` when they parse), and the
/// record's size on disk as `size`.
fn captured(dir: &Path) -> Vec<Value> {
    let mut records = Vec::new();
    for f in files(dir) {
        let bytes = std::fs::read(f).unwrap();
        let mut at = 0;
        while let Some(nl) = bytes[at..].iter().position(|&b| b == b'\n') {
            let first = &bytes[at..at + nl];
            let Ok(mut v) = serde_json::from_slice::<Value>(first) else {
                break;
            };
            let mut from = at + nl + 1;
            let mut section = |len: &Value| {
                let len = len.as_u64().unwrap() as usize;
                let part = bytes.get(from..from + len).map(<[u8]>::to_vec);
                from += len;
                part
            };
            let mut whole = true;
            for head in ["request_head", "response_head"] {
                if !v[head].is_null() {
                    match section(&v[head]) {
                        Some(b) => v[head] = String::from_utf8_lossy(&b).into(),
                        None => whole = false,
                    }
                }
            }
            for body in ["request_body", "response_body"] {
                if !v[body].is_null() {
                    match section(&v[body]["len"]) {
                        Some(b) => {
                            if let Ok(json) = serde_json::from_slice::<Value>(&b) {
                                v[body]["json"] = json;
                            }
                            v[body]["text"] = String::from_utf8_lossy(&b).into();
                        }
                        None => whole = false,
                    }
                }
            }
            if !whole || bytes.get(from) != Some(&b'\n') {
                break; // torn
            }
            v["size"] = (from + 1 - at).into();
            records.push(v);
            at = from + 1;
        }
    }
    records
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rec"))
        .collect();
    files.sort();
    files
}

/// Waits until `dir` holds `n` captured requests.
///
/// The writer thread has no signal a test can wait on but the file itself, so this reads it every
/// 10 ms, until [`PATIENCE`] has passed.
async fn wait_captured(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        let lines = captured(dir);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{n} requests were not captured in {}: {:?}",
        dir.display(),
        captured(dir)
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn patch_with_secrets() -> String {
    let body = r#"[{"op":"add","path":"/k","value":"v"},{"op":"add","path":"/db_password","value":"hunter2"}]"#;
    format!(
        "PATCH /v2/images/abc HTTP/1.1\r\nHost: controller\r\nX-Auth-Token: {TOKEN}\r\n\
         Content-Type: application/openstack-images-v2.1-json-patch\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn har_of(dir: &Path, extra: &[&str]) -> (Value, String) {
    let out = shim_command()
        .arg("har")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_capture_is_private_masked_and_shown_again_after_a_restart() {
    let echo = Echo::start().await;
    let dir = tempdir("capture").join("new");
    let dir_s = dir.to_str().unwrap();
    let first = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    let (head, _) = roundtrip(first.addr, &patch_with_secrets()).await;
    assert_eq!(head.status(), 200);
    let done = first.wait_for("the completion line", completion).await;
    let lines = wait_captured(&dir, 1).await;

    assert_eq!(mode(&dir), 0o700, "the directory it made");
    for f in files(&dir) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
        // Bodies are written as they are (or masked): the file's bytes are what to look in.
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        assert!(!text.contains(TOKEN), "the token was written: {text}");
        assert!(
            !text.contains("hunter2"),
            "the password was written: {text}"
        );
    }
    let line = &lines[0];
    assert_eq!(line["id"], done["id"]);
    assert_eq!(line["method"], "PATCH");
    assert_eq!(line["outcome"], "completed");
    let request_head = line["request_head"].as_str().unwrap();
    assert!(
        request_head.contains("\nx-auth-token:<masked>\n"),
        "{request_head}"
    );
    assert_eq!(line["request_body"]["masked"], true);
    // A JSON body is written as it is, masked.
    assert_eq!(line["request_body"]["json"][0]["value"], "v");
    assert_eq!(line["request_body"]["json"][1]["value"], "<masked>");
    drop(first);

    // The same directory again: the history is shown, marked as from disk.
    let second = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    let read = second
        .wait_for("the history line", |l| {
            msg(l).starts_with("read 1 captured")
        })
        .await;
    assert_eq!(read["shown"], 1);
    let list = second.api("/api/requests").await;
    let recent = list["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["id"], done["id"]);
    assert_eq!(recent[0]["from_disk"], true);
    assert_eq!(recent[0]["status"], 200);
    assert_eq!(recent[0]["bytes_in"], line["bytes_in"]);
    let serial = recent[0]["serial"].as_u64().unwrap();
    let d = second.api(&format!("/api/requests/{serial}")).await;
    assert_eq!(d["request"]["body"]["json"][1]["value"], "<masked>");
    assert_eq!(d["request"]["body"]["json"][0]["value"], "v");
    assert!(
        d["request"]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-auth-token" && h[1] == "<masked>")
    );

    // New requests go to a new file beside the old one.
    assert_eq!(get(second.addr, "/v2/images").await.0.status(), 200);
    wait_captured(&dir, 2).await;
    assert_eq!(files(&dir).len(), 2);

    // And `glance-shim har DIR` reads both.
    let (h, stderr) = har_of(&dir, &[]);
    assert!(stderr.is_empty(), "{stderr}");
    let entries = h["log"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["_request_id"], done["id"]);
    assert_eq!(entries[0]["_from_disk"], true);
    let text = h.to_string();
    assert!(!text.contains(TOKEN) && !text.contains("hunter2"), "{text}");
    let (h, _) = har_of(&dir, &["--filter", "method:patch"]);
    assert_eq!(h["log"]["entries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn sigkill_loses_at_most_the_last_100_ms_and_a_torn_or_corrupt_file_is_named() {
    let echo = Echo::start().await;
    let dir = tempdir("capture").join("kill");
    let dir_s = dir.to_str().unwrap();
    let shim = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    let mut conn = Conn::connect(shim.addr).await;
    for i in 0..20 {
        conn.send(&format!("GET /v2/images/{i} HTTP/1.1\r\nHost: h\r\n\r\n"))
            .await;
        let head = conn.read_head().await;
        conn.read_body(&head).await;
    }
    shim.wait_for_nth("every completion", 20, completion).await;
    // The bound README gives for what a kill -9 may lose: its length is what is tested.
    tokio::time::sleep(Duration::from_millis(100)).await;
    shim.signal("KILL");
    let mut shim = shim;
    shim.exit_status().await;
    let lines = captured(&dir);
    let targets: Vec<String> = lines.iter().map(|l| l["target"].to_string()).collect();
    let sent: Vec<String> = (0..20).map(|i| format!("\"/v2/images/{i}\"")).collect();
    assert_eq!(targets, sent, "every request, in order, in the file alone");
    let (h, _) = har_of(&dir, &[]);
    assert_eq!(h["log"]["entries"].as_array().unwrap().len(), 20);

    // A line torn by a crash, and a file that is not a capture at all.
    let file = files(&dir)
        .into_iter()
        .rfind(|f| std::fs::metadata(f).unwrap().len() > 0)
        .unwrap();
    let mut text = std::fs::read(&file).unwrap();
    text.extend_from_slice(br#"{"v":2,"id":"req-torn","meth"#);
    std::fs::write(&file, &text).unwrap();
    let corrupt = dir.join("capture-00000000T000000.000000Z-1.rec");
    std::fs::write(&corrupt, b"\x00\x01 not json\n").unwrap();

    let again = Shim::start(&echo.port(), &["--capture", dir_s]).await;
    let file_name = file.file_name().unwrap().to_str().unwrap();
    let torn = again
        .wait_for("the warning about the torn line", |l| {
            msg(l).contains(file_name) && msg(l).contains("the rest was read")
        })
        .await;
    assert_eq!(torn["level"], "WARN");
    again
        .wait_for("the warning about the corrupt file", |l| {
            msg(l).contains("capture-00000000T000000.000000Z-1.rec")
        })
        .await;
    let recent = again.api("/api/requests").await["recent"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(recent, lines.len(), "every good line is shown");

    let (h, stderr) = har_of(&dir, &[]);
    assert_eq!(h["log"]["entries"].as_array().unwrap().len(), lines.len());
    assert!(stderr.contains(file_name), "{stderr}");
    assert!(
        stderr.contains("capture-00000000T000000.000000Z-1.rec"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_directory_stays_within_capture_max_the_oldest_going_first() {
    let echo = Echo::start().await;
    let dir = tempdir("capture").join("bound");
    let max = 64 * 1024;
    let shim = Shim::start(
        &echo.port(),
        &["--capture", dir.to_str().unwrap(), "--capture-max", "64KiB"],
    )
    .await;
    let mut conn = Conn::connect(shim.addr).await;
    let n = 300;
    for i in 0..n {
        conn.send(&format!(
            "GET /download?bytes=1000&i={i} HTTP/1.1\r\nHost: h\r\n\r\n"
        ))
        .await;
        let head = conn.read_head().await;
        conn.read_body(&head).await;
    }
    shim.wait_for_nth("every completion", n, completion).await;
    // The last one written: the newest request is there, the first is long gone.
    wait_target(&dir, &format!("/download?bytes=1000&i={}", n - 1)).await;
    let lines = captured(&dir);
    assert!(
        lines
            .iter()
            .any(|l| l["target"] == format!("/download?bytes=1000&i={}", n - 1))
    );
    assert!(
        !lines
            .iter()
            .any(|l| l["target"] == "/download?bytes=1000&i=0")
    );
    assert!(lines.len() < n, "{} lines kept", lines.len());
    let total: u64 = files(&dir)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let longest = lines
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(
        total <= max + longest,
        "{total} bytes in {} files, over --capture-max",
        files(&dir).len()
    );
}

#[tokio::test]
async fn capture_body_keeps_whole_uploads_of_that_size() {
    let echo = Echo::start().await;
    let mib = 1 << 20;
    let upload = format!(
        "PUT /v2/images/x/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {mib}\r\n\r\n"
    );
    for (flags, kept, complete) in [
        (
            &["--capture-body", "2MiB", "--inspect-memory", "8MiB"][..],
            mib,
            true,
        ),
        (&[][..], 65536, false),
        // With no inspector, the copies made for the capture are still held to --inspect-memory:
        // what fits of the body is written, and marked as cut short.
        (
            &[
                "--inspect",
                "off",
                "--capture-body",
                "2MiB",
                "--inspect-memory",
                "256KiB",
            ][..],
            256 << 10,
            false,
        ),
    ] {
        let dir = tempdir("capture").join("body");
        let mut args = vec!["--capture", dir.to_str().unwrap()];
        args.extend_from_slice(flags);
        let shim = Shim::start(&echo.port(), &args).await;
        let mut conn = Conn::connect(shim.addr).await;
        conn.send(&upload).await;
        conn.write(&vec![7u8; mib]).await;
        let head = conn.read_head().await;
        assert_eq!(head.status(), 200);
        conn.read_body(&head).await;
        let line = &wait_captured(&dir, 1).await[0];
        let body = &line["request_body"];
        let bytes = body["text"].as_str().unwrap().as_bytes();
        // Cut by the memory: as many whole frames as fit, however the body was read.
        let by_memory = flags.contains(&"256KiB");
        match by_memory {
            true => assert!(!bytes.is_empty() && bytes.len() <= kept, "{}", bytes.len()),
            false => assert_eq!(bytes.len(), kept, "{flags:?}"),
        }
        assert!(bytes.iter().all(|&b| b == 7));
        assert_eq!(body["complete"], complete, "{flags:?}");
        let short = body["short"].as_str().unwrap_or_default();
        assert_eq!(short.contains("--inspect-memory"), by_memory, "{short}");
        assert_eq!(line["bytes_in"], mib);
    }
}

#[tokio::test]
async fn a_directory_others_can_read_is_refused_with_status_2() {
    let dir = tempdir("capture"); // made with the umask's 0755
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let down = Reserved::new();
    let mut shim = Shim::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &down.port_str(),
            "--capture",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    let status = shim.exit_status().await;
    assert_eq!(status.code(), Some(2));
    let log = shim.dump();
    assert!(
        log.contains("--capture") && log.contains("chmod 700"),
        "{log}"
    );
}

/// Waits until a captured request has `target`.
async fn wait_target(dir: &Path, target: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if captured(dir).iter().any(|r| r["target"] == target) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{target} was not captured in {}", dir.display());
}

#[tokio::test]
async fn a_capture_file_truncated_by_someone_else_loses_what_it_held_and_capturing_goes_on() {
    let echo = Echo::start().await;
    let dir = tempdir("capture").join("truncated");
    let shim = Shim::start(&echo.port(), &["--capture", dir.to_str().unwrap()]).await;
    let get = |i: usize| format!("GET /download?bytes=100&i={i} HTTP/1.1\r\nHost: h\r\n\r\n");
    for i in 0..3 {
        let (head, _) = roundtrip(shim.addr, &get(i)).await;
        assert_eq!(head.status(), 200);
    }
    wait_target(&dir, "/download?bytes=100&i=2").await;
    let file = files(&dir).pop().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    // Appended to, the file goes on from its new end: what follows is captured whole.
    for i in 3..6 {
        let (head, _) = roundtrip(shim.addr, &get(i)).await;
        assert_eq!(head.status(), 200, "request {i} after the truncation");
    }
    wait_target(&dir, "/download?bytes=100&i=5").await;
    let targets: Vec<String> = captured(&dir)
        .iter()
        .map(|l| l["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        targets,
        (3..6)
            .map(|i| format!("/download?bytes=100&i={i}"))
            .collect::<Vec<_>>()
    );
}
