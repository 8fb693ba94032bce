//! Tests of fhir-cdc against the real stack. Everything lives in `tests/it/` (one test
//! binary); this library is empty. Start the stack with `integration-tests/stack/up`, then
//! `source integration-tests/stack/env` — or just run `make test`.
