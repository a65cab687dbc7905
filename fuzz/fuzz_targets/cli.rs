//! Fuzzes the whole command line: NUL-separated arguments through clap and the configuration checks.
//! It must answer with a configuration, help text or one usage line, never panic.
#![no_main]

use glance_shim::cli::{parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let args = std::iter::once("glance-shim").chain(text.split('\0'));
    if let Parsed::Usage(line) = parse(args) {
        assert!(!line.contains('\n'), "usage errors are one line: {line:?}");
        assert!(line.starts_with("glance-shim: "));
    }
});
