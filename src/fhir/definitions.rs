//! The FHIR R4 element tree, from the compact table `r4.defs` (generated from the official
//! `hl7.fhir.r4.core` package by `tools/fhir-r4-definitions.py`; see that script for the
//! format).
//!
//! Element paths in mappings are FHIR JSON paths: `code.coding[0].system`,
//! `valueQuantity.value` (a choice element `value[x]` is written with its type, as in JSON),
//! `component[1].code.text`. Resolving one walks the tree: resource elements, then the
//! elements of each datatype, into backbone elements and content references, and ends on a
//! primitive.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::LazyLock,
};

const TABLE: &str = include_str!("r4.defs");

/// The kinds of type the table knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    Resource,
    Complex,
    Primitive,
}

#[derive(Debug)]
struct Element {
    min: u32,
    /// `None` for `*`.
    max: Option<u32>,
    types: Vec<String>,
    /// Path of the element whose definition this one reuses (`contentReference`).
    content_reference: Option<String>,
    required_value_set: Option<String>,
}

/// The FHIR R4 definitions: types, their elements, and the codes of required bindings.
#[derive(Debug)]
pub struct Definitions {
    types: HashMap<String, TypeKind>,
    elements: HashMap<String, Element>,
    /// Child element names of each type or backbone path, in definition order.
    children: HashMap<String, Vec<String>>,
    value_sets: HashMap<String, HashSet<String>>,
}

/// The definitions, parsed once.
pub fn definitions() -> &'static Definitions {
    static DEFINITIONS: LazyLock<Definitions> =
        LazyLock::new(|| Definitions::parse(TABLE).expect("src/fhir/r4.defs is malformed"));
    &DEFINITIONS
}

/// One step of an element path: a JSON name and, for repeating elements, an index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub name: super::Name,
    /// An index, or [`Segment::EACH`].
    pub index: Option<usize>,
}

impl Segment {
    /// The index written `[*]`: one item per part of a split column.
    pub const EACH: usize = usize::MAX;

    /// Whether it is written `name[*]`.
    pub fn is_each(&self) -> bool {
        self.index == Some(Self::EACH)
    }
}

/// One element of a type or backbone element, as schema generation needs it.
#[derive(Debug, Clone)]
pub struct ElementInfo<'a> {
    /// The element's name; a choice ends in `[x]`.
    pub name: &'a str,
    /// The definition path (`Observation.referenceRange`).
    pub path: String,
    /// More than one occurrence allowed.
    pub repeats: bool,
    /// Type codes (several for a choice).
    pub types: &'a [String],
    /// The path whose definition this element reuses, if any.
    pub content_reference: Option<&'a str>,
}

/// The primitive type an element path ends on, with what constrains its values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementType {
    /// The FHIR primitive type code: `string`, `code`, `decimal`, `dateTime`, …
    pub code: String,
    /// The codes allowed by a required binding, when the element has one.
    pub required_codes: Option<&'static HashSet<String>>,
    /// The definition path (`Observation.status`, `Quantity.value`), for messages.
    pub definition: String,
}

/// A resolved path: the primitive at its end, and every complex node on the way with the
/// definition path whose children it has (to check required children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPath {
    pub leaf: ElementType,
    /// For each segment but the last: the definition path of the node's children.
    pub nodes: Vec<String>,
}

/// Why a path does not fit the definitions; `segment` is the index of the failing step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub segment: usize,
    pub message: String,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Segment {
    /// Parse `a.b[0].c` into segments.
    pub fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
        path.split('.')
            .map(|part| {
                let (name, index) = match part.split_once('[') {
                    None => (part, None),
                    Some((name, rest)) => {
                        let digits = rest
                            .strip_suffix(']')
                            .ok_or_else(|| format!("`{part}`: an index is written `name[0]`"))?;
                        let index = match digits {
                            "*" => Segment::EACH,
                            _ => digits.parse::<usize>().map_err(|_| {
                                format!("`{part}`: the index must be a number, as in `{name}[0]`, or `*` (`{name}[*]`: one item per part of a split column)")
                            })?,
                        };
                        (name, Some(index))
                    }
                };
                let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    && name.chars().all(|c| c.is_ascii_alphanumeric());
                if !valid {
                    return Err(format!("`{part}` is not an element name"));
                }
                Ok(Segment {
                    name: super::intern(name),
                    index,
                })
            })
            .collect()
    }
}

