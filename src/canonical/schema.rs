//! Avro schemas of canonical events, generated from the FHIR R4 definitions.
//!
//! One schema per resource type: the event envelope with the resource as a nullable record.
//! The rule, so that any Avro reader can follow it:
//!
//! - **Names.** Resources and datatypes are records `fhir.r4.<Type>`; a backbone element is
//!   a record named after its path (`fhir.r4.Observation_ReferenceRange`). Each named record
//!   is defined once, where first used, and referenced by name afterwards.
//! - **Fields** carry FHIR JSON names, in definition order. A choice element `value[x]` is
//!   one field per allowed type (`valueQuantity`, `valueString`, …), as in FHIR JSON.
//! - **Cardinality.** A `0..1`/`1..1` element is `["null", T]` with default `null`; a
//!   repeating element is an array with default `[]` (FHIR JSON has no empty arrays, so
//!   absent and empty mean the same).
//! - **Primitives.** `boolean` → boolean; `integer`, `positiveInt`, `unsignedInt` → int;
//!   `decimal` → string holding the exact decimal text (`"12.50"`), with the field marked
//!   `"fhirType": "decimal"` so readers can turn it back into a JSON number without losing
//!   digits; every other primitive (dates, times, codes, uris, …) → string in its FHIR JSON
//!   form.
//! - **Recursion** (Identifier → Reference → Identifier, Questionnaire items, …) is an Avro
//!   reference to the enclosing named record: no depth cut-off, nothing truncated.
//! - **Extensions** are carried where mappings write them: `extension` of a resource, of a
//!   backbone element, and of an extension (nested extensions, as US Core race and
//!   ethnicity use). `Extension` is one record, `url` plus one field per `value[x]` type.
//! - **Left out**, because mappings cannot fill them: `modifierExtension` (it changes the
//!   meaning of what holds it, so a reader may not ignore it), `extension` of other
//!   datatypes and primitives, `id` of datatypes and backbone elements, and elements
//!   holding whole resources (`contained`, `Bundle.entry.resource`).
//!
//! Times in the envelope are `timestamp-micros`; the resource's own dates stay FHIR strings.

use std::collections::HashSet;

use serde_json::{json, Value as Json};

use crate::fhir::{definitions, upper_first, TypeKind};

/// The Avro namespace of FHIR records.
pub const FHIR_NAMESPACE: &str = "fhir.r4";
/// The Avro namespace of the envelope.
pub const EVENT_NAMESPACE: &str = "fhir_cdc.event";
/// Field attribute naming the FHIR type of string fields that are not plain strings.
pub const FHIR_TYPE_ATTRIBUTE: &str = "fhirType";

/// The Avro schema (as JSON) of canonical events carrying `resource_type`.
pub fn event_schema(resource_type: &str) -> Json {
    let mut generator = Generator {
        defined: HashSet::new(),
    };
    let resource = generator.record(resource_type, &format!("{FHIR_NAMESPACE}.{resource_type}"));
    let optional_string = json!(["null", "string"]);
    let micros = json!({"type": "long", "logicalType": "timestamp-micros"});
    json!({
        "type": "record",
        "name": format!("{resource_type}Event"),
        "namespace": EVENT_NAMESPACE,
        "doc": format!("One version of one FHIR R4 {resource_type}, with provenance (fhir-cdc canonical event)."),
        "fields": [
            {"name": "event_id", "type": "string", "doc": "Deterministic: a re-read change keeps its id."},
            {"name": "resource_type", "type": "string"},
            {"name": "resource_id", "type": "string"},
            {"name": "resource_version", "type": "string", "doc": "Orders the versions of one resource; equals meta.versionId."},
            {"name": "op", "type": {"type": "enum", "name": "Op", "symbols": ["upsert", "delete"]}},
            {"name": "domain", "type": "string"},
            {"name": "sensitivity", "type": "string"},
            {"name": "resource", "type": ["null", resource], "default": null},
            {"name": "provenance", "type": {
                "type": "record",
                "name": "Provenance",
                "fields": [
                    {"name": "source_system", "type": "string"},
                    {"name": "connector", "type": "string"},
                    {"name": "database_kind", "type": "string"},
                    {"name": "database", "type": "string"},
                    {"name": "schema", "type": "string"},
                    {"name": "table", "type": "string"},
                    {"name": "primary_key", "type": {"type": "array", "items": {
                        "type": "record",
                        "name": "KeyColumn",
                        "fields": [
                            {"name": "column", "type": "string"},
                            {"name": "value", "type": optional_string.clone(), "default": null}
                        ]
                    }}},
                    {"name": "source_position", "type": "string"},
                    {"name": "transaction_id", "type": optional_string, "default": null},
                    {"name": "commit_time", "type": ["null", micros.clone()], "default": null},
                    {"name": "capture_time", "type": micros},
                    {"name": "mapping_id", "type": "string"},
                    {"name": "mapping_version", "type": "string"},
                    {"name": "snapshot", "type": "boolean"}
                ]
            }}
        ]
    })
}

