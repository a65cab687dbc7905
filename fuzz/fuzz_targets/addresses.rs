//! Fuzzes the parsers behind --listen, --upstream and every duration flag: they must never panic, and
//! what they accept must print back to something that parses to the same value.
#![no_main]

use glance_shim::config::{parse_duration, HostPort, Upstream};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for allow_zero in [false, true] {
        if let Ok(addr) = HostPort::parse(text, allow_zero) {
            let again = HostPort::parse(&addr.to_string(), allow_zero).expect("a printed address parses");
            assert_eq!(addr, again);
            assert!(allow_zero || addr.port != 0);
        }
    }
    if let Ok(upstream) = Upstream::parse(text) {
        let again = Upstream::parse(&upstream.to_string()).expect("a printed upstream parses");
        assert_eq!(upstream, again);
        assert_ne!(upstream.addr.port, 0);
    }
    let _ = parse_duration(text);
});
