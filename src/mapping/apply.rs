//! Executing a resource mapping on one row image: the FHIR resource it yields, if any.

use hmac::{Hmac, Mac};
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};

use super::{
    convert::{is_fhir_id, text_of, to_fhir},
    load::{child_matches, display_path},
    model::{ElementMapping, Protect, ResourceMapping, Test, Unmapped, ValueSource},
    template::{RenderError, Template},
};
use crate::{
    change::{Row, Value},
    config::Secret,
};

/// Why a row could not be mapped. Never holds row values: it names columns, elements and
/// the broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    /// `file:line:column` of the mapping element (or resource) that failed.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// What mapping needs beyond the row: the key for identifier tokens.
#[derive(Debug, Clone, Default)]
pub struct MapContext {
    pub token_key: Option<Secret>,
}

/// A resource id from its template: the rendered text when it is a valid FHIR id
/// (`[A-Za-z0-9-.]{1,64}`), otherwise `h-` and the first 40 hex digits of its SHA-256 —
/// stable, and free of whatever made the text unsafe.
pub fn resource_id(template: &Template, row: &Row) -> Result<String, RenderError> {
    let text = template.render(row)?;
    Ok(if is_fhir_id(&text) {
        text
    } else {
        format!("h-{}", hex::encode(&Sha256::digest(text.as_bytes())[..20]))
    })
}

impl ResourceMapping {
    /// Whether the row satisfies every `when` condition. A column missing from the row
    /// fails the condition check with an error.
    pub fn applies_to(&self, row: &Row) -> Result<bool, MapError> {
        for condition in &self.when {
            let value = row.get(&condition.column).ok_or_else(|| MapError {
                location: self.location.to_string(),
                message: format!(
                    "condition column `{}` is not in the row (dropped or renamed?)",
                    condition.column
                ),
            })?;
            let text = || text_of(value).trim_end().to_owned();
            let holds = match &condition.test {
                Test::IsNull(expected) => value.is_null() == *expected,
                Test::In(set) => !value.is_null() && set.contains(&text()),
                Test::NotIn(set) => value.is_null() || !set.contains(&text()),
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The resource id for this row.
    pub fn id_for(&self, row: &Row) -> Result<String, MapError> {
        resource_id(&self.id, row).map_err(|e| MapError {
            location: self.location.to_string(),
            message: match e {
                RenderError::Null(c) => format!("id column `{c}` is NULL"),
                RenderError::Missing(c) => format!("id column `{c}` is not in the row"),
            },
        })
    }

    /// The resource (without `meta`) this row yields, or `None` when a condition excludes
    /// the row.
    pub fn apply(&self, row: &Row, context: &MapContext) -> Result<Option<Json>, MapError> {
        if !self.applies_to(row)? {
            return Ok(None);
        }
        let id = self.id_for(row)?;
        let mut body = Map::new();
        let mut masked = false;
        let mut unanchored = Vec::new();
        for element in &self.elements {
            match element_value(element, row, context)? {
                Some(value) => {
                    masked |= element.protect == Some(Protect::Mask);
                    insert(&mut body, &element.path, value);
                }
                None => {
                    if let Some(depth) = element.anchor {
                        unanchored.push(&element.path[..depth]);
                    }
                }
            }
        }
        for parent in unanchored {
            insert(&mut body, parent, Json::Null);
        }
        for node in &self.required {
            let Some(Json::Object(fields)) = lookup(&body, &node.path) else {
                continue;
            };
            for child in &node.children {
                if !fields.keys().any(|name| child_matches(child, name)) {
                    let at = if node.path.is_empty() {
                        self.resource_type.clone()
                    } else {
                        format!("{}.{}", self.resource_type, display_path(&node.path))
                    };
                    return Err(MapError {
                        location: self.location.to_string(),
                        message: format!("{at} lacks `{child}`, which FHIR requires ({}.{child}): its source is NULL in this row", node.definition),
                    });
                }
            }
        }
        for group in &self.choices {
            let present = if group.path.is_empty() {
                group
                    .names
                    .iter()
                    .filter(|n| body.contains_key(n.as_str()))
                    .count()
            } else {
                match lookup(&body, &group.path) {
                    Some(Json::Object(fields)) => group
                        .names
                        .iter()
                        .filter(|n| fields.contains_key(n.as_str()))
                        .count(),
                    _ => 0,
                }
            };
            if present > 1 {
                return Err(MapError {
                    location: self.location.to_string(),
                    message: format!(
                        "{} is a choice: this row fills {present} of {}, FHIR allows one",
                        group.choice,
                        group.names.join(", ")
                    ),
                });
            }
        }
        compact(&mut body);
        let mut resource = Map::new();
        resource.insert(
            "resourceType".into(),
            Json::String(self.resource_type.clone()),
        );
        resource.insert("id".into(), Json::String(id));
        if masked {
            resource.insert(
                "meta".into(),
                serde_json::json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "MASKED"}]}),
            );
        }
        resource.extend(body);
        Ok(Some(Json::Object(resource)))
    }
}

