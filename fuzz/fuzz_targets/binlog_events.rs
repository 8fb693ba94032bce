//! Any bytes as a run of binary-log events (a format description, table maps, rows events,
//! anything): the decoder behind the MySQL/MariaDB connector must answer changes or an
//! error that says which event did not read — never panic, loop or allocate by a count the
//! bytes cannot hold. Seeds: `fuzz/seeds/binlog_events` (a real MariaDB log of a table with
//! every column type, inserted, updated and deleted).
//! Run: `make fuzz`, or `cargo +nightly fuzz run binlog_events fuzz/seeds/binlog_events`.
#![no_main]

use fhir_cdc::source::mysql::binlog::decode_events;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // The decoder catches mysql_common's panics on malformed events (each becomes an
        // error of its event); libfuzzer-sys's panic hook would abort at the panic, before
        // the catch. A quiet hook instead (caught panics are many): one nothing catches
        // still aborts the run, and its input is kept in fuzz/artifacts.
        std::panic::set_hook(Box::new(|_| {}));
    },
    |data: &[u8]| {
        let _ = decode_events("fuzz", data);
    }
);
