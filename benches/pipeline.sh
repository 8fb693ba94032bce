#!/usr/bin/env bash
# End-to-end benchmark of `fhir-cdc run` on the test stack, against pg_recvlogical as the
# ceiling, in the same run (ratios travel between machines better than rates).
#
#   make stack-up && cargo build --release --bin fhir-cdc && benches/pipeline.sh [CHANGES]
#
# 1. Backlog: CHANGES inserts then CHANGES updates (default 100,000 each, 1,000 rows per
#    transaction) into a fresh copy of the sample results table, with two slots waiting:
#    pg_recvlogical drains one to /dev/null (pgoutput, the same publication); fhir-cdc,
#    deployed before the backlog (its topics exist, its schemas are registered), drains the
#    other — map, Avro, Kafka, acknowledgement — timed from its start (≈ 0.2 s of the run)
#    until PostgreSQL has the last commit confirmed. Prints changes/s of both and the
#    ratio, where the machine's CPU went per change (fhir-cdc, the WAL sender, the Kafka
#    broker), and fhir-cdc's peak RSS.
# 2. Projection: `fhir-cdc project --until-caught-up` applies the whole topic (the backlog's
#    events) into a fresh read model, once autovacuum is done with the backlog; events/s.
# 3. Latency: 2,000 changes/s for 15 s (pgbench, 200 transactions/s of 10 rows) with the
#    connector and a projector running and caught up; p50/p99 commit → Kafka acknowledgement
#    from the connector's metrics histogram (bucket upper bounds, so "at most"), and p50/p99
#    Kafka → projection commit from the projection's history (kafka_timestamp, applied_at).
# 4. Debezium 3.6.1's PostgreSQL connector (benches/debezium.sh), deployed before the
#    backlog on a slot of its own, drains the same backlog from a fresh JVM (after the
#    ceiling, before fhir-cdc): changes/s, CPU per change, peak RSS.
set -euo pipefail
[ -n "${BENCH_TRACE:-}" ] && set -x

cd "$(dirname "$0")/.."
. integration-tests/stack/env
CHANGES=${1:-100000}
NAME=bench_$(date +%s)
. benches/lib.sh
kafka_pid=$(cat integration-tests/stack/state/kafka.pid)
run_pid=
cleanup() {
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null
  drop_slot "$NAME"
  drop_slot "${NAME}_ceiling"
  [ -n "${dbz_pid:-}" ] && kill "$dbz_pid" 2>/dev/null && wait "$dbz_pid" 2>/dev/null
  drop_slot "${NAME}_dbz"
  [ -n "${project_pid:-}" ] && kill "$project_pid" 2>/dev/null && wait "$project_pid" 2>/dev/null
  sql -c "DROP PUBLICATION IF EXISTS $NAME" -c "DROP SCHEMA IF EXISTS $NAME CASCADE" -c "DROP SCHEMA IF EXISTS ${NAME}_projection CASCADE" || true
  rm -rf "$DIR"
}
trap cleanup EXIT
DEBEZIUM=postgres
. benches/debezium.sh

# The results table, its mapping, a connector.
sed -e "s/CREATE SCHEMA IF NOT EXISTS lis;/CREATE SCHEMA $NAME;/" -e "s/lis\./$NAME./g" mappings/lab/schema.sql | sql
sql -c "ALTER TABLE $NAME.lab_result REPLICA IDENTITY FULL"
mkdir -p "$DIR/mappings"
sed "s/table: lis\./table: $NAME./" mappings/lab/result.yaml >"$DIR/mappings/result.yaml"
cp mappings/lab/tests.codes.yaml "$DIR/mappings/"
cat >"$DIR/connector.toml" <<EOF
name = "$NAME"
[source]
kind = "postgres"
url = "\${env:FHIR_CDC_PG_URL}"
slot.name = "$NAME"
publication.name = "$NAME"
snapshot.mode = "never"
$(connector_tables)
EOF
sql -c "CREATE PUBLICATION $NAME FOR TABLE $NAME.lab_result"
sql -At -c "SELECT pg_create_logical_replication_slot('$NAME', 'pgoutput')" >/dev/null
sql -At -c "SELECT pg_create_logical_replication_slot('${NAME}_ceiling', 'pgoutput')" >/dev/null

# The connector is deployed before the backlog builds up: it creates its topics and registers
# its schemas, then stops. The timed run drains the backlog as a connector restarted after a
# stop does (creating the topics, once in a connector's life, took ≈ 250 ms: a tenth of a
# timed run of 200,000 changes).
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/deploy.log" &
run_pid=$!
until grep -q "topics ready" "$DIR/deploy.log"; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/deploy.log"; exit 1; }
  sleep 0.05
