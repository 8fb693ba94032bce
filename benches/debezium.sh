# Debezium beside fhir-cdc on the same backlog. Sourced by benches/pipeline.sh and
# benches/mysql_pipeline.sh (after benches/lib.sh), which set DEBEZIUM (postgres or
# mariadb: the pom under benches/debezium/ that names the connector) and call:
#
#   debezium_deploy PROPERTIES     before the backlog: the connector streams (snapshot.mode
#                                  no_data), one change goes through, its offset is stored
#   debezium_drain PROPERTIES N    after it: times Connect standalone from a fresh JVM until
#                                  Kafka holds N more change events; sets dbz_rate,
#                                  dbz_startup (s until its first event), dbz_warm_rate
#                                  (after it), dbz_cpu (µs per change, the JVM's) and
#                                  dbz_rss_mib
#
# Kafka Connect standalone at the stack's Kafka version runs the connector with the JSON
# converter, acks=all and linger.ms=10, as a Debezium user would deploy it (the pom
# resolves the jars from Maven Central into ~/.m2).
# PROPERTIES is the connector's properties file without the worker's settings.

DBZ_STATE=integration-tests/stack/state/debezium
BENCH_VENV=integration-tests/stack/state/bench-venv

bench_venv() {
  if [ ! -x "$BENCH_VENV/bin/python" ]; then
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install -q PyMySQL==1.1.1 confluent-kafka==2.12.2
  fi
}

debezium_classpath() {
  local cp=$DBZ_STATE/$DEBEZIUM.classpath pom=benches/debezium/$DEBEZIUM/pom.xml
  mkdir -p "$DBZ_STATE"
  if [ ! -s "$cp" ] || [ "$pom" -nt "$cp" ]; then
    echo "resolving Kafka Connect and Debezium jars with Maven (cached in ~/.m2)" >&2
    mvn -q -f "$pom" dependency:build-classpath -Dmdep.outputFile="$PWD/$cp" >/dev/null
  fi
  cat "$cp"
}

# The worker's settings, then the connector's: Connect standalone, in the background
# ($dbz_pid), its log in $DIR/debezium.log.
debezium_start() {
  local rest_port
  rest_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$DIR/worker.properties" <<EOF
bootstrap.servers=$FHIR_CDC_KAFKA_BOOTSTRAP
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
offset.storage.file.filename=$DIR/debezium.offsets
offset.flush.interval.ms=1000
plugin.discovery=service_load
listeners=http://127.0.0.1:$rest_port
producer.acks=all
producer.linger.ms=10
EOF
  cat >"$DIR/log4j2.properties" <<EOF
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$DIR/debezium.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=%d %p %c: %m%n
logger.debezium.name=io.debezium
logger.debezium.level=INFO
EOF
  java -Xms256m -Dlog4j2.configurationFile="$DIR/log4j2.properties" -cp "$(debezium_classpath)" \
    org.apache.kafka.connect.cli.ConnectStandalone "$DIR/worker.properties" "$1" >>"$DIR/debezium.log" 2>&1 &
  dbz_pid=$!
}

debezium_stop() {
  # The JVM answers SIGTERM by exiting with 143.
  kill -TERM "$dbz_pid" 2>/dev/null && { wait "$dbz_pid" 2>/dev/null || true; }
  dbz_pid=
}

# The events in Kafka of the connector's topics now.
debezium_events() {
  "$BENCH_VENV/bin/python" - "$FHIR_CDC_KAFKA_BOOTSTRAP" "$1" <<'EOF'
import re, sys
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
bootstrap, pattern = sys.argv[1], re.compile(sys.argv[2])
topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5).topics
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "debezium-events"})
print(sum(consumer.get_watermark_offsets(TopicPartition(t, p), timeout=5)[1]
          for t, m in topics.items() if pattern.fullmatch(t) for p in m.partitions))
EOF
}

# debezium_deploy PROPERTIES TOPIC_REGEX WRITE_ONE: start, wait until it streams, run the
# command WRITE_ONE (one change), wait for its event and the offset flush, stop.
debezium_deploy() {
  bench_venv
  debezium_start "$1"
  for _ in $(seq 1 1200); do
    grep -qE "Connected to .* at|Starting streaming|streaming" "$DIR/debezium.log" 2>/dev/null && break
    kill -0 "$dbz_pid" 2>/dev/null || { tail -n 40 "$DIR/debezium.log"; echo "Debezium stopped" >&2; exit 1; }
    sleep 0.1
  done
  sleep 2
  eval "$3"
  "$BENCH_VENV/bin/python" benches/await_topic.py "$FHIR_CDC_KAFKA_BOOTSTRAP" "$2" 1 120 >/dev/null ||
    { tail -n 40 "$DIR/debezium.log"; exit 1; }
  sleep 2 # the offset flush (offset.flush.interval.ms)
  debezium_stop
}

# debezium_drain PROPERTIES TOPIC_REGEX N
debezium_drain() {
  local before t0 t1 first
  before=$(debezium_events "$2")
  t0=$(date +%s.%N)
  debezium_start "$1"
  first=$("$BENCH_VENV/bin/python" benches/await_topic.py "$FHIR_CDC_KAFKA_BOOTSTRAP" "$2" $((before + $3)) 600) ||
    { tail -n 40 "$DIR/debezium.log"; exit 1; }
  t1=$(date +%s.%N)
  dbz_rate=$(python3 -c "print(round($3 / ($t1 - $t0)))")
  dbz_startup=$(python3 -c "print(round($first - $t0, 1))")
  dbz_warm_rate=$(python3 -c "print(round($3 / ($t1 - $first)))")
  dbz_cpu=$(python3 -c "print(round($(cpu_of "$dbz_pid") * 1e6 / $3, 1))")
  dbz_rss_mib=$(( $(awk '/VmHWM/ { print $2 }' "/proc/$dbz_pid/status") / 1024 ))
  debezium_stop
}
