//! A FHIR resource as fhir-cdc builds and carries it: FHIR JSON without hash maps.
//!
//! A mapped resource has a few dozen elements, is built once, compared once (no-op
//! suppression) and written once (Avro). Objects are therefore vectors of named elements
//! in the order the mapping wrote them, and the names are interned ([`Name`], a
//! `&'static str`), so building one costs no hashing, no name copies and no reference
//! counts; and an element is small (32 bytes), so a resource is compact in memory. Leaves
//! are strings, exact numbers (FHIR decimals keep their digits) and booleans; FHIR JSON has
//! no nulls. [`Element::to_json`] and serde give standard FHIR JSON, in order.

use std::{
    collections::HashSet,
    fmt,
    sync::{LazyLock, Mutex},
};

use serde::{
    de::{Deserialize, Deserializer, Error as _},
    ser::{Serialize, SerializeMap, Serializer},
};
use serde_json::{Map, Number, Value as Json};

/// An element name: interned once ([`intern`]) when a mapping, a schema or a definition is
/// loaded, so that the resources that carry it copy a pointer, with no reference count.
pub type Name = &'static str;

/// The one copy of `name`. Names come from the FHIR definitions, mapping files and Avro
/// schemas, and the same is done for mapping literals and source URNs ([`Element::Shared`])
/// — bounded sets, each kept for the life of the process.
pub fn intern(name: &str) -> Name {
    static INTERNED: LazyLock<Mutex<HashSet<Name>>> = LazyLock::new(Mutex::default);
    let mut interned = INTERNED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match interned.get(name) {
        Some(found) => found,
        None => {
            let leaked: Name = Box::leak(name.to_owned().into_boxed_str());
            interned.insert(leaked);
            leaked
        }
    }
}

/// The names fhir-cdc itself writes into resources.
#[derive(Debug)]
pub struct Names {
    pub resource_type: Name,
    pub id: Name,
    pub meta: Name,
    pub version_id: Name,
    pub last_updated: Name,
    pub source: Name,
    pub security: Name,
    pub system: Name,
    pub code: Name,
}

/// Interned ([`intern`]), like the names of definitions, mappings and schemas.
pub fn names() -> &'static Names {
    static NAMES: LazyLock<Names> = LazyLock::new(|| Names {
        resource_type: intern("resourceType"),
        id: intern("id"),
        meta: intern("meta"),
        version_id: intern("versionId"),
        last_updated: intern("lastUpdated"),
        source: intern("source"),
        security: intern("security"),
        system: intern("system"),
        code: intern("code"),
    });
    &NAMES
}

