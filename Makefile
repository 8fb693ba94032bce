# The two commands a newcomer needs (see README.md), and the stack's own.
.PHONY: demo test lint fuzz stack-up stack-down stack-status

# Bring the stack up, load the sample lab database, capture it into Kafka and play a short
# story on it (integration-tests/fixtures/demo); then check the MySQL reference connector.
demo: stack-up
	cargo build --release --bin fhir-cdc
	@integration-tests/stack/status
	integration-tests/fixtures/demo
	@echo
	@. integration-tests/stack/env && target/release/fhir-cdc check --config connectors/billing-mysql.toml

# Bring the stack up if needed, then run every test: unit tests and the integration tests
# against the real stack.
test: stack-up
	integration-tests/oracles/setup
	cargo build --bin fhir-cdc
	target/debug/fhir-cdc schemas check
	for mappings in mappings/*/; do target/debug/fhir-cdc check --mappings $$mappings || exit 1; done
	. integration-tests/stack/env && cargo test --workspace

# Formatting and clippy, warnings as errors (CI runs this before the tests).
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# Each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS, with the nightly toolchain and
# cargo-fuzz (installed from crates.io when missing). Not part of `test`: a minute per
# target is more than CI's budget allows; a crash stops it with the input in fuzz/artifacts.
# Seeds kept in the repository (fuzz/seeds/<target>: real inputs) join each target's corpus.
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
	for target in $$(cargo +nightly fuzz list); do \
	  mkdir -p fuzz/corpus/$$target; \
	  cargo +nightly fuzz run $$target fuzz/corpus/$$target $$(ls -d fuzz/seeds/$$target 2>/dev/null) \
	    -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

stack-up:
	integration-tests/stack/up

stack-down:
	integration-tests/stack/down

stack-status:
	integration-tests/stack/status
