//! Tests of fhir-cdc against the real stack: `tests/it/` (one test binary, the tests that
//! share the stack) and `tests/faults/` (the tests that freeze or restart its services,
//! one at a time). This library holds what both use: where the stack is ([`stack`]) and a
//! `fhir-cdc run` process under test ([`connector`]). Start the stack with
//! `integration-tests/stack/up`, then `source integration-tests/stack/env` — or just run
//! `make test`.

pub mod connector;
pub mod stack;