impl Definitions {
    fn parse(table: &str) -> Result<Self, String> {
        let mut defs = Definitions {
            types: HashMap::new(),
            elements: HashMap::new(),
            children: HashMap::new(),
            value_sets: HashMap::new(),
        };
        for (n, line) in table.lines().enumerate() {
            let fields: Vec<&str> = line.split('\t').collect();
            let bad = || format!("r4.defs line {}: {line}", n + 1);
            match fields.as_slice() {
                [t, _] | [t, ..] if t.starts_with('#') => {}
                ["T", name, kind] => {
                    let kind = match *kind {
                        "resource" => TypeKind::Resource,
                        "complex" => TypeKind::Complex,
                        "primitive" => TypeKind::Primitive,
                        _ => return Err(bad()),
                    };
                    defs.types.insert((*name).to_owned(), kind);
                }
                ["E", path, min, max, types, binding] => {
                    let (content_reference, types) = match types.strip_prefix('@') {
                        Some(reference) => (Some((*reference).to_owned()), Vec::new()),
                        None => (
                            None,
                            types
                                .split(',')
                                .filter(|t| !t.is_empty())
                                .map(str::to_owned)
                                .collect(),
                        ),
                    };
                    let element = Element {
                        min: min.parse().map_err(|_| bad())?,
                        max: if *max == "*" {
                            None
                        } else {
                            Some(max.parse().map_err(|_| bad())?)
                        },
                        types,
                        content_reference,
                        required_value_set: (*binding != "-").then(|| (*binding).to_owned()),
                    };
                    let (parent, name) = path.rsplit_once('.').ok_or_else(bad)?;
                    defs.children
                        .entry(parent.to_owned())
                        .or_default()
                        .push(name.to_owned());
                    defs.elements.insert((*path).to_owned(), element);
                }
                ["V", url, codes @ ..] => {
                    defs.value_sets.insert(
                        (*url).to_owned(),
                        codes.iter().map(|c| (*c).to_owned()).collect(),
                    );
                }
                [""] => {}
                _ => return Err(bad()),
            }
        }
        Ok(defs)
    }

    /// The kind of a type, if the table knows it.
    pub fn kind(&self, type_name: &str) -> Option<TypeKind> {
        self.types.get(type_name).copied()
    }

