//! Any bytes as a pgoutput message, read both outside and inside a streamed transaction:
//! the decoder must answer a message or a located error, never panic or over-allocate.
//! Run: `cargo +nightly fuzz run pgoutput_decoder` (from the repository root).
#![no_main]

use fhir_cdc::source::postgres::pgoutput::decode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, false);
    let _ = decode(data, true);
});
