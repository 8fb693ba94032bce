//! The deployment files cannot run here (no container engine, no Kubernetes, no systemd as
//! PID 1), so they are checked for what they must hold: each Kubernetes container's probes
//! on the health paths, at the port its configuration's `[metrics] listen` serves; that
//! configuration loading with fhir-cdc's own loader; the systemd unit running `run` with a
//! restart on failure; the image running as a non-root user and exposing those ports.

use std::path::Path;

use fhir_cdc::{config::ConnectorConfig, consumer::ProjectorConfig};
use serde_yaml_ng::Value;

use crate::stack;

/// The documents of a multi-document YAML file under `deploy/`.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(stack::repo_root().join("deploy").join(file)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"))
        })
        .collect()
}

/// Check each container of `file` that runs fhir-cdc; `load` loads the configuration its
/// arguments name (written out from the ConfigMap) and returns its `[metrics] listen` port.
fn check(file: &str, load: impl Fn(&Path) -> u16) {
    let documents = documents(file);
    let config_map = documents
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .unwrap_or_else(|| panic!("{file}: no ConfigMap"));
    let mount = "/etc/fhir-cdc/";
    let mut checked = 0;
    for deployment in documents.iter().filter(|d| d["kind"] == "Deployment") {
        let containers = deployment["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap();
        for container in containers.iter().filter(|c| c["name"] == "fhir-cdc") {
            let args: Vec<&str> = container["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
            let key = path
                .strip_prefix(mount)
                .unwrap_or_else(|| panic!("{file}: --config {path} is not under {mount}"));
            let toml = config_map["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: the ConfigMap has no {key}"));
            let dir = std::env::temp_dir().join(stack::unique("deploy"));
            std::fs::create_dir_all(&dir).unwrap();
            let written = dir.join(key);
            // Read as the Pod reads it, but with the stack's mappings and secrets.
            let toml = toml
                .replace(
                    "/etc/fhir-cdc/mappings",
                    &stack::repo_root()
                        .join("mappings/lab")
                        .display()
                        .to_string(),
                )
                .replace("FHIR_CDC_PROJECTION_URL", "FHIR_CDC_PG_URL");
            std::fs::write(&written, toml).unwrap();
            let port = load(&written);
            std::fs::remove_dir_all(dir).unwrap();
            for (probe, path) in [
                ("startupProbe", "/health/started"),
                ("livenessProbe", "/health/live"),
                ("readinessProbe", "/health/ready"),
            ] {
                let get = &container[probe]["httpGet"];
                assert_eq!(get["path"], path, "{file}: {probe}");
                assert_eq!(
                    get["port"].as_u64(),
                    Some(u64::from(port)),
                    "{file}: {probe}"
                );
            }
            assert_eq!(
                container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{file}: the image writes nothing"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{file}: no fhir-cdc container");
}

#[test]
fn the_kubernetes_examples_probe_the_health_paths_their_configurations_serve() {
    check("kubernetes/sidecar.yaml", |path| {
        let config = ConnectorConfig::load(path).unwrap();
        config.metrics.expect("[metrics] listen").listen.port()
    });
    check("kubernetes/projector.yaml", |path| {
        let config = ProjectorConfig::load(path).unwrap();
        config.metrics.expect("[metrics] listen").listen.port()
    });
}

#[test]
fn the_systemd_unit_and_the_image_run_fhir_cdc_as_the_docs_say() {
    let unit = std::fs::read_to_string(stack::repo_root().join("deploy/systemd/fhir-cdc@.service"))
        .unwrap();
    let lines: Vec<&str> = unit.lines().collect();
    for wanted in [
        "ExecStart=/usr/local/bin/fhir-cdc run --config /etc/fhir-cdc/%i.toml",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
    ] {
        assert!(lines.contains(&wanted), "the unit lacks `{wanted}`");
    }
    let image = std::fs::read_to_string(stack::repo_root().join("Containerfile")).unwrap();
    let last_stage = image.rsplit("\nFROM ").next().unwrap();
    assert!(
        last_stage
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root")),
        "the image runs as a non-root user"
    );
    assert!(last_stage.contains("EXPOSE 9464 9465"));
}
