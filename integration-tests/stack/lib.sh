# Shared definitions for the test stack scripts (up, down, status). Sourced, not run.
#
# Everything the stack writes lives under $STATE (git-ignored). Each component records the pid
# it started in $STATE/<component>.pid; `down` and `status` act on those pids only, after
# checking that the process behind the pid is still the one we started.

set -Eeuo pipefail
# No silent exits: whatever fails unexpectedly is named.
trap 'printf "[stack] ERROR: unexpected failure (exit %s) at %s line %s: %s\n" "$?" "${BASH_SOURCE[0]:-stack}" "$LINENO" "$BASH_COMMAND" >&2' ERR

STACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$STACK_DIR/../.." && pwd)
STATE=${FHIR_CDC_STACK_STATE:-$STACK_DIR/state}
ENV_FILE=$STACK_DIR/env

# Private ports, away from every default so the stack never collides with services already
# on a machine. Each can be overridden from the environment.
PG_PORT=${FHIR_CDC_PG_PORT:-54329}
MYSQL_PORT=${FHIR_CDC_MYSQL_PORT:-33069}
KAFKA_PORT=${FHIR_CDC_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${FHIR_CDC_KAFKA_CONTROLLER_PORT:-19093}
KAFKA_SASL_PORT=${FHIR_CDC_KAFKA_SASL_PORT:-19094}
REGISTRY_PORT=${FHIR_CDC_REGISTRY_PORT:-18081}
REGISTRY_MANAGEMENT_PORT=${FHIR_CDC_REGISTRY_MANAGEMENT_PORT:-18082}
REGISTRY_TLS_PORT=${FHIR_CDC_REGISTRY_TLS_PORT:-18443}
REGISTRY_TLS_HTTP_PORT=${FHIR_CDC_REGISTRY_TLS_HTTP_PORT:-18083}
REGISTRY_TLS_MANAGEMENT_PORT=${FHIR_CDC_REGISTRY_TLS_MANAGEMENT_PORT:-18084}

# Versions started. Kafka's is pinned in kafka/pom.xml; the registry's here.
KAFKA_VERSION=4.1.0
APICURIO_VERSION=3.3.3

# The test credentials of the stack's own users. They guard nothing but a throwaway local
# stack and are written to the env file; they are never printed.
DB_USER=fhir_cdc
DB_PASSWORD=fhir_cdc
# A role PostgreSQL admits over TLS only, with a client certificate in its name as well.
TLS_USER=fhir_cdc_tls
DB_NAME=fhir_cdc
REGISTRY_USER=fhir_cdc
REGISTRY_PASSWORD=fhir_cdc_registry
# Kafka's SASL_SSL listener admits these SCRAM users, one per role of the least-privilege
# setup in docs/operations.md; what each may do is granted by ACLs (kafka-acls).
KAFKA_SASL_USERS=(fhir_cdc_connector fhir_cdc_projector fhir_cdc_reader)
KAFKA_SASL_PASSWORD=fhir_cdc_kafka

COMPONENTS=(postgres mariadb kafka registry registry-tls)

# Progress goes to stderr, so that functions whose stdout is captured can still log.
log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid a component recorded, or nothing.
recorded_pid() {
  local f="$STATE/$1.pid"
  [[ -s $f ]] && head -n1 "$f" | tr -dc '0-9'
}

# What each component's process command line must contain, so a recycled pid is never
# mistaken for ours.
cmdline_marker() {
  case $1 in
    postgres) echo "$STATE/postgres" ;;
    mariadb) echo "$STATE/mariadb" ;;
    kafka) echo "kafka.Kafka" ;;
    registry) echo "quarkus.http.port=$REGISTRY_PORT " ;;
    registry-tls) echo "quarkus.http.ssl-port=$REGISTRY_TLS_PORT " ;;
  esac
}

# Whether the component's recorded pid is alive and still the process we started.
running() {
  local pid
  pid=$(recorded_pid "$1") || return 1
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$(cmdline_marker "$1")"
}

component_port() {
  case $1 in
    postgres) echo "$PG_PORT" ;;
    mariadb) echo "$MYSQL_PORT" ;;
    kafka) echo "$KAFKA_PORT" ;;
    registry) echo "$REGISTRY_PORT" ;;
    registry-tls) echo "$REGISTRY_TLS_PORT" ;;
  esac
}

component_log() {
  case $1 in
    postgres) echo "$STATE/postgres/server.log" ;;
    mariadb) echo "$STATE/mariadb/server.log" ;;
    kafka) echo "$STATE/kafka/server.log" ;;
    registry) echo "$STATE/registry/server.log" ;;
    registry-tls) echo "$STATE/registry-tls/server.log" ;;
  esac
}
