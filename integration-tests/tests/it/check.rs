//! `fhir-cdc check` against the real stack: the reference configs pass, and each broken or
//! stopped component is named with a fix — without printing credentials.

use std::{net::TcpListener, path::Path, process::Command};

use crate::stack;

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

/// A local port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_reference_configs_pass_against_the_stack() {
    for (file, source_line) in [
        ("lab-postgres.toml", "ok    postgres  wal_level = logical"),
        ("billing-mysql.toml", "ok    mysql     binlog_format = ROW"),
    ] {
        let outcome = check(&reference(file), &[]);
        assert_eq!(outcome.code, 0, "{file}:\n{}", outcome.stdout);
        for expected in [
            source_line,
            "ok    kafka     1 broker(s) answer at",
            "ok    registry  Confluent-compatible API answers at",
            "0 problem(s), 0 warning(s)",
        ] {
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
    let (pg, kafka, registry) = (closed_port(), closed_port(), closed_port());
    let outcome = check(
        &reference("lab-postgres.toml"),
        &[
            (
                "FHIR_CDC_PG_URL",
                format!("postgres://cdc:pw@127.0.0.1:{pg}/lab"),
            ),
            ("FHIR_CDC_KAFKA_BOOTSTRAP", format!("127.0.0.1:{kafka}")),
            (
                "FHIR_CDC_SCHEMA_REGISTRY_URL",
                format!("http://127.0.0.1:{registry}"),
            ),
        ],
    );
    assert_eq!(outcome.code, 1, "{}", outcome.stdout);
    for expected in [
        format!("FAIL  postgres  nothing is listening at 127.0.0.1:{pg}/lab as cdc (connection refused)"),
        "fix: start PostgreSQL, or correct the host/port".to_owned(),
        format!("FAIL  kafka     no Kafka broker answered at 127.0.0.1:{kafka}"),
        "fix: start Kafka, or correct bootstrap.servers".to_owned(),
        format!("FAIL  registry  nothing is listening at http://127.0.0.1:{registry}"),
        "fix: start the schema registry".to_owned(),
        "3 problem(s)".to_owned(),
    ] {
        assert!(outcome.stdout.contains(&expected), "`{expected}` missing from:\n{}", outcome.stdout);
    }
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
        outcome
            .stdout
            .contains(&format!("FAIL  config    {}", typo.display())),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("unknown field `slot_nmae`"),
        "{}",
        outcome.stdout
    );
    assert!(outcome.stdout.contains("line 18"), "{}", outcome.stdout);

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
