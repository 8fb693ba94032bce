//! Any text as a connector configuration file: parsed and validated into a configuration
//! or refused with an error naming the place — never a panic.
//! Run: `make fuzz`, or `cargo +nightly fuzz run config_loader` from the repository root.
#![no_main]

use std::path::Path;

use fhir_cdc::config::ConnectorConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ConnectorConfig::parse(text, Path::new("fuzz/connector.toml"));
    }
});
