//! Configuration from the environment, for twelve-factor deployments: any key of a config
//! file is overridden by a variable `FHIR_CDC__<SECTION>__<KEY>`, one `__` per level of
//! the TOML key. TOML's dotted keys are levels too, so librdkafka's `bootstrap.servers`
//! under `[kafka]` is `FHIR_CDC__KAFKA__BOOTSTRAP__SERVERS`, `[source] snapshot.mode` is
//! `FHIR_CDC__SOURCE__SNAPSHOT__MODE`, `[health] ready_lag_seconds` is
//! `FHIR_CDC__HEALTH__READY_LAG_SECONDS`. Names match keys in any case.
//!
//! A value replacing one of the file's keeps its type (`"5"` for an integer key is the
//! number 5); a key the file does not have takes the value as TOML when it reads as a
//! number, a boolean or a quoted string, and as text otherwise. `${env:…}` and `${file:…}`
//! references work as in the file.

use std::collections::BTreeMap;

use serde::Serialize;

/// The prefix of override variables (the double underscore keeps them apart from the
/// variables config files reference, such as `FHIR_CDC_PG_URL`).
pub const PREFIX: &str = "FHIR_CDC__";

/// One key set from the environment: where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The key, dotted (`kafka.bootstrap.servers`).
    pub key: String,
    /// The variable that set it.
    pub variable: String,
}

/// The override variables of this process's environment, by name.
pub fn variables() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
        .filter(|(name, _)| name.starts_with(PREFIX))
        .map(|(name, value)| (name, value.to_string_lossy().into_owned()))
        .collect()
}

/// `table` with the `variables` (name → value) applied, and what each set; an error names
/// the variable that cannot be applied.
pub fn apply(
    table: &mut toml::Table,
    variables: &BTreeMap<String, String>,
) -> Result<Vec<Override>, String> {
    let mut applied = Vec::new();
    for (variable, value) in variables {
        let path: Vec<&str> = variable[PREFIX.len()..].split("__").collect();
        if path.iter().any(|segment| segment.is_empty()) {
            return Err(format!(
                "{variable} names no key: write {PREFIX}<SECTION>__<KEY>, one `__` per level"
            ));
        }
        let (last, sections) = path.split_last().expect("split yields one piece at least");
        let mut at = &mut *table;
        let mut key = Vec::with_capacity(path.len());
        for segment in sections {
            let name = existing(at, segment);
            key.push(name.clone());
            let entry = at
                .entry(name)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(inner) => inner,
                _ => {
                    return Err(format!(
                        "{variable}: `{}` is a value in the file, not a section",
                        key.join(".")
                    ))
                }
            };
        }
        let name = existing(at, last);
        key.push(name.clone());
        let typed = typed(at.get(&name), value)
            .map_err(|expected| format!("{variable}: `{}` takes {expected}", key.join(".")))?;
        at.insert(name, typed);
        applied.push(Override {
            key: key.join("."),
            variable: variable.clone(),
        });
    }
    Ok(applied)
}

/// The key of `table` that `segment` names, in any case; lower case when it has none.
fn existing(table: &toml::Table, segment: &str) -> String {
    table
        .keys()
        .find(|k| k.eq_ignore_ascii_case(segment))
        .cloned()
        .unwrap_or_else(|| segment.to_ascii_lowercase())
}

/// `value` as the type of the value it replaces, or as TOML when it replaces none; what was
/// expected when it cannot be.
fn typed(replaced: Option<&toml::Value>, value: &str) -> Result<toml::Value, &'static str> {
    let literal = || {
        toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    Ok(match replaced {
        Some(toml::Value::String(_)) => toml::Value::String(value.to_owned()),
        Some(toml::Value::Integer(_)) => {
            toml::Value::Integer(value.trim().parse().map_err(|_| "an integer")?)
        }
        Some(toml::Value::Float(_)) => {
            toml::Value::Float(value.trim().parse().map_err(|_| "a number")?)
        }
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(value.trim().parse().map_err(|_| "true or false")?)
        }
        Some(toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_)) => {
            literal().ok_or("a TOML value of the file's type")?
        }
        None => literal()
            .filter(|v| !matches!(v, toml::Value::Table(_) | toml::Value::Datetime(_)))
            .unwrap_or_else(|| toml::Value::String(value.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(file: &str, vars: &[(&str, &str)]) -> Result<(toml::Table, Vec<Override>), String> {
        let mut table: toml::Table = toml::from_str(file).unwrap();
        let vars = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let overrides = apply(&mut table, &vars)?;
        Ok((table, overrides))
    }

    #[test]
    fn variables_set_nested_and_dotted_keys_keeping_the_files_types() {
        let file = "name = \"lab\"\n[kafka]\nbootstrap.servers = \"a:9092\"\n[health]\nready_lag_seconds = 60\n";
        let (table, overrides) = applied(
            file,
            &[
                ("FHIR_CDC__KAFKA__BOOTSTRAP__SERVERS", "b:9092"),
                ("FHIR_CDC__HEALTH__READY_LAG_SECONDS", "5"),
                ("FHIR_CDC__SOURCE__SNAPSHOT__MODE", "never"),
                ("FHIR_CDC__TOPICS__PARTITIONS", "3"),
                ("FHIR_CDC__SCHEMA_REGISTRY__PASSWORD", "\"123\""),
            ],
        )
        .unwrap();
        assert_eq!(
            table["kafka"]["bootstrap"]["servers"].as_str(),
            Some("b:9092")
        );
        assert_eq!(table["health"]["ready_lag_seconds"].as_integer(), Some(5));
        assert_eq!(table["source"]["snapshot"]["mode"].as_str(), Some("never"));
        assert_eq!(table["topics"]["partitions"].as_integer(), Some(3));
        assert_eq!(table["schema_registry"]["password"].as_str(), Some("123"));
        let keys: Vec<&str> = overrides.iter().map(|o| o.key.as_str()).collect();
        assert!(keys.contains(&"kafka.bootstrap.servers"), "{keys:?}");
        assert!(keys.contains(&"health.ready_lag_seconds"), "{keys:?}");
    }

    #[test]
    fn a_variable_that_cannot_apply_is_named() {
        let file = "[health]\nready_lag_seconds = 60\nname = \"x\"\n";
        let err = applied(file, &[("FHIR_CDC__HEALTH__READY_LAG_SECONDS", "soon")]).unwrap_err();
        assert!(
            err.contains("FHIR_CDC__HEALTH__READY_LAG_SECONDS") && err.contains("integer"),
            "{err}"
        );
        let err = applied(file, &[("FHIR_CDC__HEALTH__NAME__X", "1")]).unwrap_err();
        assert!(err.contains("not a section"), "{err}");
        let err = applied(file, &[("FHIR_CDC____X", "1")]).unwrap_err();
        assert!(err.contains("names no key"), "{err}");
    }
}
