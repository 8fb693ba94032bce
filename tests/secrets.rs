//! No secret is ever printed: sentinel values in every secret a configuration holds (the
//! source's and the read model's passwords, the registry's credentials and bearer token, a Kafka password
//! under a misspelt key, a password in a line TOML cannot parse, a password in a field of
//! the wrong type), fed through the failing paths of every command, must not appear in
//! anything the commands write. Nothing here needs a running service: every address is
//! closed, which is the point.

use std::{path::Path, process::Command, time::Duration};

const SENTINELS: [&str; 8] = [
    "SentinelPg7781",
    "SentinelRegistry7782",
    "SentinelKafka7783",
    "SentinelToml7784",
    "SentinelProjection7785",
    "SentinelTokenKey7786SentinelTokenKey7786",
    "SentinelRegistryPassword7787",
    "SentinelBearer7788",
];

fn fhir_cdc(args: &[&str], config: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-cdc"))
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Commands that retry an absent service are stopped after a while, as an operator would.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_no_sentinel(what: &str, said: &str) {
    assert!(!said.trim().is_empty(), "{what} said nothing");
    for sentinel in SENTINELS {
        assert!(
            !said.contains(sentinel),
            "{what} printed {sentinel}:\n{said}"
        );
    }
}

#[test]
fn no_command_prints_a_secret_on_its_failing_paths() {
    let dir = std::env::temp_dir().join(format!("fhir-cdc-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let [pg, registry, kafka, toml, projection, token_key, registry_password, bearer] = SENTINELS;
    let mappings = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/lab");
    let connector_text = format!(
        r#"name = "sentinel"
[source]
kind = "postgres"
url = "postgres://fhir:{pg}@127.0.0.1:1/db"
[kafka]
bootstrap.servers = "127.0.0.1:1"
sasl.password = "{kafka}"
[schema_registry]
url = "http://user:{registry}@127.0.0.1:1"
username = "user"
password = "{registry_password}"
[mappings]
path = "{}"
source_system = "urn:oid:2.16.840.1.113883.19.5"
token_key = "{token_key}"
"#,
        mappings.display()
    );
    let connector = dir.join("connector.toml");
    std::fs::write(&connector, &connector_text).unwrap();
    // A misspelt Kafka key is refused by librdkafka, which quotes the value it refuses.
    let misspelt = dir.join("misspelt.toml");
    std::fs::write(
        &misspelt,
        connector_text.replace("sasl.password", "sasl.pasword"),
    )
    .unwrap();
    let projector = dir.join("projector.toml");
    std::fs::write(
        &projector,
        format!(
            r#"name = "sentinel-projection"
[kafka]
bootstrap.servers = "127.0.0.1:1"
sasl.password = "{kafka}"
[schema_registry]
url = "http://127.0.0.1:1"
bearer_token = "{bearer}"
[topics]
prefix = "fhir"
[projection]
url = "postgres://fhir:{projection}@127.0.0.1:1/db"
schema = "fhir_projection"
"#
        ),
    )
    .unwrap();
    let unparsable = dir.join("unparsable.toml");
    std::fs::write(
        &unparsable,
        format!("name = \"x\"\n[source]\nkind = \"postgres\"\nurl = \"postgres://a:{toml}@h/db\n"),
    )
    .unwrap();
    let mistyped = dir.join("mistyped.toml");
    std::fs::write(
        &mistyped,
        format!(
            "name = \"x\"\n[source]\nkind = \"mysql\"\nurl = \"mysql://a:b@h/db\"\nserver.id = \"{toml}\"\n"
        ),
    )
    .unwrap();

    let runs: Vec<(&str, &[&str], &Path)> = vec![
        ("check", &["check"], &connector),
        ("run", &["run"], &connector),
        ("tail", &["tail", "--to-end"], &connector),
        ("dlq list", &["dlq", "list"], &connector),
        ("offsets show", &["offsets", "show"], &connector),
        ("project", &["project"], &projector),
        ("dlq list (projector)", &["dlq", "list"], &projector),
        ("check of unparsable TOML", &["check"], &unparsable),
        ("check of a mistyped field", &["check"], &mistyped),
        ("check with a misspelt Kafka key", &["check"], &misspelt),
        ("run with a misspelt Kafka key", &["run"], &misspelt),
        (
            "tail with a misspelt Kafka key",
            &["tail", "--to-end"],
            &misspelt,
        ),
        // The same paths with JSON log lines.
        (
            "run, JSON logs",
            &["--log-format", "json", "run"],
            &connector,
        ),
        (
            "project, JSON logs",
            &["--log-format", "json", "project"],
            &projector,
        ),
        (
            "run with a misspelt Kafka key, JSON logs",
            &["--log-format", "json", "run"],
            &misspelt,
        ),
    ];
    // Side by side: most of them wait out an absent service.
    let said: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = runs
            .iter()
            .map(|(_, args, config)| scope.spawn(move || fhir_cdc(args, config)))
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for ((what, _, config), said) in runs.iter().zip(&said) {
        assert_no_sentinel(what, said);
        if *config == unparsable.as_path() {
            assert!(
                said.contains("unparsable.toml:4:"),
                "the place is named: {said}"
            );
        }
        if *config == misspelt.as_path() {
            // The typo is still explained.
            assert!(said.contains("sasl.pasword"), "{what}: {said}");
        }
        if what.ends_with("JSON logs") {
            // Every log line is one JSON object with a time, a level and a component (the
            // command's own last words, on a failure, are plain text after them).
            let logged: Vec<&str> = said.lines().filter(|l| l.starts_with('{')).collect();
            // `run` logs its start before it meets the absent services.
            assert!(
                !what.starts_with("run") || !logged.is_empty(),
                "{what} logged no JSON line: {said}"
            );
            for line in logged {
                let object: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
                for field in ["timestamp", "level", "target"] {
                    assert!(object.get(field).is_some(), "{what}: no {field}: {line}");
                }
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
