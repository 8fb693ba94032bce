#!/usr/bin/env bash
# End-to-end benchmark of `fhir-cdc run` on the test stack's MariaDB, against
# `mariadb-binlog --read-from-remote-server` as the ceiling, in the same run.
#
#   make stack-up && cargo build --release --bin fhir-cdc && benches/mysql_pipeline.sh [CHANGES]
#
# 1. Backlog: CHANGES inserts then CHANGES updates (default 100,000 each, 1,000 rows per
#    transaction) into a fresh copy of the sample charge table. mariadb-binlog reads the
#    backlog's binary log from the server (as a replica, the same protocol) to /dev/null,
#    once as it travels and once with every row decoded into text (-v: the ceiling, since
#    the server does no decoding for a MySQL replica, unlike PostgreSQL's WAL sender);
#    fhir-cdc, deployed before the backlog (its topics exist, its schemas are registered,
#    its position stored), drains it — decode, map, Avro, Kafka, acknowledgement — timed
#    from its start until Kafka has acknowledged every event. Prints changes/s of both and
#    the ratio, CPU per change, and fhir-cdc's peak RSS.
# 2. Latency: 2,000 changes/s for 15 s (200 transactions/s of 10 rows, benches/paced_mysql.py)
#    with the connector caught up; p50/p99 from each commit's return to the broker's append
#    of its event (the topic set to LogAppendTime). The connector's own commit → ack
#    histogram is no help here: binary log events carry whole seconds.
# 3. Debezium 3.5.0's MariaDB connector (benches/debezium.sh), deployed before the backlog,
#    drains the same backlog from a fresh JVM (after the ceilings, before fhir-cdc):
#    changes/s, CPU per change, peak RSS.
set -euo pipefail
[ -n "${BENCH_TRACE:-}" ] && set -x

cd "$(dirname "$0")/.."
. integration-tests/stack/env
CHANGES=${1:-100000}
NAME=bench_$(date +%s)
. benches/lib.sh
STATE=integration-tests/stack/state
kafka_pid=$(cat "$STATE/kafka.pid")
mariadb_pid=$(cat "$STATE/mariadb.pid")
root() { mariadb --no-defaults --socket="$STATE/mariadb/run/mysqld.sock" -uroot "$@"; }
run_pid= dbz_pid=
cleanup() {
  [ -n "$run_pid" ] && kill "$run_pid" 2>/dev/null && wait "$run_pid" 2>/dev/null
  [ -n "$dbz_pid" ] && kill "$dbz_pid" 2>/dev/null && wait "$dbz_pid" 2>/dev/null
  root -e "DROP DATABASE IF EXISTS $NAME; DROP USER IF EXISTS '${NAME}_dbz'@'%'" || true
  rm -rf "$DIR"
}
trap cleanup EXIT

DEBEZIUM=mariadb
. benches/debezium.sh
# The paced writer's Python (PyMySQL and Confluent's client), once.
bench_venv

# The charge table, its mapping, a connector.
sed -n '/^CREATE TABLE billing.charge/,/^);/p' mappings/billing/schema.sql \
  | sed "s/billing\.charge/$NAME.charge/" >"$DIR/schema.sql"
user=$(url_part "$FHIR_CDC_MYSQL_URL" username)
password=$(url_part "$FHIR_CDC_MYSQL_URL" password)
port=$(url_part "$FHIR_CDC_MYSQL_URL" port)
root -e "CREATE DATABASE $NAME; GRANT ALL ON $NAME.* TO '$user'@'%'"
root <"$DIR/schema.sql"
mkdir -p "$DIR/mappings"
sed "s/table: billing\./table: $NAME./" mappings/billing/charge.yaml >"$DIR/mappings/charge.yaml"
cat >"$DIR/connector.toml" <<EOF
name = "$NAME"
[source]
kind = "mysql"
url = "\${env:FHIR_CDC_MYSQL_URL}"
snapshot.mode = "never"
$(connector_tables)
EOF
acked() {
  curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^fhir_cdc_events_acked_total/ { n += $2 } END { print n + 0 }'
}

# Deployed before the backlog: topics, schemas, and a stored position (one charge through
# once it streams: `never` starts at the end of the log as it finds it),
# then stopped; the timed run drains the backlog as a connector restarted after a stop does.
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/deploy.log" &
run_pid=$!
until grep -q "streaming from" "$DIR/deploy.log"; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/deploy.log"; exit 1; }
  sleep 0.05
done
root -e "INSERT INTO $NAME.charge (charge_id, account_no, mrn, cpt_code, amount, status, service_date, posted_at)
         VALUES (0, 'ACC-0', 'M000000', '99213', 1.00, 'B', '2024-03-05', '2024-03-05 09:00:00')"
until [ "$(acked)" = 1 ]; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/deploy.log"; exit 1; }
  sleep 0.05
done
kill -TERM "$run_pid"
wait "$run_pid" || { cat "$DIR/deploy.log"; exit 1; }
run_pid=
# Debezium's MariaDB connector, likewise: 3.5.0, the last on Maven Central (3.6.1's MySQL
# connector asks MariaDB for `SHOW BINARY LOG STATUS`, which it refuses). It has its own
# user with the grants its documentation asks for (RELOAD among them, even without a
# snapshot), which fhir-cdc does not need.
root -e "CREATE USER '${NAME}_dbz'@'%' IDENTIFIED BY '$password';
         GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '${NAME}_dbz'@'%'"
