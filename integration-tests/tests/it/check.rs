//! `fhir-cdc check` against the real stack: the reference configs pass, and each broken or
//! stopped component is named with a fix — without printing credentials.

use std::{path::Path, process::Command};

use crate::{connector::free_port, stack};

struct Outcome {
    code: i32,
    stdout: String,
}

fn check(config: &Path, env: &[(&str, String)]) -> Outcome {
    let output = Command::new(stack::fhir_cdc_bin())
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.is_empty(), "check wrote to stderr: {stderr}");
    Outcome {
        code: output.status.code().unwrap(),
        stdout,
    }
}

fn reference(name: &str) -> std::path::PathBuf {
    stack::repo_root().join("connectors").join(name)
}

/// Run `sql` on the stack's PostgreSQL.
fn execute(sql: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, connection) =
                tokio_postgres::connect(&stack::pg_url(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            client.batch_execute(sql).await.unwrap();
        });
}

/// The sample lab tables, as a DBA would prepare them (schema.sql: full replica identity).
fn ensure_lab_tables() {
    let ddl = std::fs::read_to_string(stack::repo_root().join("mappings/lab/schema.sql"))
        .unwrap()
        .replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ");
    execute(&ddl);
}

/// The sample billing tables on the stack's MariaDB (`make demo` makes them too).
fn ensure_billing_tables() {
    let ddl = std::fs::read_to_string(stack::repo_root().join("mappings/billing/schema.sql"))
        .unwrap()
        .replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ");
    stack::mariadb_root(&ddl);
}

#[test]
fn the_reference_configs_pass_against_the_stack() {
    ensure_lab_tables();
    ensure_billing_tables();
    // PostgreSQL's default sslmode (prefer) gets the stack's TLS; a MySQL URL without
    // ssl-mode is plaintext, and said to be.
    for (file, source_lines) in [
        (
            "lab-postgres.toml",
            [
                "ok    postgres  wal_level = logical",
                ", TLSv1.3, the server's certificate not verified (sslmode=verify-full verifies it))",
                "ok    postgres  lis.lab_result: REPLICA IDENTITY FULL",
                "0 problem(s), 0 warning(s)",
            ],
        ),
        (
            "billing-mysql.toml",
            [
                "ok    mysql     binlog_format = ROW",
                "), unencrypted\n                fix: give the server ssl_cert and ssl_key, and set ssl-mode=VERIFY_IDENTITY",
                // The user may only SELECT these tables: their keys are read all the same.
                "ok    mysql     billing.charge is readable, primary key (charge_id)",
                "0 problem(s), 1 warning(s)",
            ],
        ),
        (
            "projector.toml",
            [
                "checking projector `lab-projection`",
                "ok    projection connected to ",
                "ok    config    parsed and valid",
                "0 problem(s), 0 warning(s)",
            ],
        ),
    ] {
        let outcome = check(&reference(file), &[]);
        assert_eq!(outcome.code, 0, "{file}:\n{}", outcome.stdout);
        for expected in source_lines.into_iter().chain([
            "ok    kafka     1 broker(s) answer at",
            "ok    registry  Confluent-compatible API answers at",
        ]) {
            assert!(
                outcome.stdout.contains(expected),
                "{file}: `{expected}` missing from:\n{}",
                outcome.stdout
            );
        }
    }
}

#[test]
fn stopped_components_are_named_with_the_fix() {
    let (pg, kafka, registry) = (free_port(), free_port(), free_port());
    let env = [
        (
            "FHIR_CDC_PG_URL",
            format!("postgres://cdc:pw@127.0.0.1:{pg}/lab"),
        ),
        ("FHIR_CDC_KAFKA_BOOTSTRAP", format!("127.0.0.1:{kafka}")),
        (
            "FHIR_CDC_SCHEMA_REGISTRY_URL",
            format!("http://127.0.0.1:{registry}"),
        ),
    ];
    // A connector's configuration, and a projector's (its projection database stopped).
    for file in ["lab-postgres.toml", "projector.toml"] {
        let outcome = check(&reference(file), &env);
        assert_eq!(outcome.code, 1, "{file}: {}", outcome.stdout);
        for expected in [
            format!("FAIL  postgres  nothing is listening at 127.0.0.1:{pg}/lab as cdc (connection refused)"),
            "fix: start PostgreSQL, or correct the host/port".to_owned(),
            format!("FAIL  kafka     no Kafka broker answered at 127.0.0.1:{kafka}"),
            "fix: start Kafka, or correct bootstrap.servers".to_owned(),
            format!("FAIL  registry  nothing is listening at http://127.0.0.1:{registry}"),
            "fix: start the schema registry".to_owned(),
            "3 problem(s)".to_owned(),
        ] {
            assert!(outcome.stdout.contains(&expected), "{file}: `{expected}` missing from:\n{}", outcome.stdout);
        }
    }
}