struct Generator {
    defined: HashSet<String>,
}

/// Whether the schemas carry elements named `name` of `container` (a resource type, a
/// datatype or a backbone element's path). The mapping loader refuses what they do not, so
/// that nothing `check` accepts fails to encode.
pub fn carried(name: &str, container: &str) -> bool {
    let resource = || definitions().is_resource(container);
    match name {
        "modifierExtension" => false,
        "extension" => container == "Extension" || container.contains('.') || resource(),
        "id" => resource(),
        _ => true,
    }
}

impl Generator {
    /// The record for the elements under `definition`, or a reference to it by name when
    /// it is already defined.
    fn record(&mut self, definition: &str, name: &str) -> Json {
        if !self.defined.insert(name.to_owned()) {
            return Json::String(name.to_owned());
        }
        let mut fields = Vec::new();
        for element in definitions().elements_of(definition) {
            if !carried(element.name, definition) {
                continue;
            }
            if let Some(target) = element.content_reference {
                let record = self.record(target, &backbone_name(target));
                fields.push(field(element.name, record, element.repeats, None));
                continue;
            }
            let choice = element.name.strip_suffix("[x]");
            for type_code in element.types {
                let avro_type = if matches!(type_code.as_str(), "BackboneElement" | "Element") {
                    self.record(&element.path, &backbone_name(&element.path))
                } else {
                    match definitions().kind(type_code) {
                        Some(TypeKind::Primitive) => Json::String(primitive(type_code).to_owned()),
                        Some(TypeKind::Complex) => {
                            self.record(type_code, &format!("{FHIR_NAMESPACE}.{type_code}"))
                        }
                        // Whole resources (`contained`, `Bundle.entry.resource`: type
                        // `Resource`, which is abstract and not in the table).
                        Some(TypeKind::Resource) | None => continue,
                    }
                };
                let field_name = match choice {
                    Some(base) => format!("{base}{}", upper_first(type_code)),
                    None => element.name.to_owned(),
                };
                let fhir_type = (type_code == "decimal").then_some("decimal");
                fields.push(field(&field_name, avro_type, element.repeats, fhir_type));
            }
        }
        let (namespace, short) = name.rsplit_once('.').unwrap_or((FHIR_NAMESPACE, name));
        json!({"type": "record", "name": short, "namespace": namespace, "fields": fields})
    }
}

fn field(name: &str, avro_type: Json, repeats: bool, fhir_type: Option<&str>) -> Json {
    let mut field = if repeats {
        json!({"name": name, "type": {"type": "array", "items": avro_type}, "default": []})
    } else {
        json!({"name": name, "type": ["null", avro_type], "default": null})
    };
    if let Some(fhir_type) = fhir_type {
        field[FHIR_TYPE_ATTRIBUTE] = Json::String(fhir_type.to_owned());
    }
    field
}

fn primitive(type_code: &str) -> &'static str {
    match type_code {
        "boolean" => "boolean",
        "integer" | "positiveInt" | "unsignedInt" => "int",
        _ => "string",
    }
}

