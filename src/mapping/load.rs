//! Loading mapping files: YAML with positions (marked-yaml), checked completely against the
//! FHIR R4 definitions. Every problem is collected and reported with `file:line:column`;
//! a file with any problem yields no mapping. A file is read by a `Reader`: the file and
//! its resources here, the source table with its lookups and translations in `source`, the
//! elements in `element`, the `when` conditions in `conditions`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use marked_yaml::{types::MarkedMappingNode, LoaderOptions, Node, Span};
use sha2::{Digest, Sha256};

use super::{
    convert::{format_reads, to_fhir, ControlCharacters, Conversion, Primitive},
    location::{LoadError, LoadErrors, Location},
    model::{
        exclusive, Case, ChoiceGroup, Comparison, Condition, ElementMapping, Lookup, Mapping,
        OnMissing, Protect, RequiredNode, ResourceMapping, Test, Transform, Translated,
        Translation, Unmapped, ValueSource,
    },
    shape::Shape,
    template::Template,
};
use crate::{
    canonical::schema,
    change::{Column, Value},
    fhir::{definitions, Segment, Sensitivity},
};

mod conditions;
mod element;
mod source;

/// Files ending in this are code tables read by mappings, not mappings.
pub const CODE_TABLE_SUFFIX: &str = ".codes.yaml";

/// Load every mapping under `dir` (recursively, `*.yaml`/`*.yml` except code tables).
/// Mapping ids must be unique across the set.
pub fn load_dir(dir: &Path) -> Result<Vec<Mapping>, LoadErrors> {
    let mut files = Vec::new();
    collect_files(dir, &mut files).map_err(|e| {
        LoadErrors(vec![LoadError {
            location: Location {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
            },
            message: format!("cannot read the mappings directory: {e}"),
        }])
    })?;
    files.sort();
    let mut mappings = Vec::new();
    let mut errors = Vec::new();
    let mut ids: HashMap<String, Location> = HashMap::new();
    for file in files {
        match load_file(&file) {
            Ok(mapping) => {
                let here = Location {
                    file: file.display().to_string(),
                    line: 1,
                    column: 1,
                };
                if let Some(first) = ids.get(&*mapping.id) {
                    errors.push(LoadError {
                        location: here,
                        message: format!("mapping id `{}` is already used by {first}", mapping.id),
                    });
                } else {
                    ids.insert(mapping.id.to_string(), here);
                    mappings.push(mapping);
                }
            }
            Err(LoadErrors(mut e)) => errors.append(&mut e),
        }
    }
    errors.extend(unprotected_references(&mappings));
    errors.extend(shared_ids(&mappings));
    if errors.is_empty() {
        Ok(mappings)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Resource entries that can make the same type and id from one row — the same type, the
/// same literal text around their id's placeholders — unless their conditions provably
/// exclude each other (entries of different tables never do): two entries would make one
/// resource contradict itself, one deleting what the other makes.
fn shared_ids(mappings: &[Mapping]) -> Vec<LoadError> {
    let mut made: HashMap<(&str, String), Vec<(&Mapping, &ResourceMapping)>> = HashMap::new();
    let mut errors = Vec::new();
    for mapping in mappings {
        for resource in &mapping.resources {
            let makers = made
                .entry((resource.resource_type.as_str(), resource.id.skeleton()))
                .or_default();
            let clash = makers.iter().find(|(other, earlier)| {
                other.table != mapping.table || !exclusive(&earlier.when, &resource.when)
            });
            if let Some((other, earlier)) = clash {
                let why = if other.table == mapping.table {
                    "their `when` conditions do not exclude each other (on one column: `in` sets without a common value, `is_null: true` and `false`, `is_numeric: true` and `false`, bounds that leave no number between them); or make one entry and put the conditions on its elements"
                } else {
                    "they read different tables, whose rows would overwrite each other's resource"
                };
                errors.push(LoadError {
                    location: resource.location.clone(),
                    message: format!(
                        "{}/{} can also be made by the entry at {} (mapping `{}`): two entries may make one resource only when no row can meet both; {why}",
                        resource.resource_type,
                        resource.id.skeleton(),
                        earlier.location,
                        other.id
                    ),
                });
            }
            makers.push((mapping, resource));
        }
    }
    errors
}

/// References made like a resource's id (same type, same literal text around the
/// placeholders) that the id tokenizes and they do not, or the other way round: they would
/// point at no resource, silently.
fn unprotected_references(mappings: &[Mapping]) -> Vec<LoadError> {
    let mut ids: HashMap<(&str, String), (bool, &str)> = HashMap::new();
    for mapping in mappings {
        for resource in &mapping.resources {
            let made = (resource.resource_type.as_str(), resource.id.skeleton());
            ids.insert(made, (resource.id.is_tokenized(), &mapping.id));
        }
    }
    let mut errors = Vec::new();
    for (resource, element) in mappings
        .iter()
        .flat_map(|m| &m.resources)
        .flat_map(|r| r.elements.iter().map(move |e| (r, e)))
    {
        let ValueSource::Reference {
            resource_type, id, ..
        } = &element.source
        else {
            continue;
        };
        let Some(&(tokenized, mapping)) = ids.get(&(resource_type.as_str(), id.skeleton())) else {
            continue;
        };
        if tokenized != id.is_tokenized() {
            let (fix, how) = if tokenized {
                ("add `protect: token`", "tokenizes")
            } else {
                ("remove `protect`", "does not tokenize")
            };
            errors.push(LoadError {
                location: element.location.clone(),
                message: format!(
                    "{}.{}: mapping `{mapping}` {how} the ids of the {resource_type}s this references; {fix} so that the reference points at them",
                    resource.resource_type,
                    display_path(&element.path)
                ),
            });
        }
    }
    errors
}

/// References to resource types none of `mappings` makes, unless marked `external`: they
/// would point at nothing a consumer of these topics can find (a warning: another connector
/// may make them, which `external: true` says).
pub fn unmade_references(mappings: &[Mapping]) -> Vec<LoadError> {
    let made: HashSet<&str> = mappings
        .iter()
        .flat_map(|m| &m.resources)
        .map(|r| r.resource_type.as_str())
        .collect();
    mappings
        .iter()
        .flat_map(|m| &m.resources)
        .flat_map(|r| &r.elements)
        .filter_map(|element| match &element.source {
            ValueSource::Reference {
                resource_type,
                external: false,
                ..
            } if !made.contains(resource_type.as_str()) => Some(LoadError {
                location: element.location.clone(),
                message: format!(
                    "{} refers to a {resource_type}, which none of these mappings makes",
                    element.written
                ),
            }),
            _ => None,
        })
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !name.ends_with(CODE_TABLE_SUFFIX)
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Load and check one mapping file.
pub fn load_file(path: &Path) -> Result<Mapping, LoadErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        LoadErrors(vec![LoadError {
            location: Location {
                file: path.display().to_string(),
                line: 0,
                column: 0,
            },
            message: format!("cannot read the file: {e}"),
        }])
    })?;
    load_str(path, &text)
}

