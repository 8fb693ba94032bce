#!/usr/bin/env bash
# Snapshot benchmark of `fhir-cdc run` on the test stack, against PostgreSQL's own COPY of
# the same rows as the peer, in the same run (ratios travel between machines better than
# rates).
#
#   make stack-up && cargo build --release --bin fhir-cdc && benches/snapshot.sh [ROWS]
#
# A fresh copy of the sample results table with ROWS rows (default 300,000). The peer:
# `COPY (SELECT * FROM …) TO STDOUT`, text and binary, into /dev/null through psql — reading
# alone, nothing mapped or sent. fhir-cdc: deployed first (topics created, schemas
# registered, `snapshot.mode = never`), its state then reset to snapshot the table
# (`offsets reset --to snapshot`), and timed from its start until Kafka has acknowledged an
# event for every row (its metrics endpoint, polled every 50 ms); the start-up (state,
# slot, stream, first chunk) is inside the clock and also shown apart. The stream runs
# alongside the chunks, as it does in use. CHUNK=N sets `snapshot.chunk.size`. Prints
# rows/s of each, the ratio, where the machine's CPU went per row, and fhir-cdc's peak RSS.
set -euo pipefail

cd "$(dirname "$0")/.."
. integration-tests/stack/env
ROWS=${1:-300000}
NAME=snapbench_$(date +%s)
. benches/lib.sh
run_pid=
cleanup() {
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null
  drop_slot "$NAME"
  sql -c "DROP PUBLICATION IF EXISTS $NAME" -c "DROP SCHEMA IF EXISTS $NAME CASCADE" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

sed -e "s/CREATE SCHEMA IF NOT EXISTS lis;/CREATE SCHEMA $NAME;/" -e "s/lis\./$NAME./g" mappings/lab/schema.sql | sql
sql -c "ALTER TABLE $NAME.lab_result REPLICA IDENTITY FULL"
sql -c "INSERT INTO $NAME.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, ref_low, ref_high, abnormal_flag, result_status, collected_at, verified_at)
        SELECT i, 'A24-' || i, 'M' || lpad((i % 5000)::text, 6, '0'), 'GLU', 90 + i % 40, 'mg/dL', 70, 99, 'N', 'F', '2024-03-05 14:30:00', now()
          FROM generate_series(1, $ROWS) AS i"
sql -c "VACUUM ANALYZE $NAME.lab_result"
mkdir -p "$DIR/mappings"
sed "s/table: lis\./table: $NAME./" mappings/lab/result.yaml >"$DIR/mappings/result.yaml"
cp mappings/lab/tests.codes.yaml "$DIR/mappings/"
write_config() {
  cat >"$DIR/connector.toml" <<EOF
name = "$NAME"
[source]
kind = "postgres"
url = "\${env:FHIR_CDC_PG_URL}"
slot.name = "$NAME"
publication.name = "$NAME"
snapshot.mode = "$1"
snapshot.chunk.size = ${CHUNK:-1024}
$(connector_tables)
EOF
}

# The peer, twice each (the first warms the cache), the second timed.
copy_rate() {
  sql -c "COPY (SELECT * FROM $NAME.lab_result) TO STDOUT $1" >/dev/null
  local t0 t1
  t0=$(date +%s.%N)
  sql -c "COPY (SELECT * FROM $NAME.lab_result) TO STDOUT $1" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(round($ROWS / ($t1 - $t0)))"
}
copy_text=$(copy_rate "")
copy_binary=$(copy_rate "(FORMAT binary)")

# Deployed without a snapshot, then told to take one.
write_config never
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/deploy.log" &
run_pid=$!
until grep -q "streaming" "$DIR/deploy.log" && grep -q "topics ready" "$DIR/deploy.log"; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/deploy.log"; exit 1; }
  sleep 0.05
done
kill -TERM "$run_pid"
wait "$run_pid" || { cat "$DIR/deploy.log"; exit 1; }
run_pid=
write_config initial
"$BIN" offsets reset --config "$DIR/connector.toml" --to snapshot --yes >/dev/null 2>"$DIR/reset.log" ||
  { cat "$DIR/reset.log"; exit 1; }

acked() {
  curl -s "http://127.0.0.1:$PORT/metrics" 2>/dev/null |
    awk '/^fhir_cdc_events_acked_total/ { n += $NF } END { printf "%d", n }'
}
t0=$(date +%s.%N)
busy0=$(busy)
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/run.log" &
run_pid=$!
first=
while [ "$(acked)" -lt "$ROWS" ]; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/run.log"; exit 1; }
  [ -z "$first" ] && [ "$(acked)" -gt 0 ] && first=$(date +%s.%N)
  sleep 0.05
done
t1=$(date +%s.%N)
startup=$(python3 -c "print(round(${first:-$t1} - $t0, 2))")
after_startup=$(python3 -c "print(round($ROWS / ($t1 - ${first:-$t0})))")
ours=$(python3 -c "print(round($ROWS / ($t1 - $t0)))")
read -r machine_cpu run_cpu < <(python3 -c "
print(round(($(busy) - $busy0) * 1e6 / $ROWS, 1), round($(cpu_of "$run_pid") * 1e6 / $ROWS, 1))")
peak_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$run_pid/status")

echo
echo "fhir-cdc run, initial snapshot of one lab results table, $ROWS rows (chunks of ${CHUNK:-1024} between watermarks):"
printf '  COPY … TO STDOUT, text (peer)          %8d rows/s\n' "$copy_text"
printf '  COPY … TO STDOUT, binary (peer)        %8d rows/s\n' "$copy_binary"
printf '  fhir-cdc, start → Kafka ack of all     %8d rows/s (%d%% of COPY text)\n' "$ours" \
  "$(python3 -c "print(round(100 * $ours / $copy_text))")"
echo "    of which start-up to the first acknowledged row $startup s; after it $after_startup rows/s"
echo "  CPU per row: whole machine $machine_cpu µs, fhir-cdc $run_cpu µs"
echo "  fhir-cdc peak RSS                       $((peak_kib / 1024)) MiB"