done
kill -TERM "$run_pid"
wait "$run_pid" || { cat "$DIR/deploy.log"; exit 1; }
run_pid=
# Debezium, likewise (3.6.1 has no `snapshot.mode=never`: with `no_data` and no stored
# offset it starts at the WAL's end, so one change goes through and its offset is stored).
cat >"$DIR/debezium.properties" <<EOF
name=$NAME
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname=$(url_part "$FHIR_CDC_PG_URL" hostname)
database.port=$(url_part "$FHIR_CDC_PG_URL" port)
database.user=$(url_part "$FHIR_CDC_PG_URL" username)
database.password=$(url_part "$FHIR_CDC_PG_URL" password)
database.dbname=$(url_part "$FHIR_CDC_PG_URL" path)
plugin.name=pgoutput
slot.name=${NAME}_dbz
publication.name=$NAME
publication.autocreate.mode=disabled
topic.prefix=${NAME}_dbz
table.include.list=$NAME.lab_result
snapshot.mode=no_data
topic.creation.default.replication.factor=1
topic.creation.default.partitions=1
EOF
dbz_topic="${NAME}_dbz[.]$NAME[.]lab_result"
debezium_deploy "$DIR/debezium.properties" "$dbz_topic" \
  "sql -c \"INSERT INTO $NAME.lab_result (result_id, accession_no, mrn, test_code, result_status, collected_at) VALUES (0, 'A24-0', 'M000000', 'GLU', 'P', now())\""

# The backlog.
batches=$(( (CHANGES + 999) / 1000 ))
for b in $(seq 0 $((batches - 1))); do
  echo "INSERT INTO $NAME.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, ref_low, ref_high, abnormal_flag, result_status, collected_at, verified_at)
        SELECT i, 'A24-' || i, 'M' || lpad((i % 5000)::text, 6, '0'), 'GLU', 90 + i % 40, 'mg/dL', 70, 99, 'N', 'F', '2024-03-05 14:30:00', now()
          FROM generate_series($((b * 1000 + 1)), $((b * 1000 + 1000))) AS i;"
done | sql
for b in $(seq 0 $((batches - 1))); do
  echo "UPDATE $NAME.lab_result SET value_numeric = value_numeric + 1, result_status = 'C' WHERE result_id BETWEEN $((b * 1000 + 1)) AND $((b * 1000 + 1000));"
done | sql
end=$(sql -At -c "SELECT pg_current_wal_lsn()")
total=$(( batches * 2000 ))
echo "backlog: $total changes in $((batches * 2)) transactions, up to $end"

t0=$(date +%s.%N)
busy0=$(busy)
pg_recvlogical -d "$FHIR_CDC_PG_URL" -S "${NAME}_ceiling" --start -E "$end" -f /dev/null \
  -o proto_version=1 -o "publication_names=$NAME" --no-loop
t1=$(date +%s.%N)
ceiling=$(python3 -c "print(round($total / ($t1 - $t0)))")
ceiling_cpu=$(python3 -c "print(round(($(busy) - $busy0) * 1e6 / $total, 1))")

# Debezium drains the backlog (before fhir-cdc: nothing else has written since).
debezium_drain "$DIR/debezium.properties" "$dbz_topic" "$total"

t0=$(date +%s.%N)
busy0=$(busy) kafka0=$(cpu_of "$kafka_pid")
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/run.log" &
run_pid=$!
# Waiting for the slot inside one session: a psql started 20 times a second would take CPU
# from the run it times.
sql -c "DO \$\$ BEGIN
  WHILE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = '$NAME' AND confirmed_flush_lsn >= '$end') LOOP
    PERFORM pg_sleep(0.02);
  END LOOP; END \$\$" &