/// Load and check a mapping from its text; `path` names it in messages and anchors the
/// code tables it reads.
pub fn load_str(path: &Path, text: &str) -> Result<Mapping, LoadErrors> {
    let mut reader = Reader {
        file: path,
        errors: Vec::new(),
        hash: Sha256::new(),
    };
    reader.hash.update(text.as_bytes());
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let mapping = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(node) => reader.mapping_file(&node),
        Err(e) => {
            reader.errors.push(yaml_error(path, &e));
            None
        }
    };
    match mapping {
        Some(mapping) if reader.errors.is_empty() => Ok(mapping),
        _ => {
            if reader.errors.is_empty() {
                reader.error(&Span::new_blank(), "the mapping could not be read");
            }
            Err(LoadErrors(reader.errors))
        }
    }
}

fn yaml_error(path: &Path, error: &marked_yaml::LoadError) -> LoadError {
    use marked_yaml::LoadError as E;
    let (marker, message) = match error {
        E::TopLevelMustBeMapping(m) => (
            Some(*m),
            "a mapping file is a YAML mapping (`key: value` lines)".to_owned(),
        ),
        E::TopLevelMustBeSequence(m) => (Some(*m), "a sequence was expected".to_owned()),
        E::UnexpectedAnchor(m) => (
            Some(*m),
            "YAML anchors and aliases are not supported".to_owned(),
        ),
        E::MappingKeyMustBeScalar(m) => (Some(*m), "keys must be plain text".to_owned()),
        E::UnexpectedTag(m) => (Some(*m), "YAML tags (`!tag`) are not supported".to_owned()),
        E::ScanError(m, e) => (Some(*m), format!("not valid YAML: {}", e.info())),
        E::DuplicateKey(inner) => (
            inner.key.span().start().copied(),
            format!("key `{}` appears twice", inner.key.as_str()),
        ),
    };
    let (line, column) = marker.map_or((0, 0), |m| (m.line(), m.column()));
    LoadError {
        location: Location {
            file: path.display().to_string(),
            line,
            column,
        },
        message,
    }
}

struct Reader<'a> {
    file: &'a Path,
    errors: Vec<LoadError>,
    hash: Sha256,
}