    /// The elements directly under `definition` (a type name or a backbone element path),
    /// in definition order.
    pub fn elements_of(&self, definition: &str) -> Vec<ElementInfo<'_>> {
        self.children
            .get(definition)
            .into_iter()
            .flatten()
            .map(|name| {
                let path = format!("{definition}.{name}");
                let element = &self.elements[&path];
                ElementInfo {
                    name: name.as_str(),
                    repeats: element.max != Some(1),
                    types: &element.types,
                    content_reference: element.content_reference.as_deref(),
                    path,
                }
            })
            .collect()
    }

    /// Whether `name` is a FHIR R4 resource type.
    pub fn is_resource(&self, name: &str) -> bool {
        self.types.get(name) == Some(&TypeKind::Resource)
    }

    /// The codes of a required value set, if the table has its expansion.
    pub fn value_set(&self, url: &str) -> Option<&HashSet<String>> {
        self.value_sets.get(url)
    }

    /// Names of the required (min ≥ 1) children of a node whose children live under
    /// `definition` (a type name or a backbone element path).
    pub fn required_children<'a>(&'a self, definition: &'a str) -> impl Iterator<Item = &'a str> {
        self.children
            .get(definition)
            .into_iter()
            .flatten()
            .filter(move |name| self.elements[&format!("{definition}.{name}")].min >= 1)
            .map(String::as_str)
    }

    /// Resolve an element path of `resource_type` down to the primitive it ends on.
    pub fn resolve(
        &'static self,
        resource_type: &str,
        path: &[Segment],
    ) -> Result<ResolvedPath, PathError> {
        let mut container = resource_type.to_owned();
        let mut nodes = Vec::new();
        for (i, segment) in path.iter().enumerate() {
            let fail = |message: String| PathError {
                segment: i,
                message,
            };
            let (definition, element, type_code) = self
                .find_child(&container, segment.name)
                .ok_or_else(|| fail(self.unknown_child_message(&container, segment.name)))?;
            match (element.max, segment.index) {
                (Some(max), Some(Segment::EACH)) => {
                    return Err(fail(format!(
                        "{definition} repeats at most {max} time(s): `{}[*]` makes one item per part of a split column, so it needs an element that repeats without bound",
                        segment.name
                    )))
                }
                (Some(1), Some(index)) => {
                    return Err(fail(format!(
                        "{definition} is not repeating (0..1): write `{}` without `[{index}]`",
                        segment.name
                    )))
                }
                (Some(max), Some(index)) if index as u32 >= max => {
                    return Err(fail(format!(
                        "{definition} repeats at most {max} times; index {index} is out of range"
                    )))
                }
                (None | Some(2..), None) => {
                    return Err(fail(format!(
                        "{definition} repeats ({}..{}): write `{}[0]` (or another index)",
                        element.min,
                        element.max.map_or("*".to_owned(), |m| m.to_string()),
                        segment.name
                    )))
                }
                _ => {}
            }
            let is_last = i + 1 == path.len();
            let inline = matches!(type_code.as_str(), "BackboneElement" | "Element");
            let (children_at, kind) = if let Some(reference) = &element.content_reference {
                (reference.clone(), TypeKind::Complex)
            } else if inline {
                (definition.clone(), TypeKind::Complex)
            } else {
                let kind = *self.types.get(&type_code).ok_or_else(|| {
                    fail(format!(
                        "{definition} has type {type_code}, which fhir-cdc cannot fill"
                    ))
                })?;
                (type_code.clone(), kind)
            };
            match (kind, is_last) {
                (TypeKind::Primitive, true) => {
                    let required_codes = element
                        .required_value_set
                        .as_deref()
                        .and_then(|url| self.value_sets.get(url));
                    return Ok(ResolvedPath {
                        leaf: ElementType {
                            code: type_code,
                            required_codes,
                            definition,
                        },
                        nodes,
                    });
                }
                (TypeKind::Primitive, false) => {
                    return Err(fail(format!(
                        "{definition} is a {type_code}, a primitive: it has no element `{}`",
                        path[i + 1].name
                    )))
                }
                (TypeKind::Resource, _) => {
                    return Err(fail(format!(
                        "{definition} holds a whole resource, which mappings cannot fill"
                    )))
                }
                (TypeKind::Complex, true) => {
                    let example = self
                        .children
                        .get(&children_at)
                        .and_then(|c| c.iter().find(|n| *n != "id" && *n != "extension"));
                    return Err(fail(format!(
                        "{definition} is a {type_code}, not a primitive: map its elements, e.g. `{}.{}`",
                        segment.name,
                        example.map_or("…", String::as_str)
                    )));
                }
                (TypeKind::Complex, false) => {
                    nodes.push(children_at.clone());
                    container = children_at;
                }
            }
        }
        Err(PathError {
            segment: 0,
            message: "an element path cannot be empty".into(),
        })
    }

    /// When `name` is one type of a choice child of `container` (`valueQuantity` of
    /// `value[x]`), the choice's base name (`value`).
    pub fn choice_base(&self, container: &str, name: &str) -> Option<String> {
        let (definition, _, _) = self.find_child(container, name)?;
        let base = definition.rsplit('.').next()?.strip_suffix("[x]")?;
        Some(base.to_owned())
    }

    /// The child `name` of `container`: its definition path, its definition and its type.
    /// A choice element `x[x]` matches `x` followed by a type name (`valueQuantity`).
    fn find_child(&self, container: &str, name: &str) -> Option<(String, &Element, String)> {
        let path = format!("{container}.{name}");
        if let Some(element) = self.elements.get(&path) {
            let type_code = element.types.first().cloned().unwrap_or_default();
            if element.types.len() <= 1 {
                return Some((path, element, type_code));
            }
        }
        for child in self.children.get(container)? {
            let Some(base) = child.strip_suffix("[x]") else {
                continue;
            };
            let Some(suffix) = name.strip_prefix(base) else {
                continue;
            };
            let element = &self.elements[&format!("{container}.{child}")];
            if let Some(type_code) = element.types.iter().find(|t| upper_first(t) == suffix) {
                return Some((format!("{container}.{child}"), element, type_code.clone()));
            }
        }
        None
    }

    fn unknown_child_message(&self, container: &str, name: &str) -> String {
        let Some(children) = self.children.get(container) else {
            return format!("{container} has no elements");
        };
        let allowed: Vec<String> = children
            .iter()
            .map(|c| match c.strip_suffix("[x]") {
                Some(base) => {
                    let element = &self.elements[&format!("{container}.{c}")];
                    let choices: Vec<String> = element
                        .types
                        .iter()
                        .map(|t| format!("{base}{}", upper_first(t)))
                        .collect();
                    choices.join(", ")
                }
                None => c.clone(),
            })
            .collect();
        format!(
            "{container} has no element `{name}`; it has: {}",
            allowed.join(", ")
        )
    }
}

