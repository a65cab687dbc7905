//! Fuzzes the uwsgi front's packet reader (--uwsgi): any bytes, no panic; a packet it accepts becomes
//! one HTTP/1.0 request head, with one line per header its variables name and no header (or end of
//! head) smuggled in by a CR or LF inside a variable.
#![no_main]

use glance_shim::packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<{ packet::HEADER_LEN }>() else { return };
    let Ok(len) = packet::vars_len(*header) else { return };
    let Some(vars) = rest.get(..len) else { return };
    let Ok(vars) = packet::vars(vars) else { return };
    let Ok(request) = packet::to_http(&vars) else { return };
    let head = &request.head;
    assert!(head.ends_with(b"\r\n\r\n"));
    // One line per header the variables named, and no more.
    let lines = head.split(|&b| b == b'\n').count() - 3; // the request line, the blank line, the end
    let named = vars
        .iter()
        .filter(|(k, v)| {
            (k.starts_with(b"HTTP_") && k.len() > 5 && !matches!(*k, b"HTTP_EXPECT" | b"HTTP_CONNECTION"
                | b"HTTP_KEEP_ALIVE" | b"HTTP_CONTENT_LENGTH" | b"HTTP_CONTENT_TYPE"))
                || *k == b"CONTENT_TYPE"
                || (*k == b"CONTENT_LENGTH" && !v.is_empty())
        })
        .count();
    assert!(lines >= named && lines <= named + 2, "{lines} lines for {named} headers");
    assert!(!head[..head.len() - 4].windows(4).any(|w| w == b"\r\n\r\n"), "the head ends early");
});
