# What the benchmark scripts share. Sourced from the repository root, after the stack's env.

BIN=${FHIR_CDC_BIN:-target/release/fhir-cdc}
DIR=$(mktemp -d)
# A free port for the connector's metrics.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The tables every benchmark connector's configuration ends with (after its [source]), for a
# connector named $NAME reading the mappings in the working directory.
connector_tables() {
  cat <<EOF
[kafka]
bootstrap.servers = "\${env:FHIR_CDC_KAFKA_BOOTSTRAP}"
[schema_registry]
url = "\${env:FHIR_CDC_SCHEMA_REGISTRY_URL}"
[mappings]
path = "mappings"
[topics]
prefix = "$NAME"
[metrics]
listen = "127.0.0.1:$PORT"
EOF
}
sql() { psql "$FHIR_CDC_PG_URL" -q -X -v ON_ERROR_STOP=1 "$@"; }
# A part of a database URL: url_part URL username|password|hostname|port|path.
url_part() {
  python3 -c "import sys, urllib.parse as u; print(u.unquote(str(getattr(u.urlparse(sys.argv[1]), sys.argv[2]) or '')).lstrip('/'))" "$1" "$2"
}
# CPU seconds used so far: by a process (user + system), by the whole machine (not idle).
hz=$(getconf CLK_TCK)
cpu_of() { awk -v hz="$hz" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }
busy() { awk -v hz="$hz" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
# A slot left behind keeps every byte of WAL written after it: drop each one, waiting for its
# WAL sender to let go of it first.
drop_slot() {
  for _ in $(seq 100); do
    [ "$(sql -At -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$1'")" = 0 ] && return
    sql -At -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$1' AND NOT active" >/dev/null 2>&1 || true
    sleep 0.1
  done
  echo "warning: replication slot $1 is still there; drop it, or it keeps the WAL" >&2
}