/// `quantity` → `Quantity`: the type part of a choice element's JSON name.
pub fn upper_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(resource: &str, path: &str) -> Result<ResolvedPath, PathError> {
        definitions().resolve(resource, &Segment::parse_path(path).unwrap())
    }

    #[test]
    fn paths_resolve_to_their_primitive_through_datatypes_and_choices() {
        let cases = [
            ("Observation", "status", "code", "Observation.status"),
            (
                "Observation",
                "code.coding[0].system",
                "uri",
                "Coding.system",
            ),
            (
                "Observation",
                "valueQuantity.value",
                "decimal",
                "Quantity.value",
            ),
            (
                "Observation",
                "effectiveDateTime",
                "dateTime",
                "Observation.effective[x]",
            ),
            (
                "Observation",
                "subject.reference",
                "string",
                "Reference.reference",
            ),
            (
                "Observation",
                "referenceRange[0].low.value",
                "decimal",
                "Quantity.value",
            ),
            (
                "Observation",
                "component[1].valueString",
                "string",
                "Observation.component.value[x]",
            ),
            ("Patient", "name[0].given[1]", "string", "HumanName.given"),
            ("Patient", "birthDate", "date", "Patient.birthDate"),
            (
                "Claim",
                "item[0].detail[0].subDetail[0].net.value",
                "decimal",
                "Money.value",
            ),
        ];
        for (resource, path, code, definition) in cases {
            let resolved =
                resolve(resource, path).unwrap_or_else(|e| panic!("{resource}.{path}: {e}"));
            assert_eq!(resolved.leaf.code, code, "{resource}.{path}");
            assert_eq!(resolved.leaf.definition, definition, "{resource}.{path}");
        }
    }

    #[test]
    fn required_bindings_carry_their_codes() {
        let status = resolve("Observation", "status").unwrap();
        let codes = status.leaf.required_codes.unwrap();
        for code in ["preliminary", "final", "amended", "corrected", "cancelled"] {
            assert!(codes.contains(code), "{code}");
        }
        assert!(resolve("Observation", "code.text")
            .unwrap()
            .leaf
            .required_codes
            .is_none());
    }

    #[test]
    fn content_references_resolve_to_the_referenced_definition() {
        // Questionnaire.item.item reuses Questionnaire.item.
        let resolved = resolve("Questionnaire", "item[0].item[0].linkId").unwrap();
        assert_eq!(resolved.leaf.definition, "Questionnaire.item.linkId");
    }

    #[test]
    fn bad_paths_say_which_step_fails_and_what_is_allowed() {
        let cases = [
            (
                "Observation",
                "statuss",
                0,
                "Observation has no element `statuss`; it has: ",
            ),
            (
                "Observation",
                "valueQuantity.valu",
                1,
                "Quantity has no element `valu`",
            ),
            (
                "Observation",
                "valueFoo",
                0,
                "valueQuantity, valueCodeableConcept",
            ),
            (
                "Observation",
                "code.coding.system",
                1,
                "CodeableConcept.coding repeats",
            ),
            ("Observation", "status[0]", 0, "not repeating"),
            (
                "Observation",
                "code",
                0,
                "is a CodeableConcept, not a primitive",
            ),
            (
                "Observation",
                "status.value",
                0,
                "primitive: it has no element `value`",
            ),
        ];
        for (resource, path, segment, message) in cases {
            let err = resolve(resource, path).unwrap_err();
            assert_eq!(err.segment, segment, "{path}: {err}");
            assert!(err.message.contains(message), "{path}: {}", err.message);
        }
    }

    #[test]
    fn required_children_are_listed() {
        let required: Vec<&str> = definitions().required_children("Observation").collect();
        assert_eq!(required, ["status", "code"]);
    }

    #[test]
    fn path_syntax_errors_are_explained() {
        assert!(Segment::parse_path("code.coding[x]")
            .unwrap_err()
            .contains("must be a number"));
        assert!(Segment::parse_path("Code")
            .unwrap_err()
            .contains("not an element name"));
    }
}
