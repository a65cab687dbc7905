//! Fuzzes the header policy with arbitrary header blocks: hop-by-hop removal, forwarding fields, the
//! request id rules, Host checks and the masked log text (`mask`). Beyond not panicking, the invariants the
//! proxy relies on must hold for any input.
#![no_main]

use glance_shim::{correlation, headers, mask};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const HOP: [&str; 9] = [
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authorization", "proxy-authenticate",
];

fuzz_target!(|data: &[u8]| {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii())) else {
            continue;
        };
        map.append(name, value);
    }
    let listed: Vec<String> = map
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();

    // The log text is every field in order, each secret value replaced by <masked>.
    let expected: Vec<String> = map
        .iter()
        .map(|(name, value)| {
            let shown = if mask::is_secret_field(name.as_str()) { "<masked>".to_owned() } else { correlation::printable(value.as_bytes()).into_owned() };
            format!("{name}: {shown}")
        })
        .collect();
    assert_eq!(mask::for_log(&map), expected.join("; "));
    for name in ["x-auth-token", "x-subject-token", "x-service-token", "authorization", "proxy-authorization", "cookie", "set-cookie"] {
        assert!(mask::is_secret_field(name));
    }
    let _ = headers::has_our_via(&map);
    let _ = headers::check_host(&map, true);

    let mut forwarded = map.clone();
    headers::remove_hop_by_hop(&mut forwarded);
    for name in HOP {
        assert!(!forwarded.contains_key(name), "{name} survived");
    }
    for name in listed {
        if name != "keep-alive" && name != "close" {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                assert!(!forwarded.contains_key(&name), "{name} listed in Connection survived");
            }
        }
    }
    let assigned = correlation::assign(&mut forwarded);
    let ids: Vec<_> = forwarded.get_all(&correlation::X_OPENSTACK_REQUEST_ID).iter().collect();
    assert_eq!(ids.len(), 1, "exactly one request id goes to glance");
    assert!(ids[0].len() <= correlation::MAX_CLIENT_ID_LEN && !ids[0].is_empty());
    // Either the client's own id, or `req-` and a lowercase uuid.
    let shim_style = assigned.id.len() == 40
        && assigned.id.starts_with("req-")
        && assigned.id[4..].bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    assert!(assigned.from == correlation::IdFrom::Client || shim_style);

    let ip = HeaderValue::from_static("192.0.2.1");
    let host = forwarded.get("host").cloned();
    headers::add_forwarding(&mut forwarded, &headers::Forwarded { client_ip: &ip, proto: "http", host: host.as_ref() });
    assert!(headers::has_our_via(&forwarded));
    let xff = forwarded.get("x-forwarded-for").expect("x-forwarded-for set");
    assert!(xff.as_bytes().ends_with(b"192.0.2.1"));
    assert_eq!(forwarded.get_all("x-forwarded-for").iter().count(), 1);
});
