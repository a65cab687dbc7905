//! Fuzzes the reader of DevStack's glance-uwsgi.ini (--takeover): any text, no panic, and an address
//! it returns is one glance-shim can listen on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(addr) = glance_shim::uwsgi::parse(text) {
        assert_ne!(addr.port, 0);
    }
});
