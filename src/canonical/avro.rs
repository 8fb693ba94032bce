//! Canonical events as Avro values and back, walking the schemas of [`super::schema`].
//!
//! Encoding takes the event's JSON form; decoding works from any writer schema that follows
//! the rule (the registry may hold several versions), and gives back the same JSON: decimals
//! with their digits (from fields marked `fhirType: decimal`), absent elements absent.

use apache_avro::{
    schema::{Name, Schema},
    types::Value,
};
use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value as Json};

use super::{schema::FHIR_TYPE_ATTRIBUTE, CanonicalEvent};

type Names<'s> = std::collections::HashMap<Name, &'s Schema>;

/// Why a value does not fit its schema. Names the field path, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct AvroShapeError {
    pub path: String,
    pub problem: String,
}

/// The event as the top-level record's fields, for `schema`.
pub fn event_to_avro(event: &CanonicalEvent, schema: &Schema) -> Result<Value, AvroShapeError> {
    let resolved =
        apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| AvroShapeError {
            path: String::new(),
            problem: e.to_string(),
        })?;
    let json = serde_json::to_value(event).map_err(|e| AvroShapeError {
        path: String::new(),
        problem: e.to_string(),
    })?;
    to_avro(&json, schema, resolved.get_names(), &mut String::new())
}

/// The event's JSON form from an Avro value and the schema it was written with.
pub fn event_from_avro(value: &Value, schema: &Schema) -> Result<CanonicalEvent, AvroShapeError> {
    let resolved =
        apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| AvroShapeError {
            path: String::new(),
            problem: e.to_string(),
        })?;
    let mut json = to_json(
        value,
        schema,
        resolved.get_names(),
        None,
        &mut String::new(),
    )?;
    // Resources are records without `resourceType`; it is the envelope's resource_type.
    let resource_type = json["resource_type"].clone();
    if let Some(resource) = json.get_mut("resource").and_then(Json::as_object_mut) {
        let mut with_type = Map::new();
        with_type.insert("resourceType".into(), resource_type);
        with_type.extend(std::mem::take(resource));
        *resource = with_type;
    }
    serde_json::from_value(json).map_err(|e| AvroShapeError {
        path: String::new(),
        problem: e.to_string(),
    })
}

fn resolve<'s>(
    schema: &'s Schema,
    names: &Names<'s>,
    path: &str,
) -> Result<&'s Schema, AvroShapeError> {
    match schema {
        Schema::Ref { name } => names.get(name).copied().ok_or_else(|| AvroShapeError {
            path: path.to_owned(),
            problem: format!("unknown named type {name}"),
        }),
        other => Ok(other),
    }
}

fn to_avro<'s>(
    json: &Json,
    schema: &'s Schema,
    names: &Names<'s>,
    path: &mut String,
) -> Result<Value, AvroShapeError> {
    let fail = |path: &str, problem: &str| AvroShapeError {
        path: path.to_owned(),
        problem: problem.to_owned(),
    };
    Ok(match resolve(schema, names, path)? {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(
            json.as_bool()
                .ok_or_else(|| fail(path, "expected a boolean"))?,
        ),
        Schema::Int => Value::Int(
            json.as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| fail(path, "expected a 32-bit integer"))?,
        ),
        Schema::Long => Value::Long(
            json.as_i64()
                .ok_or_else(|| fail(path, "expected an integer"))?,
        ),
        Schema::String => Value::String(match json {
            Json::String(s) => s.clone(),
            // A FHIR decimal: its exact digits.
            Json::Number(n) => n.to_string(),
            _ => return Err(fail(path, "expected a string")),
        }),
        Schema::TimestampMicros => {
            let text = json
                .as_str()
                .ok_or_else(|| fail(path, "expected an RFC 3339 time"))?;
            let time = DateTime::parse_from_rfc3339(text)
                .map_err(|_| fail(path, "expected an RFC 3339 time"))?;
            Value::TimestampMicros(time.timestamp_micros())
        }
        Schema::Enum(e) => {
            let symbol = json
                .as_str()
                .ok_or_else(|| fail(path, "expected an enum symbol"))?;
            let index = e
                .symbols
                .iter()
                .position(|s| s == symbol)
                .ok_or_else(|| fail(path, "not a symbol of the enum"))?;
            Value::Enum(index as u32, symbol.to_owned())
        }
        Schema::Array(array) => {
            let items = match json {
                Json::Null => &Vec::new(),
                Json::Array(items) => items,
                _ => return Err(fail(path, "expected an array")),
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(to_avro(item, &array.items, names, path)?);
                path.truncate(len);
            }
            Value::Array(out)
        }
        Schema::Union(union) => {
            let variants = union.variants();
            let null = variants.iter().position(|v| matches!(v, Schema::Null));
            match (json, null) {
                (Json::Null, Some(i)) => Value::Union(i as u32, Box::new(Value::Null)),
                _ => {
                    let (i, variant) = variants
                        .iter()
                        .enumerate()
                        .find(|(_, v)| !matches!(v, Schema::Null))
                        .ok_or_else(|| fail(path, "a union without a non-null branch"))?;
                    Value::Union(i as u32, Box::new(to_avro(json, variant, names, path)?))
                }
            }
        }
        Schema::Record(record) => {
            let object = json
                .as_object()
                .ok_or_else(|| fail(path, "expected an object"))?;
            let mut fields = Vec::with_capacity(record.fields.len());
            for field in &record.fields {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&field.name);
                let value = to_avro(
                    object.get(&field.name).unwrap_or(&Json::Null),
                    &field.schema,
                    names,
                    path,
                )?;
                path.truncate(len);
                fields.push((field.name.clone(), value));
            }
            Value::Record(fields)
        }
        _ => return Err(fail(path, "a schema type canonical events do not use")),
    })
}