fn element_value(
    element: &ElementMapping,
    row: &Row,
    context: &MapContext,
) -> Result<Option<Json>, MapError> {
    let fail = |message: String| MapError {
        location: element.location.to_string(),
        message,
    };
    let raw: Option<Value> = match &element.source {
        ValueSource::Column(column) => match row.get(column) {
            None => {
                return Err(fail(format!(
                    "column `{column}` for {} is not in the row (dropped or renamed?)",
                    element.definition
                )))
            }
            Some(Value::Null) => None,
            Some(value) => Some(value.clone()),
        },
        ValueSource::Template(template) => match template.render(row) {
            Ok(text) => Some(Value::Text(text)),
            Err(RenderError::Null(_)) => None,
            Err(RenderError::Missing(column)) => {
                return Err(fail(format!(
                    "column `{column}` for {} is not in the row (dropped or renamed?)",
                    element.definition
                )))
            }
        },
        ValueSource::Reference { resource_type, id } => match resource_id(id, row) {
            Ok(id) => Some(Value::Text(format!("{resource_type}/{id}"))),
            Err(RenderError::Null(_)) => None,
            Err(RenderError::Missing(column)) => {
                return Err(fail(format!(
                    "column `{column}` for {} is not in the row (dropped or renamed?)",
                    element.definition
                )))
            }
        },
    };
    let raw = match (raw, &element.default) {
        (Some(value), _) => value,
        (None, Some(default)) => Value::Text(default.clone()),
        (None, None) if element.required => {
            return Err(fail(format!(
                "{} is required but its source is NULL",
                element.definition
            )))
        }
        (None, None) => return Ok(None),
    };
    let value = match &element.translate {
        None => raw,
        Some(translation) => {
            let code = text_of(&raw).trim().to_owned();
            match (translation.codes.get(&code), &translation.unmapped) {
                (Some(target), _) => Value::Text(target.clone()),
                (None, Unmapped::Pass) => Value::Text(code),
                (None, Unmapped::Default(target)) => Value::Text(target.clone()),
                (None, Unmapped::Fail) => {
                    return Err(fail(format!(
                        "the source code for {} has no entry in translation `{}` (unmapped: fail)",
                        element.definition, translation.name
                    )))
                }
            }
        }
    };
    let value = match element.protect {
        None => value,
        Some(Protect::Mask) => Value::Text("****".into()),
        Some(Protect::Token) => {
            let key = context.token_key.as_ref().ok_or_else(|| {
                fail(format!(
                    "{} is tokenized but the connector has no token key",
                    element.definition
                ))
            })?;
            let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
                .expect("HMAC takes keys of any length");
            mac.update(text_of(&value).trim().as_bytes());
            Value::Text(hex::encode(&mac.finalize().into_bytes()[..16]))
        }
    };
    let json = to_fhir(&value, &element.fhir_type, &element.conversion)
        .map_err(|e| fail(format!("{}: {e}", element.definition)))?;
    if let (Some(codes), Json::String(code)) = (element.required_codes, &json) {
        if !codes.contains(code) {
            return Err(fail(format!(
                "{} must be a code of its required value set; the mapped code is not",
                element.definition
            )));
        }
    }
    Ok(Some(json))
}

/// Put `value` at `path`, creating objects and (padded) arrays on the way.
fn insert(body: &mut Map<String, Json>, path: &[crate::fhir::Segment], value: Json) {
    let mut slot = body.entry(path[0].name.clone()).or_insert(Json::Null);
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            let object = as_object(slot);
            slot = object.entry(segment.name.clone()).or_insert(Json::Null);
        }
        if let Some(index) = segment.index {
            if !slot.is_array() {
                *slot = Json::Array(Vec::new());
            }
            let Json::Array(items) = slot else {
                unreachable!()
            };
            if items.len() <= index {
                items.resize(index + 1, Json::Null);
            }
            slot = &mut items[index];
        }
    }
    *slot = value;
}

fn as_object(slot: &mut Json) -> &mut Map<String, Json> {
    if !slot.is_object() {
        *slot = Json::Object(Map::new());
    }
    match slot {
        Json::Object(map) => map,
        _ => unreachable!(),
    }
}

fn lookup<'a>(body: &'a Map<String, Json>, path: &[crate::fhir::Segment]) -> Option<&'a Json> {
    let mut current: Option<&Json> = None;
    for (i, segment) in path.iter().enumerate() {
        let field = if i == 0 {
            body.get(&segment.name)
        } else {
            current?.get(&segment.name)
        }?;
        current = Some(match segment.index {
            Some(index) => field.get(index)?,
            None => field,
        });
    }
    match current {
        None => None,
        Some(Json::Null) => None,
        found => found,
    }
}

/// Drop what NULL sources and unanchored parents left empty: holes in arrays (the rest close
/// up in index order), null fields, and objects and arrays with nothing left in them.
fn compact(body: &mut Map<String, Json>) {
    fn empty(value: &Json) -> bool {
        match value {
            Json::Null => true,
            Json::Array(items) => items.is_empty(),
            Json::Object(fields) => fields.is_empty(),
            _ => false,
        }
    }
    fn walk(value: &mut Json) {
        match value {
            Json::Array(items) => {
                items.iter_mut().for_each(walk);
                items.retain(|item| !empty(item));
            }
            Json::Object(fields) => {
                fields.values_mut().for_each(walk);
                fields.retain(|_, v| !empty(v));
            }
            _ => {}
        }
    }
    body.values_mut().for_each(walk);
    body.retain(|_, v| !empty(v));
}