/// No SQL Server runs here: its reference configuration is read, its mappings checked, and
/// the server reported unreachable with the fix, the password never printed.
#[test]
fn the_sql_server_reference_config_is_read_and_its_server_named_unreachable() {
    let port = free_port();
    let secret = "sentinel-mssql-4711";
    let env = [
        ("FHIR_CDC_MSSQL_SERVER", format!("127.0.0.1,{port}")),
        ("FHIR_CDC_MSSQL_PASSWORD", secret.to_owned()),
    ];
    let outcome = check(&reference("adt-sqlserver.toml"), &env);
    assert_eq!(outcome.code, 1, "{}", outcome.stdout);
    for expected in [
        "ok    config    parsed and valid".to_owned(),
        format!("FAIL  sqlserver nothing is listening at 127.0.0.1:{port} (connection refused)"),
        "fix: start SQL Server".to_owned(),
        "ok    kafka     1 broker(s) answer at".to_owned(),
        "1 problem(s)".to_owned(),
    ] {
        assert!(
            outcome.stdout.contains(&expected),
            "`{expected}` missing from:\n{}",
            outcome.stdout
        );
    }
    assert!(!outcome.stdout.contains(secret), "{}", outcome.stdout);
}

#[test]
fn a_wrong_password_is_an_authentication_failure_and_is_never_printed() {
    let secret = "wrong-secret-4711";
    for (file, var, url) in [
        ("lab-postgres.toml", "FHIR_CDC_PG_URL", stack::pg_url()),
        (
            "billing-mysql.toml",
            "FHIR_CDC_MYSQL_URL",
            stack::mysql_url(),
        ),
    ] {
        // Swap the stack's password (user and password are both `fhir_cdc`) for a wrong one.
        let wrong = url.replacen(":fhir_cdc@", &format!(":{secret}@"), 1);
        assert_ne!(wrong, url);
        let outcome = check(&reference(file), &[(var, wrong)]);
        assert_eq!(outcome.code, 1, "{}", outcome.stdout);
        assert!(
            outcome
                .stdout
                .contains("authentication failed at 127.0.0.1:"),
            "{file}:\n{}",
            outcome.stdout
        );
        assert!(
            outcome.stdout.contains("fix: check the password of"),
            "{file}:\n{}",
            outcome.stdout
        );
        assert!(
            !outcome.stdout.contains(secret),
            "{file} printed the password:\n{}",
            outcome.stdout
        );
    }
}

