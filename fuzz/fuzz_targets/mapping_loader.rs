//! Any bytes as a mapping file: the loader must answer Ok or a located error, never panic.
//! Run: `cargo +nightly fuzz run mapping_loader` (from the repository root).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fhir_cdc::mapping::load_str(Path::new("fuzz.yaml"), text);
    }
});
