//! Any bytes as a run of binary-log events (a format description, table maps, rows events,
//! anything): the decoder behind the MySQL/MariaDB connector must answer changes or an
//! error that says which event did not read — never panic, loop or allocate by a count the
//! bytes cannot hold. Seeds: `fuzz/seeds/binlog_events` (a real MariaDB log of a table with
//! every column type, inserted, updated and deleted).
//! Run: `make fuzz`, or `cargo +nightly fuzz run binlog_events fuzz/seeds/binlog_events`.
#![no_main]

use fhir_cdc::source::mysql::binlog::decode_events;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_events("fuzz", data);
});