#[test]
fn bad_configuration_is_refused_with_file_and_line() {
    let dir = std::env::temp_dir().join(stack::unique("check_config"));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(reference("lab-postgres.toml")).unwrap();

    let typo = dir.join("typo.toml");
    std::fs::write(
        &typo,
        text.replace(
            "kind = \"postgres\"",
            "kind = \"postgres\"\nslot_nmae = \"x\"",
        ),
    )
    .unwrap();
    let outcome = check(&typo, &[]);
    assert_eq!(outcome.code, 2, "{}", outcome.stdout);
    assert!(
        outcome.stdout.contains(&format!(
            "FAIL  config    {}:18:1: unknown field `slot_nmae`",
            typo.display()
        )),
        "{}",
        outcome.stdout
    );

    let unset = dir.join("unset.toml");
    std::fs::write(
        &unset,
        text.replace("FHIR_CDC_PG_URL", "FHIR_CDC_NOT_SET_ANYWHERE"),
    )
    .unwrap();
    let outcome = check(&unset, &[]);
    assert_eq!(outcome.code, 2, "{}", outcome.stdout);
    assert!(
        outcome
            .stdout
            .contains("environment variable FHIR_CDC_NOT_SET_ANYWHERE is not set"),
        "{}",
        outcome.stdout
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn check_mappings(dir: &Path) -> Outcome {
    let output = Command::new(stack::fhir_cdc_bin())
        .args(["check", "--mappings"])
        .arg(dir)
        .current_dir(stack::repo_root())
        .output()
        .unwrap();
    Outcome {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
    }
}

#[test]
fn the_sample_mappings_are_valid_and_broken_ones_are_located() {
    let samples = check_mappings(Path::new("mappings"));
    assert_eq!(samples.code, 0, "{}", samples.stdout);
    assert!(
        samples.stdout.contains(
            "ok    mapping   lab.result (mappings/lab/result.yaml): lis.lab_result → Observation"
        ),
        "{}",
        samples.stdout
    );
    assert!(
        samples.stdout.contains("mapping(s) valid in mappings"),
        "{}",
        samples.stdout
    );
    // Every sample reference points at a type a sample makes, or is marked external.
    assert!(!samples.stdout.contains("WARN"), "{}", samples.stdout);

    // One connector's mappings alone: the lab's results refer to ServiceRequests, which
    // only the order mapping makes; without it, check warns (and still passes).
    let dir = std::env::temp_dir().join(stack::unique("unmade"));
    stack::lab_mappings(&dir, "lis", &["result.yaml"]);
    let alone = check_mappings(&dir);
    assert_eq!(alone.code, 0, "{}", alone.stdout);
    let warned = format!(
        "WARN  mapping   {}:17:7: Observation.basedOn[0].reference refers to a ServiceRequest, which none of these mappings makes",
        dir.join("result.yaml").display()
    );
    assert!(alone.stdout.contains(&warned), "{}", alone.stdout);
    assert!(
        alone
            .stdout
            .contains("write `external: true` on the reference"),
        "{}",
        alone.stdout
    );
    std::fs::remove_dir_all(dir).unwrap();

    let broken = check_mappings(Path::new("tests/bad-mappings"));
    assert_eq!(broken.code, 1, "{}", broken.stdout);
    assert!(
        broken.stdout.contains("tests/bad-mappings/unknown-element.yaml:14:7: Observation.valueQuantity.valu: Quantity has no element `valu`"),
        "{}",
        broken.stdout
    );
    assert!(
        broken
            .stdout
            .contains("problem(s) in the mappings under tests/bad-mappings"),
        "{}",
        broken.stdout
    );
}

#[test]
fn capture_prerequisites_of_the_mapped_tables_are_named() {
    let schema = stack::unique("capture");
    execute(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.\"Lab_Result\" (result_id int PRIMARY KEY);"
    ));
    let dir = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    let lab = stack::repo_root().join("mappings/lab");
    // A legacy table's mixed-case name: every fix must quote it as the catalogue spells it.
    // The patient mapping names it in the wrong case: check says how the catalogue spells it.
    for (file, table) in [
        ("result.yaml", "Lab_Result"),
        ("specimen.yaml", "missing"),
        ("patient.yaml", "LAB_RESULT"),
    ] {
        let source_table = match file {
            "result.yaml" => "lis.lab_result",
            "patient.yaml" => "lis.patient",
            _ => "lis.specimen",
        };
        let text = std::fs::read_to_string(lab.join(file))
            .unwrap()
            .replace(source_table, &format!("{schema}.{table}"));
        std::fs::write(dir.join("mappings").join(file), text).unwrap();
    }
    std::fs::copy(
        lab.join("tests.codes.yaml"),
        dir.join("mappings/tests.codes.yaml"),
    )
    .unwrap();
    let reference = std::fs::read_to_string(reference("lab-postgres.toml")).unwrap();
    let config = dir.join("connector.toml");
    std::fs::write(
        &config,
        reference.replace("path = \"../mappings/lab\"", "path = \"mappings\""),
    )
    .unwrap();

    let outcome = check(&config, &[]);
    assert_eq!(outcome.code, 1, "{}", outcome.stdout);
    for expected in [
        format!("WARN  postgres  {schema}.Lab_Result: REPLICA IDENTITY DEFAULT"),
        format!("fix: run ALTER TABLE \"{schema}\".\"Lab_Result\" REPLICA IDENTITY FULL;"),
        format!("FAIL  postgres  table {schema}.missing does not exist, but a mapping reads it"),
        format!("FAIL  postgres  table {schema}.LAB_RESULT does not exist, but a mapping reads it; {schema}.Lab_Result differs only in case"),
        // The table has only its key: the mapping's other columns would dead-letter every row.
        format!("FAIL  postgres  {schema}.Lab_Result has no column abnormal_flag, accession_no, collected_at"),
        "ok    postgres  slot fhir_cdc_lab_postgres does not exist yet: `run` creates it"
            .to_owned(),
    ] {
        assert!(
            outcome.stdout.contains(&expected),
            "`{expected}` missing from:\n{}",
            outcome.stdout
        );
    }

    // A slot that exists: where `run` resumes, and how much WAL the server keeps for it.
    let slot = format!("{schema}_slot");
    execute(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput');"
    ));
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "# slot.name = \"fhir_cdc_lab_postgres\"",
            &format!("slot.name = \"{slot}\""),
        ),
    )
    .unwrap();
    let outcome = check(&config, &[]);
    execute(&format!("SELECT pg_drop_replication_slot('{slot}');"));
    let line = outcome
        .stdout
        .lines()
        .find(|l| l.contains(&format!("slot {slot} ")))
        .unwrap_or_else(|| panic!("no line on slot {slot} in:\n{}", outcome.stdout));
    assert!(
        line.starts_with(&format!(
            "ok    postgres  slot {slot} exists; `run` resumes after "
        )) && line.contains("(the server keeps ")
            && line.ends_with(" of WAL for it)"),
        "{line}"
    );

    execute(&format!("DROP SCHEMA {schema} CASCADE;"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A table without a replica identity is a problem for `check`, and `run` refuses to
/// publish it: once published, the application's own UPDATEs and DELETEs on it would fail.
#[test]
fn a_table_without_a_replica_identity_is_named_and_never_published() {
    let schema = stack::unique("noidentity");
    let dir = std::env::temp_dir().join(&schema);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(stack::pg_client());
    runtime.block_on(stack::create_lab_schema(&client, &schema));
    execute(&format!(
        "ALTER TABLE {schema}.lab_result DROP CONSTRAINT lab_result_pkey, REPLICA IDENTITY DEFAULT;
         ALTER TABLE {schema}.specimen REPLICA IDENTITY NOTHING;
         INSERT INTO {schema}.lab_result (accession_no, mrn, test_code, result_status, collected_at)
              VALUES ('A1', 'MRN1', 'GLU', 'F', now());"
    ));
    stack::lab_mappings(
        &dir.join("mappings"),
        &schema,
        &["result.yaml", "specimen.yaml"],
    );
    let config = stack::connector_config(&dir, &schema, &schema, "");

    let outcome = check(&config, &[]);
    assert_eq!(outcome.code, 1, "{}", outcome.stdout);
    for expected in [
        format!("FAIL  postgres  {schema}.lab_result: REPLICA IDENTITY DEFAULT without a primary key: once the table is published, the application's UPDATEs and DELETEs on it fail"),
        format!("fix: run ALTER TABLE \"{schema}\".\"lab_result\" REPLICA IDENTITY FULL; (or give it a primary key)"),
        format!("FAIL  postgres  {schema}.specimen: REPLICA IDENTITY NOTHING"),
    ] {
        assert!(outcome.stdout.contains(&expected), "`{expected}` missing from:\n{}", outcome.stdout);
    }

    let log = dir.join("run.log");
    let status = crate::connector::exit_within(
        crate::connector::start(&config, &log),
        std::time::Duration::from_secs(60),
        "refusing the tables",
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "not publishing {schema}.lab_result, {schema}.specimen"
        )),
        "{said}"
    );
    // The application goes on as before, and nothing was published.
    execute(&format!(
        "UPDATE {schema}.lab_result SET result_status = 'C'; DELETE FROM {schema}.lab_result;"
    ));
    let published: i64 = runtime
        .block_on(client.query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE schemaname = $1",
            &[&schema],
        ))
        .unwrap()
        .get(0);
    assert_eq!(published, 0);

    execute(&format!(
        "ALTER TABLE {schema}.lab_result REPLICA IDENTITY FULL; ALTER TABLE {schema}.specimen REPLICA IDENTITY DEFAULT;"
    ));
    let outcome = check(&config, &[]);
    for expected in [
        format!("ok    postgres  {schema}.lab_result: REPLICA IDENTITY FULL"),
        format!("WARN  postgres  {schema}.specimen: REPLICA IDENTITY DEFAULT: updates carry only the key"),
    ] {
        assert!(outcome.stdout.contains(&expected), "`{expected}` missing from:\n{}", outcome.stdout);
    }
    let slot = format!("fhir_cdc_{schema}");
    runtime.block_on(stack::drop_capture(&client, &slot, &slot, &schema));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_environment_overrides_any_key_and_check_says_which_never_the_value() {
    ensure_lab_tables();
    let dir = std::env::temp_dir().join(stack::unique("check_env"));
    std::fs::create_dir_all(&dir).unwrap();
    // A file pointing at a registry and a broker nobody runs: the environment puts the
    // stack's in, as a platform team's deployment would.
    let text = std::fs::read_to_string(reference("lab-postgres.toml"))
        .unwrap()
        .replace(
            "url = \"${env:FHIR_CDC_SCHEMA_REGISTRY_URL}\"",
            &format!("url = \"http://127.0.0.1:{}\"", free_port()),
        )
        .replace(
            "bootstrap.servers = \"${env:FHIR_CDC_KAFKA_BOOTSTRAP}\"",
            &format!("bootstrap.servers = \"127.0.0.1:{}\"", free_port()),
        );
    assert!(
        text.contains("http://127.0.0.1:"),
        "the reference config changed"
    );
    let config = dir.join("lab.toml");
    std::fs::write(&config, text).unwrap();
    let outcome = check(
        &config,
        &[
            ("FHIR_CDC__SCHEMA_REGISTRY__URL", stack::registry_url()),
            (
                "FHIR_CDC__KAFKA__BOOTSTRAP__SERVERS",
                stack::kafka_bootstrap(),
            ),
            // The source URL holds the password: named, never shown.
            ("FHIR_CDC__SOURCE__URL", stack::pg_url()),
            (
                "FHIR_CDC_PG_URL",
                "postgres://nobody:x@127.0.0.1:1/none".to_owned(),
            ),
            // The copy's relative mapping path points nowhere; the environment fixes it.
            (
                "FHIR_CDC__MAPPINGS__PATH",
                stack::repo_root()
                    .join("mappings/lab")
                    .display()
                    .to_string(),
            ),
        ],
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stdout);
    for said in [
        "from the environment:",
        "schema_registry.url (FHIR_CDC__SCHEMA_REGISTRY__URL)",
        "kafka.bootstrap.servers (FHIR_CDC__KAFKA__BOOTSTRAP__SERVERS)",
        "source.url (FHIR_CDC__SOURCE__URL)",
        "mappings.path (FHIR_CDC__MAPPINGS__PATH)",
    ] {
        assert!(outcome.stdout.contains(said), "{said}:\n{}", outcome.stdout);
    }
    assert!(
        !outcome.stdout.contains(&stack::pg_url()),
        "{}",
        outcome.stdout
    );
    let secret = "env-secret-0815";

    // An override that cannot apply names its variable, never its value.
    let outcome = check(
        &config,
        &[("FHIR_CDC__HEALTH__STALL_AFTER_SECONDS", secret.to_owned())],
    );
    assert_eq!(outcome.code, 2, "{}", outcome.stdout);
    assert!(
        outcome
            .stdout
            .contains("FHIR_CDC__HEALTH__STALL_AFTER_SECONDS"),
        "{}",
        outcome.stdout
    );
    assert!(!outcome.stdout.contains(secret), "{}", outcome.stdout);
    let outcome = check(
        &config,
        &[("FHIR_CDC__SCHEMA_REGISTRY__COLOUR", "blue".to_owned())],
    );
    assert_eq!(outcome.code, 2, "{}", outcome.stdout);
    assert!(
        outcome.stdout.contains("unknown field `colour`")
            && outcome.stdout.contains("FHIR_CDC__SCHEMA_REGISTRY__COLOUR"),
        "{}",
        outcome.stdout
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A table read only through a lookup needs no full old rows (its updates are never
/// suppressed): its default replica identity is fine, and `check` says so instead of
/// asking the DBA to change it.
#[test]
fn a_lookup_only_table_is_not_asked_for_full_old_rows() {
    let schema = stack::unique("lookuponly");
    let dir = std::env::temp_dir().join(&schema);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(stack::pg_client());
    runtime.block_on(stack::create_lab_schema(&client, &schema));
    execute(&format!(
        "ALTER TABLE {schema}.test_catalogue REPLICA IDENTITY DEFAULT;
         ALTER TABLE {schema}.poc_result REPLICA IDENTITY DEFAULT;"
    ));
    stack::lab_mappings(&dir.join("mappings"), &schema, &["poc_result.yaml"]);
    let config = stack::connector_config(&dir, &schema, &schema, "");
    let outcome = check(&config, &[]);
    assert!(
        outcome.stdout.contains(&format!(
            "ok    postgres  {schema}.test_catalogue: REPLICA IDENTITY DEFAULT (read through lookups only"
        )),
        "{}",
        outcome.stdout
    );
    // The mapped table itself is still warned about.
    assert!(
        outcome.stdout.contains(&format!(
            "WARN  postgres  {schema}.poc_result: REPLICA IDENTITY DEFAULT"
        )),
        "{}",
        outcome.stdout
    );
    execute(&format!("DROP SCHEMA {schema} CASCADE;"));
    std::fs::remove_dir_all(dir).unwrap();
}