fn to_json<'s>(
    value: &Value,
    schema: &'s Schema,
    names: &Names<'s>,
    fhir_type: Option<&str>,
    path: &mut String,
) -> Result<Json, AvroShapeError> {
    let fail = |path: &str, problem: &str| AvroShapeError {
        path: path.to_owned(),
        problem: problem.to_owned(),
    };
    let schema = resolve(schema, names, path)?;
    Ok(match (value, schema) {
        (Value::Null, _) => Json::Null,
        (Value::Boolean(b), _) => Json::Bool(*b),
        (Value::Int(i), _) => Json::from(*i),
        (Value::Long(l), _) => Json::from(*l),
        (Value::String(s), _) if fhir_type == Some("decimal") => {
            crate::change::ExactDecimal::parse(s.trim())
                .ok()
                .and_then(|d| crate::fhir::Element::decimal(d.as_str().to_owned()))
                .ok_or_else(|| fail(path, "a decimal field holds no decimal"))?
                .to_json()
        }
        (Value::String(s), _) => Json::String(s.clone()),
        (Value::TimestampMicros(micros), _) => {
            let time = DateTime::from_timestamp_micros(*micros)
                .ok_or_else(|| fail(path, "time out of range"))?;
            Json::String(time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        }
        (Value::Enum(_, symbol), _) => Json::String(symbol.clone()),
        (Value::Union(i, inner), Schema::Union(union)) => {
            let variant = union
                .variants()
                .get(*i as usize)
                .ok_or_else(|| fail(path, "union branch out of range"))?;
            to_json(inner, variant, names, fhir_type, path)?
        }
        (Value::Array(items), Schema::Array(array)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(to_json(item, &array.items, names, fhir_type, path)?);
            }
            Json::Array(out)
        }
        (Value::Record(fields), Schema::Record(record)) => {
            let mut object = Map::new();
            for ((name, value), field) in fields.iter().zip(&record.fields) {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(name);
                let fhir_type = field
                    .custom_attributes
                    .get(FHIR_TYPE_ATTRIBUTE)
                    .and_then(|v| v.as_str());
                let json = to_json(value, &field.schema, names, fhir_type, path)?;
                path.truncate(len);
                // Absent and empty are the same in FHIR JSON; the envelope keeps its nulls.
                let empty = matches!(&json, Json::Array(a) if a.is_empty());
                let in_resource = path == "resource"
                    || path.starts_with("resource.")
                    || path.starts_with("resource[");
                if !(in_resource && (json.is_null() || empty)) {
                    object.insert(name.clone(), json);
                }
            }
            Json::Object(object)
        }
        _ => return Err(fail(path, "the value does not match its schema")),
    })
}