waiter=$!
walsender=
while kill -0 "$waiter" 2>/dev/null; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/run.log"; exit 1; }
  [ -n "$walsender" ] || walsender=$(sql -At -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$NAME'")
  sleep 0.05
done
wait "$waiter"
t1=$(date +%s.%N)
ours=$(python3 -c "print(round($total / ($t1 - $t0)))")
# Where the machine's CPU went while fhir-cdc drained the backlog, in µs per change.
read -r ours_cpu run_cpu walsender_cpu kafka_cpu < <(python3 -c "
busy, run, ws, kafka = $(busy) - $busy0, $(cpu_of "$run_pid"), $(cpu_of "${walsender:-0}"), $(cpu_of "$kafka_pid") - $kafka0
print(*(round(x * 1e6 / $total, 1) for x in (busy, run, ws, kafka)))")
busy_share=$(python3 -c "print(f'{$ours_cpu * $ours / 1e6 / $(nproc):.0%}')")
peak_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$run_pid/status")

# The projection of the whole topic, once PostgreSQL has finished vacuuming the backlog's
# table (the read model and the source share this server here; they seldom do in use).
for _ in $(seq 600); do
  [ "$(sql -At -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")" = 0 ] && break
  sleep 0.1
done
cat >"$DIR/projector.toml" <<EOF
name = "${NAME}_projector"
[kafka]
bootstrap.servers = "\${env:FHIR_CDC_KAFKA_BOOTSTRAP}"
[schema_registry]
url = "\${env:FHIR_CDC_SCHEMA_REGISTRY_URL}"
[topics]
prefix = "$NAME"
[projection]
url = "\${env:FHIR_CDC_PG_URL}"
schema = "${NAME}_projection"
max_batch = 2000
connections = 2
max_batch_ms = 20
EOF
t0=$(date +%s.%N)
"$BIN" project --config "$DIR/projector.toml" --until-caught-up 2>"$DIR/project.log"
t1=$(date +%s.%N)
projected=$(grep -o 'applied=[0-9]*' "$DIR/project.log" | cut -d= -f2)
projected_rate=$(python3 -c "print(round($projected / ($t1 - $t0)))")
"$BIN" project --config "$DIR/projector.toml" 2>>"$DIR/project.log" &
project_pid=$!

# Latency at 2,000 changes/s.
paced_since=$(sql -At -c "SELECT now()")
cat >"$DIR/paced.sql" <<EOF
\set id random(1, $((batches * 1000)))
UPDATE $NAME.lab_result SET value_numeric = value_numeric + 1 WHERE result_id BETWEEN :id AND :id + 9;
EOF
before=$(curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^fhir_cdc_commit_to_ack_seconds_bucket')
pgbench -n -R 200 -T 15 -f "$DIR/paced.sql" "$FHIR_CDC_PG_URL" >/dev/null 2>&1
end=$(sql -At -c "SELECT pg_current_wal_lsn()")
until [ "$(sql -At -c "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = '$NAME'")" = t ]; do sleep 0.05; done
after=$(curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^fhir_cdc_commit_to_ack_seconds_bucket')
peak_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$run_pid/status")
sleep 2 # the projector's last batches
apply_latency=$(sql -At -F ' ' -c "SELECT count(*),
    round(1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY applied_at - kafka_timestamp))::numeric, 1),
    round(1000 * extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY applied_at - kafka_timestamp))::numeric, 1)
  FROM ${NAME}_projection.history WHERE kafka_timestamp >= '$paced_since'" \
  | awk '{ printf "%d events measured, p50 %s ms, p99 %s ms", $1, $2, $3 }')
quantiles=$(python3 - "$before" "$after" <<'EOF'
import re, sys
def buckets(text):
    return {float(m.group(1)) if m.group(1) != "+Inf" else float("inf"): float(m.group(2))
            for m in re.finditer(r'le="([^"]+)"\} (\S+)', text)}
before, after = buckets(sys.argv[1]), buckets(sys.argv[2])
counts = sorted((le, after[le] - before.get(le, 0)) for le in after)
total = counts[-1][1]
def quantile(q):
    return next(le for le, n in counts if n >= q * total)
print(f"{int(total)} changes measured, p50 ≤ {quantile(0.5) * 1000:g} ms, p99 ≤ {quantile(0.99) * 1000:g} ms")
EOF
)

echo
echo "fhir-cdc run, one lab results table, $total changes (inserts, then updates):"
echo "  pg_recvlogical to /dev/null (ceiling)   $ceiling changes/s"
echo "  fhir-cdc, commit → Kafka ack            $ours changes/s ($(python3 -c "print(f'{$ours / $ceiling:.0%}')") of the ceiling)"
echo "  CPU per change, whole machine: ceiling $ceiling_cpu µs; fhir-cdc run $ours_cpu µs ($busy_share of $(nproc) cores busy):"
echo "    fhir-cdc $run_cpu µs, PostgreSQL's WAL sender $walsender_cpu µs, Kafka broker $kafka_cpu µs, the rest $(python3 -c "print(round($ours_cpu - $run_cpu - $walsender_cpu - $kafka_cpu, 1))") µs"
echo "  fhir-cdc peak RSS                       $((peak_kib / 1024)) MiB"
echo "  at 2,000 changes/s: $quantiles"
echo
echo "fhir-cdc project, the same topic into a fresh read model (batches of up to 2,000 on 2 connections):"
echo "  $projected events applied at $projected_rate events/s (start-up included)"
echo "  at 2,000 events/s, Kafka → projection commit: $apply_latency"
echo
echo "Debezium 3.6.1 (PostgreSQL connector, pgoutput, Connect standalone, fresh JVM, JSON converter), the same backlog:"
echo "  $dbz_rate changes/s ($(python3 -c "print(f'{$dbz_rate / $ceiling:.0%}')") of the ceiling; fhir-cdc $(python3 -c "print(f'{$ours / $dbz_rate:.1f}')")x), $dbz_cpu µs of its CPU per change, peak RSS $dbz_rss_mib MiB"
echo "  ($dbz_startup s until its first event; $dbz_warm_rate changes/s after it)"
