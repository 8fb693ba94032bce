# The two commands a newcomer needs (see README.md), and the stack's own.
.PHONY: demo test lint stack-up stack-down stack-status

# Bring the stack up, prepare the sample lab tables and check both reference connectors.
# (The scripted end-to-end story on a sample lab database is still to come.)
demo: stack-up
	cargo build --release --bin fhir-cdc
	@integration-tests/stack/status
	@echo
	@# The sample lab tables (empty), prepared as a DBA would: full replica identity.
	@. integration-tests/stack/env && sed 's/CREATE TABLE /CREATE TABLE IF NOT EXISTS /' mappings/lab/schema.sql \
	  | psql "$$FHIR_CDC_PG_URL" -q -v ON_ERROR_STOP=1 -f - \
	  && for t in patient lab_order specimen lab_result; do \
	       psql "$$FHIR_CDC_PG_URL" -q -v ON_ERROR_STOP=1 -c "ALTER TABLE lis.$$t REPLICA IDENTITY FULL"; done
	@. integration-tests/stack/env && target/release/fhir-cdc check --config connectors/lab-postgres.toml
	@echo
	@. integration-tests/stack/env && target/release/fhir-cdc check --config connectors/billing-mysql.toml

# Bring the stack up if needed, then run every test: unit tests and the integration tests
# against the real stack.
test: stack-up
	integration-tests/oracles/setup
	cargo build --bin fhir-cdc
	target/debug/fhir-cdc schemas check
	. integration-tests/stack/env && cargo test --workspace

# Formatting and clippy, warnings as errors (CI runs this before the tests).
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

stack-up:
	integration-tests/stack/up

stack-down:
	integration-tests/stack/down

stack-status:
	integration-tests/stack/status