/// One FHIR JSON value.
#[derive(Clone)]
pub enum Element {
    String(String),
    /// A string many resources share, such as a mapping's literal (`http://loinc.org`),
    /// interned once ([`intern`]): copying it copies a pointer, with no allocation and no
    /// reference count.
    Shared(&'static str),
    /// Exact: the digits it was written with.
    Number(Number),
    Boolean(bool),
    /// Named elements, in order, each name once.
    Object(Vec<(Name, Element)>),
    Array(Vec<Element>),
}

impl Element {
    /// A FHIR decimal with exactly these digits, if they are one:
    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?` (no exponent: the values that reach here are exact
    /// decimals and shortest doubles, which refuse one).
    pub fn decimal(text: String) -> Option<Element> {
        let digits = |s: &[u8]| s.iter().take_while(|b| b.is_ascii_digit()).count();
        let bytes = text.as_bytes();
        let mut at = usize::from(bytes.first() == Some(&b'-'));
        let int = digits(&bytes[at..]);
        if int == 0 || (int > 1 && bytes[at] == b'0') {
            return None;
        }
        at += int;
        if bytes.get(at) == Some(&b'.') {
            let fraction = digits(&bytes[at + 1..]);
            if fraction == 0 {
                return None;
            }
            at += 1 + fraction;
        }
        // serde_json keeps the digits (arbitrary_precision); checked above, so not parsed again.
        (at == bytes.len()).then(|| Element::Number(Number::from_string_unchecked(text)))
    }

    /// The element `name` of an object.
    pub fn get(&self, name: &str) -> Option<&Element> {
        match self {
            Element::Object(fields) => fields
                .iter()
                .find(|(n, _)| &**n == name)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    /// The element `name` of an object, for changing it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Element> {
        match self {
            Element::Object(fields) => fields
                .iter_mut()
                .find(|(n, _)| &**n == name)
                .map(|(_, value)| value),
            _ => None,
        }
    }

    /// Sets the element `name` of an object: in its place when present, else last.
    pub fn insert(&mut self, name: Name, value: Element) {
        if let Element::Object(fields) = self {
            match fields.iter_mut().find(|(n, _)| *n == name) {
                Some((_, slot)) => *slot = value,
                None => fields.push((name, value)),
            }
        }
    }

    /// The text of a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Element::String(text) => Some(text),
            Element::Shared(text) => Some(text),
            _ => None,
        }
    }

    /// A string.
    pub fn text(text: impl Into<String>) -> Self {
        Element::String(text.into())
    }

    /// Standard FHIR JSON, elements in order.
    pub fn to_json(&self) -> Json {
        match self {
            Element::String(_) | Element::Shared(_) => {
                Json::String(self.as_str().unwrap_or_default().to_owned())
            }
            Element::Number(number) => Json::Number(number.clone()),
            Element::Boolean(b) => Json::Bool(*b),
            Element::Array(items) => Json::Array(items.iter().map(Element::to_json).collect()),
            Element::Object(fields) => Json::Object(
                fields
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_json()))
                    .collect::<Map<_, _>>(),
            ),
        }
    }

    /// From FHIR JSON; `None` for a JSON `null`, and nulls inside are left out (FHIR JSON
    /// has none: an element is present with a value or absent). Its names are interned for
    /// good: for trusted FHIR JSON (fixtures, tests), never for arbitrary input.
    pub fn from_json(json: Json) -> Option<Self> {
        Some(match json {
            Json::Null => return None,
            Json::String(text) => Element::String(text),
            Json::Number(number) => Element::Number(number),
            Json::Bool(b) => Element::Boolean(b),
            Json::Array(items) => {
                Element::Array(items.into_iter().filter_map(Element::from_json).collect())
            }
            Json::Object(fields) => Element::Object(
                fields
                    .into_iter()
                    .filter_map(|(name, value)| Some((intern(&name), Element::from_json(value)?)))
                    .collect(),
            ),
        })
    }
}

/// Equal as FHIR JSON: the order of an object's elements does not matter (a resource
/// decoded from Avro has them in schema order, a mapped one in mapping order).
impl PartialEq for Element {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Element::String(_) | Element::Shared(_), Element::String(_) | Element::Shared(_)) => {
                self.as_str() == other.as_str()
            }
            (Element::Number(a), Element::Number(b)) => a == b,
            (Element::Boolean(a), Element::Boolean(b)) => a == b,
            (Element::Array(a), Element::Array(b)) => a == b,
            (Element::Object(a), Element::Object(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((na, va), (nb, vb))| na == nb && va == vb)
                    || a.len() == b.len()
                        && a.iter()
                            .all(|(name, value)| b.iter().any(|(n, v)| n == name && v == value))
            }
            _ => false,
        }
    }
}

impl fmt::Debug for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_json(), f)
    }
}

impl From<Element> for Json {
    fn from(element: Element) -> Self {
        element.to_json()
    }
}

impl Serialize for Element {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Element::String(text) => serializer.serialize_str(text),
            Element::Shared(text) => serializer.serialize_str(text),
            Element::Number(number) => number.serialize(serializer),
            Element::Boolean(b) => serializer.serialize_bool(*b),
            Element::Array(items) => serializer.collect_seq(items),
            Element::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (name, value) in fields {
                    map.serialize_entry(&**name, value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Element::from_json(Json::deserialize(deserializer)?)
            .ok_or_else(|| D::Error::custom("FHIR JSON has no null values"))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    proptest! {
        #[test]
        fn a_decimal_is_what_json_reads_as_a_number(text in "-?[0-9]{0,3}(\\.[0-9]{0,2})?|[-+0-9.]{0,8}") {
            let ours = Element::decimal(text.clone()).map(|n| n.to_json().to_string());
            let json = text.parse::<Number>().ok().map(|n| n.to_string());
            prop_assert_eq!(ours, json);
        }
    }

    #[test]
    fn json_round_trip_keeps_order_and_exact_numbers() {
        let json: Json = serde_json::from_str(
            r#"{"resourceType":"Observation","id":"r-1","valueQuantity":{"value":98.0000},"status":"final","note":[{"text":"a"}],"flag":true}"#,
        )
        .unwrap();
        let element = Element::from_json(json.clone()).unwrap();
        assert_eq!(element.to_json(), json);
        assert_eq!(
            serde_json::to_string(&element).unwrap(),
            r#"{"resourceType":"Observation","id":"r-1","valueQuantity":{"value":98.0000},"status":"final","note":[{"text":"a"}],"flag":true}"#
        );
        let back: Element =
            serde_json::from_str(&serde_json::to_string(&element).unwrap()).unwrap();
        assert_eq!(back, element);
    }

    fn element(json: Json) -> Element {
        Element::from_json(json).unwrap()
    }

    #[test]
    fn nulls_are_absent() {
        assert_eq!(Element::from_json(Json::Null), None);
        assert_eq!(
            element(json!({"a": null, "b": [null, 1]})),
            element(json!({"b": [1]}))
        );
        assert!(serde_json::from_str::<Element>("null").is_err());
    }

    #[test]
    fn objects_compare_without_order_arrays_with_order() {
        let a = element(json!({"a": 1, "b": [1, 2]}));
        assert_eq!(a, element(json!({"b": [1, 2], "a": 1})));
        assert_ne!(a, element(json!({"a": 1, "b": [2, 1]})));
        assert_ne!(a, element(json!({"a": 1, "b": [1, 2], "c": 3})));
        assert_ne!(a, element(json!({"a": 1, "c": [1, 2]})));
    }

    #[test]
    fn insert_replaces_in_place_or_appends() {
        let mut e = element(json!({"id": "x", "meta": {}, "status": "final"}));
        e.insert("meta", Element::text("m"));
        e.insert("note", Element::text("n"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"id":"x","meta":"m","status":"final","note":"n"}"#
        );
        assert_eq!(e.get("status").and_then(Element::as_str), Some("final"));
        assert!(e.get("absent").is_none());
    }
}