/// `Observation.referenceRange` → `fhir.r4.Observation_ReferenceRange`.
fn backbone_name(path: &str) -> String {
    let parts: Vec<String> = path.split('.').map(upper_first).collect();
    format!("{FHIR_NAMESPACE}.{}", parts.join("_"))
}

/// The schema files for the resource types `mappings` produce: file name
/// (`Observation.avsc`) → content (pretty JSON, newline-terminated).
pub fn schema_files<'a>(
    resource_types: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, String> {
    resource_types
        .into_iter()
        .map(|t| {
            let text = serde_json::to_string_pretty(&event_schema(t)).expect("schemas serialize");
            (format!("{t}.avsc"), text + "\n")
        })
        .collect()
}

/// Whether data written with `old` can be read with `new` (Avro schema resolution): the
/// BACKWARD compatibility the registry enforces by default. The error says what breaks.
pub fn backward_compatible(old: &str, new: &str) -> Result<(), String> {
    let old = apache_avro::Schema::parse_str(old)
        .map_err(|e| format!("the previous schema does not parse: {e}"))?;
    let new = apache_avro::Schema::parse_str(new)
        .map_err(|e| format!("the new schema does not parse: {e}"))?;
    apache_avro::schema_compatibility::SchemaCompatibility::can_read(&old, &new)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What keeps `new` from becoming the next version after `versions` (oldest first) under
/// `level` (Avro schema resolution, as the registry applies it): one line per version it
/// cannot join, naming the field; empty when it may. Non-transitive levels look at the
/// latest version only.
pub fn incompatibilities(
    level: crate::config::Compatibility,
    versions: &[(u32, String)],
    new: &str,
) -> Vec<String> {
    use apache_avro::schema_compatibility::SchemaCompatibility;
    let new = match apache_avro::Schema::parse_str(new) {
        Ok(new) => new,
        Err(e) => return vec![format!("the new schema does not parse: {e}")],
    };
    let compared = if level.transitive() {
        versions
    } else {
        versions
            .last()
            .map(std::slice::from_ref)
            .unwrap_or_default()
    };
    let mut problems = Vec::new();
    for (version, old) in compared {
        let old = match apache_avro::Schema::parse_str(old) {
            Ok(old) => old,
            Err(e) => {
                problems.push(format!("version {version} does not parse: {e}"));
                continue;
            }
        };
        if level.backward() {
            if let Err(e) = SchemaCompatibility::can_read(&old, &new) {
                problems.push(format!(
                    "the new schema cannot read what version {version} wrote: {}",
                    chain(&e)
                ));
            }
        }
        if level.forward() {
            if let Err(e) = SchemaCompatibility::can_read(&new, &old) {
                problems.push(format!(
                    "version {version} cannot read what the new schema writes: {}",
                    chain(&e)
                ));
            }
        }
    }
    problems
}

/// An error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use apache_avro::Schema;

    use super::*;

    #[test]
    fn compatibility_allows_new_optional_fields_and_refuses_removed_required_ones() {
        let v1 =
            json!({"type": "record", "name": "E", "fields": [{"name": "a", "type": "string"}]});
        let v2 = json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "string"}, {"name": "b", "type": ["null", "string"], "default": null}]});
        let v3 =
            json!({"type": "record", "name": "E", "fields": [{"name": "c", "type": "string"}]});
        assert_eq!(
            backward_compatible(&v1.to_string(), &v2.to_string()),
            Ok(())
        );
        assert!(backward_compatible(&v1.to_string(), &v3.to_string()).is_err());
        let observation = event_schema("Observation").to_string();
        assert_eq!(backward_compatible(&observation, &observation), Ok(()));
    }

    #[test]
    fn incompatibilities_follow_the_level_and_name_the_field() {
        use crate::config::Compatibility;
        let v1 =
            json!({"type": "record", "name": "E", "fields": [{"name": "a", "type": "string"}]});
        let v2 = json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "string"}, {"name": "b", "type": ["null", "string"], "default": null}]});
        let required = json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "string"}, {"name": "c", "type": "int"}]});
        let versions = vec![(1, v1.to_string())];
        let ok = incompatibilities(Compatibility::Backward, &versions, &v2.to_string());
        assert!(ok.is_empty(), "{ok:?}");
        let refused = incompatibilities(Compatibility::Backward, &versions, &required.to_string());
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("'c'") && refused[0].contains("version 1"),
            "{refused:?}"
        );
        // Old readers skip a new field: forward holds where backward does not.
        assert!(
            incompatibilities(Compatibility::Forward, &versions, &required.to_string()).is_empty()
        );
        assert!(
            incompatibilities(Compatibility::None, &versions, &required.to_string()).is_empty()
        );
        // Only transitive levels look past the latest version.
        let dropped_a = json!({"type": "record", "name": "E", "fields": [
            {"name": "c", "type": "int", "default": 0}]});
        let history = vec![(1, v1.to_string()), (2, dropped_a.to_string())];
        let readd = json!({"type": "record", "name": "E", "fields": [
            {"name": "a", "type": "string"}, {"name": "c", "type": "int", "default": 0}]});
        assert!(
            incompatibilities(Compatibility::Backward, &history, &readd.to_string()).len() == 1
        );
        assert!(incompatibilities(
            Compatibility::ForwardTransitive,
            &history,
            &readd.to_string()
        )
        .is_empty());
        assert_eq!(
            incompatibilities(Compatibility::FullTransitive, &history, &readd.to_string()).len(),
            1
        );
    }

    #[test]
    fn every_sample_resource_type_yields_a_schema_avro_accepts() {
        for resource_type in [
            "Observation",
            "Patient",
            "DiagnosticReport",
            "ServiceRequest",
            "Specimen",
            "ChargeItem",
            "Claim",
            "Questionnaire",
        ] {
            let schema = event_schema(resource_type);
            Schema::parse(&schema).unwrap_or_else(|e| panic!("{resource_type}: {e}"));
        }
    }

    #[test]
    fn choices_cardinality_decimals_and_backbones_follow_the_rule() {
        let schema = event_schema("Observation");
        let resource = &schema["fields"][7]["type"][1];
        assert_eq!(resource["name"], "Observation");
        let field = |name: &str| {
            resource["fields"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .cloned()
        };
        assert!(
            field("valueQuantity").is_some()
                && field("valueString").is_some()
                && field("value").is_none()
        );
        assert_eq!(field("status").unwrap()["type"], json!(["null", "string"]));
        assert_eq!(field("identifier").unwrap()["type"]["type"], "array");
        assert!(field("modifierExtension").is_none() && field("contained").is_none());
        // Extensions: of the resource, of an extension (nested), not of other datatypes.
        assert_eq!(
            field("extension").unwrap()["type"]["items"]["name"],
            "Extension"
        );
        // Quantity is defined once, where first used (inside Timing), and referenced after.
        fn find_record<'a>(json: &'a Json, name: &str) -> Option<&'a Json> {
            match json {
                Json::Object(o) if o.get("type") == Some(&json!("record")) && o["name"] == name => {
                    Some(json)
                }
                Json::Object(o) => o.values().find_map(|v| find_record(v, name)),
                Json::Array(a) => a.iter().find_map(|v| find_record(v, name)),
                _ => None,
            }
        }
        assert_eq!(
            field("valueQuantity").unwrap()["type"][1],
            "fhir.r4.Quantity"
        );
        let quantity = find_record(&schema, "Quantity").unwrap();
        let value = quantity["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "value")
            .unwrap();
        assert_eq!(value[FHIR_TYPE_ATTRIBUTE], "decimal");
        assert!(quantity["fields"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["name"] != "extension" && f["name"] != "id"));
        let extension = find_record(&schema, "Extension").unwrap();
        let names: Vec<&str> = extension["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[..2], ["extension", "url"]);
        assert!(names.contains(&"valueCoding") && names.contains(&"valueBoolean"));
        assert_eq!(extension["fields"][0]["type"]["items"], "fhir.r4.Extension");
        assert_eq!(
            field("referenceRange").unwrap()["type"]["items"]["name"],
            "Observation_ReferenceRange"
        );
    }
}