/// Where the elements of a group go: the path they continue (with its dot), and the
/// conditions they share.
struct Group {
    prefix: String,
    when: Vec<Condition>,
}

/// What a mapping file defines by name for its elements to use.
struct Defined {
    translations: HashMap<String, Arc<Translation>>,
    lookups: BTreeMap<String, Arc<Lookup>>,
}

/// The rows a lookup holds in memory unless it says otherwise.
const DEFAULT_LOOKUP_ROWS: usize = 1_000_000;

/// The source table's shape as the mapping declares it.
struct Table {
    /// A lookup's name, when these are the columns it reads of its table.
    lookup: Option<String>,
    key: Vec<String>,
    /// When declared: every column mappings may read.
    columns: Option<HashSet<String>>,
}

impl Reader<'_> {
    fn error(&mut self, span: &Span, message: impl Into<String>) {
        self.errors.push(LoadError {
            location: Location::new(self.file, span),
            message: message.into(),
        });
    }

    fn location(&self, span: &Span) -> Location {
        Location::new(self.file, span)
    }

    /// The fields of a YAML mapping; unknown keys are reported with the allowed ones.
    fn fields<'n>(
        &mut self,
        map: &'n MarkedMappingNode,
        what: &str,
        allowed: &[&str],
    ) -> BTreeMap<&'n str, &'n Node> {
        let mut fields = BTreeMap::new();
        for (key, value) in map.iter() {
            if allowed.contains(&key.as_str()) {
                fields.insert(key.as_str(), value);
            } else {
                self.error(
                    key.span(),
                    format!(
                        "unknown key `{}` in {what}; allowed: {}",
                        key.as_str(),
                        allowed.join(", ")
                    ),
                );
            }
        }
        fields
    }

    fn require<'n>(
        &mut self,
        fields: &BTreeMap<&str, &'n Node>,
        key: &str,
        span: &Span,
        what: &str,
    ) -> Option<&'n Node> {
        let found = fields.get(key).copied();
        if found.is_none() {
            self.error(span, format!("{what} needs `{key}`"));
        }
        found
    }

    fn as_map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n MarkedMappingNode> {
        let map = node.as_mapping();
        if map.is_none() {
            self.error(
                node.span(),
                format!("{what} must be a mapping of `key: value` lines"),
            );
        }
        map
    }

    fn text<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        let text = node.as_scalar().map(|s| s.as_str());
        if text.is_none() {
            self.error(node.span(), format!("{what} must be a single value"));
        }
        text
    }

    fn texts(&mut self, node: &Node, what: &str) -> Option<Vec<(String, Span)>> {
        let Some(items) = node.as_sequence() else {
            self.error(node.span(), format!("{what} must be a list, like [a, b]"));
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            out.push((self.text(item, what)?.to_owned(), *item.span()));
        }
        Some(out)
    }

    /// The regular expression `node` holds as the value of `key`, as `whole` writes it.
    fn regex(
        &mut self,
        node: &Node,
        key: &str,
        whole: impl Fn(&str) -> String,
    ) -> Option<regex::Regex> {
        let pattern = self.text(node, &format!("`{key}`"))?;
        match regex::Regex::new(&whole(pattern)) {
            Ok(regex) => Some(regex),
            Err(e) => {
                // The parser's message spans lines, drawing the pattern; the last says why.
                let why = e.to_string();
                let why = why.lines().last().unwrap_or_default().trim();
                let why = why.strip_prefix("error: ").unwrap_or(why);
                self.error(
                    node.span(),
                    format!("`{key}`: not a regular expression: {why}"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match self.text(node, what)? {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                self.error(node.span(), format!("{what} must be true or false"));
                None
            }
        }
    }

    fn mapping_file(&mut self, root: &Node) -> Option<Mapping> {
        let map = self.as_map(root, "a mapping file")?;
        let span = start_of(map);
        let fields = self.fields(
            map,
            "a mapping file",
            &[
                "mapping",
                "description",
                "domain",
                "sensitivity",
                "source",
                "resources",
                "translations",
                "lookups",
            ],
        );
        let id = self
            .require(&fields, "mapping", &span, "a mapping file")
            .and_then(|n| {
                let id = self.text(n, "`mapping`")?;
                let valid = id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && id.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'
                    });
                if !valid {
                    self.error(
                        n.span(),
                        format!("mapping id `{id}`: use lower-case letters, digits, `-` and `.`"),
                    );
                }
                Some(id.to_owned())
            });
        let description = fields
            .get("description")
            .and_then(|n| self.text(n, "`description`"))
            .map(str::to_owned);
        let domain = self.require(&fields, "domain", &span, "a mapping file").and_then(|n| {
            let domain = self.text(n, "`domain`")?;
            let valid = domain.starts_with(|c: char| c.is_ascii_lowercase())
                && domain.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !valid {
                self.error(n.span(), format!("domain `{domain}` becomes a topic name part: use lower-case letters, digits and `-`"));
            }
            Some(domain.to_owned())
        });
        let sensitivity = match fields.get("sensitivity") {
            None => Some(Sensitivity::Normal),
            Some(n) => match self.text(n, "`sensitivity`") {
                Some("normal") => Some(Sensitivity::Normal),
                Some("restricted") => Some(Sensitivity::Restricted),
                Some(other) => {
                    self.error(
                        n.span(),
                        format!("sensitivity `{other}`: use normal or restricted"),
                    );
                    None
                }
                None => None,
            },
        };
        let source = self
            .require(&fields, "source", &span, "a mapping file")
            .and_then(|n| self.source(n));
        let translations = match fields.get("translations") {
            Some(n) => self.translations(n),
            None => HashMap::new(),
        };
        let (lookups, lookups_complete) = match (fields.get("lookups"), &source) {
            (Some(n), Some((_, table))) => self.lookups(n, table),
            _ => (BTreeMap::new(), true),
        };
        let defined = Defined {
            translations,
            lookups,
        };
        let resources = match (
            self.require(&fields, "resources", &span, "a mapping file"),
            &source,
        ) {
            (Some(node), Some((_, table))) => self.resources(node, table, &defined),
            _ => None,
        };
        let (table, Table { key, .. }) = source?;
        let content_hash = hex::encode(&std::mem::take(&mut self.hash).finalize()[..8]);
        Some(Mapping {
            id: id?.into(),
            description,
            domain: domain?.into(),
            sensitivity: sensitivity?,
            table,
            key,
            content_hash: content_hash.into(),
            file: self.file.to_path_buf(),
            resources: resources?,
            lookups: lookups_complete.then(|| defined.lookups.into_values().collect())?,
        })
    }

    fn resources(
        &mut self,
        node: &Node,
        table: &Table,
        defined: &Defined,
    ) -> Option<Vec<ResourceMapping>> {
        let Some(items) = node.as_sequence() else {
            self.error(
                node.span(),
                "`resources` must be a list of resources (`- type: …`)",
            );
            return None;
        };
        if items.is_empty() {
            self.error(node.span(), "`resources` lists no resource");
        }
        let mut resources = Vec::new();
        for item in items.iter() {
            if let Some(resource) = self.resource(item, table, defined) {
                resources.push(resource);
            }
        }
        (resources.len() == items.len()).then_some(resources)
    }

    fn check_columns<'c>(
        &mut self,
        span: &Span,
        table: &Table,
        columns: impl IntoIterator<Item = &'c str>,
    ) {
        let Some(known) = &table.columns else { return };
        for column in columns {
            if !known.contains(column) {
                let mut names: Vec<&str> = known.iter().map(String::as_str).collect();
                names.sort_unstable();
                let message = match &table.lookup {
                    None => format!(
                        "unknown column `{column}`: not among `source.columns`, which names {}",
                        names.join(", ")
                    ),
                    Some(lookup) => format!(
                        "lookup `{lookup}` reads no column `{column}`; its `key` and `columns` name: {}",
                        names.join(", ")
                    ),
                };
                self.error(span, message);
            }
        }
    }

    fn resource(
        &mut self,
        node: &Node,
        table: &Table,
        defined: &Defined,
    ) -> Option<ResourceMapping> {
        let map = self.as_map(node, "a resource")?;
        let span = start_of(map);
        let fields = self.fields(map, "a resource", &["type", "id", "when", "elements"]);
        let resource_type = self
            .require(&fields, "type", &span, "a resource")
            .and_then(|n| {
                let name = self.text(n, "`type`")?;
                if !definitions().is_resource(name) {
                    self.error(n.span(), format!("`{name}` is not a FHIR R4 resource type"));
                    return None;
                }
                Some(name.to_owned())
            });
        let id = self
            .require(&fields, "id", &span, "a resource")
            .and_then(|n| self.id_template(n, table));
        if let Some(id) = &id {
            if id.is_literal() {
                self.error(fields["id"].span(), "`id` must read at least one column (e.g. \"result-{result_id}\"), or every row makes the same resource");
            }
        }
        let when = match fields.get("when") {
            Some(n) => self.conditions(n, table),
            None => Some(Vec::new()),
        };
        let elements_node = self.require(&fields, "elements", &span, "a resource");
        let (resource_type, elements_node) = (resource_type?, elements_node?);
        let elements = self.elements(elements_node, &resource_type, table, defined)?;
        let elements_span = elements_node
            .as_mapping()
            .map_or(*elements_node.span(), start_of);
        self.spreads_split(&resource_type, &elements, &elements_span);
        let required = self.required_nodes(&resource_type, &elements, &elements_span);
        let choices = choice_groups(&resource_type, &elements);
        let required = required?;
        Some(ResourceMapping {
            resource_type,
            id: id?,
            when: when?,
            shape: Shape::compile(&elements, &required, &choices),
            elements,
            required,
            choices,
            location: self.location(&span),
        })
    }

    /// A resource's `id`: a template, or `{ template: …, protect: token }` for an id whose
    /// placeholders hold the tokens of their values.
    fn id_template(&mut self, node: &Node, table: &Table) -> Option<Template> {
        if node.as_scalar().is_some() {
            return self.template(node, "`id`", table);
        }
        let map = self.as_map(node, "`id`")?;
        let span = start_of(map);
        let fields = self.fields(map, "`id`", &["template", "protect"]);
        let template = self.require(&fields, "template", &span, "`id`");
        let template = self.template(template?, "`id`", table)?;
        match fields.get("protect") {
            None => Some(template),
            Some(n) => self.id_protection(n, template),
        }
    }

    /// `template` as `protect` (on an id or a reference) asks: only tokens keep ids apart.
    fn id_protection(&mut self, node: &Node, template: Template) -> Option<Template> {
        match self.text(node, "`protect`")? {
            "token" => Some(template.tokenized()),
            other => {
                let why = match other {
                    "mask" => "a masked id would make every row the same resource",
                    _ => "the only protection an id takes",
                };
                self.error(
                    node.span(),
                    format!("protect `{other}` on an id: use token ({why})"),
                );
                None
            }
        }
    }

    fn template(&mut self, node: &Node, what: &str, table: &Table) -> Option<Template> {
        let text = self.text(node, what)?;
        match Template::parse(text) {
            Ok(template) => {
                self.check_columns(node.span(), table, template.columns().map(|c| c.as_str()));
                Some(template)
            }
            Err(e) => {
                self.error(node.span(), format!("{what}: {e}"));
                None
            }
        }
    }
}

