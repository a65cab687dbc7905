//! Multi-gigabyte image uploads and downloads through the shim arrive intact (same sha256) while the
//! shim's memory stays flat: nothing is gathered in memory or on disk, and the inspector (on, as by
//! default) keeps only the first 64 KiB of each body.
//!
//! The quick tier moves 256 MiB each way; the long tier (`cargo test -- --ignored`) 5 GiB.

mod util;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use util::*;

/// The peak RSS README promises for a transfer of any size.
const RSS_LIMIT: u64 = 12 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarter_gibibyte_up_and_down_with_equal_sha256_and_flat_memory() {
    up_and_down(256 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 5 GiB each way"]
async fn five_gibibytes_up_and_down_with_equal_sha256_and_flat_memory() {
    up_and_down(5 << 30).await;
}

async fn up_and_down(n: u64) {
    let echo = Echo::start().await;
    let shim = Shim::start(&echo.port(), &[]).await;
    let expected = tokio::task::spawn_blocking(move || Pattern::sha256(n));

    // Upload the way glanceclient does: chunked, 1 MiB chunks, no size known.
    let mut conn = Conn::connect(shim.addr).await;
    conn.send(
        "PUT /v2/images/big/file HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let take = left.min(BLOCK as u64) as usize;
        conn.write_chunk(&Pattern::block(i)[..take]).await;
        left -= take as u64;
        i += 1;
    }
    conn.write_chunk(&[]).await;
    let head = conn.read_head().await;
    assert_eq!(head.status(), 200);
    let seen: serde_json::Value = serde_json::from_slice(&conn.read_body(&head).await).unwrap();
    let expected = expected.await.unwrap();
    assert_eq!(seen["body_len"], n, "upload length at the upstream");
    assert_eq!(
        seen["body_sha256"],
        expected.as_str(),
        "upload sha256 at the upstream"
    );

    // Download with Content-Length, as glance serves image data.
    let mut conn = Conn::connect(shim.addr).await;
    conn.send(&format!(
        "GET /download?bytes={n} HTTP/1.1\r\nHost: h\r\n\r\n"
    ))
    .await;
    let head = conn.read_head().await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.get("content-length"), Some(n.to_string().as_str()));
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while got < n {
        let want = (n - got).min(4 << 20) as usize;
        let part = conn.read_exact(want.min(1 << 20)).await;
        hasher.update(&part);
        got += part.len() as u64;
    }
    assert_eq!(got, n);
    assert_eq!(
        hex(&hasher.finalize()),
        expected,
        "download sha256 at the client"
    );
    conn.stream.shutdown().await.ok();

    // The inspector was on all along, and kept the start of each body and nothing more.
    shim.wait_for_nth("both completions", 2, completion).await;
    let upload = shim.api("/api/requests/0").await;
    assert_eq!(upload["request"]["body"]["size"], n);
    assert_eq!(upload["request"]["body"]["kept"], 65536);
    let download = shim.api("/api/requests/1").await;
    assert_eq!(download["response"]["body"]["kept"], 65536);

    let rss = shim.peak_rss();
    eprintln!(
        "{} MiB each way; shim peak RSS {:.1} MiB",
        n >> 20,
        rss as f64 / (1 << 20) as f64
    );
    assert!(rss < RSS_LIMIT, "peak RSS {rss} bytes is over {RSS_LIMIT}");
}
