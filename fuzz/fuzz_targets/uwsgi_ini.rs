//! Fuzzes the reader of DevStack's uWSGI files (--takeover): any text, no panic, and an address it
//! returns is one glance-shim can listen on.
#![no_main]

use glance_shim::config::Listen;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(address) = glance_shim::uwsgi::parse(text) {
        match address.listen {
            Listen::Tcp(addr) => assert_ne!(addr.port, 0),
            Listen::Unix(path) => assert!(path.is_absolute()),
        }
    }
});