/// Where a YAML mapping begins for a reader: its first key (marked-yaml marks a block
/// mapping at its first value).
fn start_of(map: &MarkedMappingNode) -> Span {
    map.keys().next().map_or(*map.span(), |key| *key.span())
}

/// The choice elements filled with more than one type, for the one-type-per-row check.
fn choice_groups(resource_type: &str, elements: &[ElementMapping]) -> Vec<ChoiceGroup> {
    let mut groups: BTreeMap<(Vec<Segment>, String), Vec<String>> = BTreeMap::new();
    for element in elements {
        let Ok(resolved) = definitions().resolve(resource_type, &element.path) else {
            continue;
        };
        for (depth, segment) in element.path.iter().enumerate() {
            let container = if depth == 0 {
                resource_type
            } else {
                &resolved.nodes[depth - 1]
            };
            if let Some(base) = definitions().choice_base(container, segment.name) {
                let names = groups
                    .entry((element.path[..depth].to_vec(), format!("{base}[x]")))
                    .or_default();
                if !names.iter().any(|n| **n == *segment.name) {
                    names.push(segment.name.to_string());
                }
            }
        }
    }
    groups
        .into_iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|((path, choice), names)| ChoiceGroup {
            path,
            choice,
            names,
        })
        .collect()
}

/// Whether some element fills the child `child` of the node at `path`.
fn fills(elements: &[ElementMapping], path: &[Segment], child: &str) -> bool {
    elements.iter().any(|e| {
        e.path.len() > path.len()
            && e.path[..path.len()] == path[..]
            && child_matches(child, e.path[path.len()].name)
    })
}

/// Whether a JSON element name fills the child `child` (`value[x]` is filled by `valueQuantity`).
pub fn child_matches(child: &str, name: &str) -> bool {
    match child.strip_suffix("[x]") {
        Some(base) => {
            name.starts_with(base)
                && name[base.len()..].starts_with(|c: char| c.is_ascii_uppercase())
        }
        None => child == name,
    }
}

/// `component[0].code` from segments.
pub fn display_path(path: &[Segment]) -> String {
    path.iter()
        .map(|s| match s.index {
            Some(Segment::EACH) => format!("{}[*]", s.name),
            Some(i) => format!("{}[{i}]", s.name),
            None => s.name.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}