cat >"$DIR/debezium.properties" <<EOF
name=$NAME
connector.class=io.debezium.connector.mariadb.MariaDbConnector
tasks.max=1
database.hostname=127.0.0.1
database.port=$port
database.user=${NAME}_dbz
database.password=$password
database.server.id=$((RANDOM + 100000))
topic.prefix=${NAME}_dbz
database.include.list=$NAME
table.include.list=$NAME.charge
snapshot.mode=no_data
include.schema.changes=false
topic.creation.default.replication.factor=1
topic.creation.default.partitions=1
schema.history.internal=io.debezium.storage.file.history.FileSchemaHistory
schema.history.internal.file.filename=$DIR/debezium.history
EOF
dbz_topic="${NAME}_dbz[.]$NAME[.]charge"
debezium_deploy "$DIR/debezium.properties" "$dbz_topic" \
  "root -e 'UPDATE $NAME.charge SET version = 2 WHERE charge_id = 0'"

# The backlog.
read -r start_file start_pos < <(root -N -e "SHOW MASTER STATUS" | awk '{ print $1, $2 }')
batches=$(( (CHANGES + 999) / 1000 ))
for b in $(seq 0 $((batches - 1))); do
  echo "INSERT INTO $NAME.charge (charge_id, account_no, mrn, encounter_no, cpt_code, description, amount, status, service_date, posted_at)
        SELECT seq, CONCAT('ACC-', seq % 5000), CONCAT('M', LPAD(seq % 5000, 6, '0')), CONCAT('E24-', seq), '80048',
               'Basic metabolic panel', 42.50, 'B', '2024-03-05', '2024-03-05 14:30:00.250'
          FROM seq_$((b * 1000 + 1))_to_$((b * 1000 + 1000));"
done | root "$NAME"
for b in $(seq 0 $((batches - 1))); do
  echo "UPDATE $NAME.charge SET amount = amount + 1, version = version + 1 WHERE charge_id BETWEEN $((b * 1000 + 1)) AND $((b * 1000 + 1000));"
done | root "$NAME"
total=$(( batches * 2000 ))
echo "backlog: $total changes in $((batches * 2)) transactions, from $start_file:$start_pos"

# Two ceilings: the binary log as it travels (row events printed as base64, undecoded),
# and with every row decoded into text (`-v`), as the connector must decode it.
ceiling() {
  local t0 t1 busy0
  t0=$(date +%s.%N) busy0=$(busy)
  mariadb-binlog --no-defaults -R -h 127.0.0.1 -P "$port" -u "$user" -p"$password" \
    -j "$start_pos" --to-last-log "$start_file" "$@" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(round($total / ($t1 - $t0)), round(($(busy) - $busy0) * 1e6 / $total, 1))"
}
read -r raw raw_cpu < <(ceiling)
read -r ceiling ceiling_cpu < <(ceiling --base64-output=DECODE-ROWS -v)

# Debezium drains the backlog (before fhir-cdc: nothing else has written since).
debezium_drain "$DIR/debezium.properties" "$dbz_topic" "$total"

t0=$(date +%s.%N)
busy0=$(busy) kafka0=$(cpu_of "$kafka_pid") mariadb0=$(cpu_of "$mariadb_pid")
"$BIN" run --config "$DIR/connector.toml" 2>"$DIR/run.log" &
run_pid=$!
until [ "$(acked)" -ge "$total" ]; do
  kill -0 "$run_pid" 2>/dev/null || { cat "$DIR/run.log"; exit 1; }
  sleep 0.02
done
t1=$(date +%s.%N)
ours=$(python3 -c "print(round($total / ($t1 - $t0)))")
read -r ours_cpu run_cpu mariadb_cpu kafka_cpu < <(python3 -c "
busy, run, db, kafka = $(busy) - $busy0, $(cpu_of "$run_pid"), $(cpu_of "$mariadb_pid") - $mariadb0, $(cpu_of "$kafka_pid") - $kafka0
print(*(round(x * 1e6 / $total, 1) for x in (busy, run, db, kafka)))")
peak_kib=$(awk '/VmHWM/ { print $2 }' "/proc/$run_pid/status")

# Latency at 2,000 changes/s, on rows the backlog wrote (each once: 15 s, or less if the
# backlog is small).
seconds=$(( batches * 1000 / 2000 < 15 ? batches * 1000 / 2000 : 15 ))
latency=$("$BENCH_VENV/bin/python" benches/paced_mysql.py "$FHIR_CDC_MYSQL_URL" "$NAME.charge" 1 2000 "$seconds" \
  "$FHIR_CDC_KAFKA_BOOTSTRAP" "$NAME.billing.ChargeItem")

echo
echo "fhir-cdc run, one billing charge table on MariaDB, $total changes (inserts, then updates):"
echo "  mariadb-binlog -R, raw, to /dev/null    $raw changes/s ($raw_cpu µs of CPU per change)"
echo "  mariadb-binlog -R -v, rows decoded      $ceiling changes/s ($ceiling_cpu µs; the ceiling)"
echo "  fhir-cdc, commit → Kafka ack            $ours changes/s ($(python3 -c "print(f'{$ours / $ceiling:.0%}')") of the ceiling)"
echo "  CPU per change, whole machine: $ours_cpu µs: fhir-cdc $run_cpu µs, MariaDB $mariadb_cpu µs, Kafka broker $kafka_cpu µs"
echo "  fhir-cdc peak RSS                       $((peak_kib / 1024)) MiB"
echo "  at 2,000 changes/s, commit → Kafka append: $latency"
echo "  Debezium 3.5.0 (MariaDB connector, Connect standalone, fresh JVM, JSON converter):"
echo "    $dbz_rate changes/s ($(python3 -c "print(f'{$dbz_rate / $ceiling:.0%}')") of the ceiling; fhir-cdc $(python3 -c "print(f'{$ours / $dbz_rate:.1f}')")x), $dbz_cpu µs of its CPU per change, peak RSS $dbz_rss_mib MiB"
echo "    ($dbz_startup s until its first event; $dbz_warm_rate changes/s after it)"
